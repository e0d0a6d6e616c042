"""The plain vLLM commands on a GPU node, with hetero_shim installed as a package (its vLLM plugin
entry points) and nothing else: no launcher, no enable(), no sitecustomize, no PYTHONPATH entry
for the shim's bootstrap.

- ``python -m vllm.entrypoints.openai.api_server --model M --device heterogeneous
  --tensor-parallel-size 2`` (1 GPU rank + 1 CPU rank): healthy, 4 greedy completions with the
  texts of GPU-only TP=1 on the same weights, the rank plan in its log, SIGTERM ends it.

Needs hetero_shim installed where Python finds its ``.dist-info`` (e.g. ``pip install --target
/tmp/site <hetero_shim wheel>`` with /tmp/site on PYTHONPATH); skipped when the entry points are
not visible.
"""

from __future__ import annotations

import sys
from importlib import metadata

import pytest

from hetero_shim.testing import server, tiny_models


def _plugin_installed() -> bool:
    groups = metadata.entry_points()
    return any(ep.value.startswith("hetero_shim") for ep in groups.select(group="vllm.platform_plugins"))


def test_api_server_module_without_launcher(gpu, evidence):
    if not _plugin_installed():
        pytest.skip("hetero_shim's vLLM entry points are not installed (pip install the package first)")
    model = tiny_models.get(tiny_models.TINY_LLAMA)
    ref = gpu.reference(model, "float32", tp=1, max_tokens=16)
    port = server.free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--device", "heterogeneous", "--tensor-parallel-size", "2", "--dtype", "float32",
           "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20),
           "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in gpu.env().items() if not k.startswith("HETERO_SHIM_ENABLE")}
    env["PYTHONPATH"] = ":".join(p for p in env.get("PYTHONPATH", "").split(":") if "_bootstrap" not in p)
    log = evidence.dir / "server-plugin-tp2.log"
    evidence.save("command", cmd)
    texts: dict[int, str] = {}
    proc = server.start(cmd, env, log)
    try:
        try:
            took = server.wait_ready(proc, port, log, 300, path="/health")
            evidence.row("plain api_server command, heterogeneous TP=2, healthy", True, f"after {took:.0f} s")
        except RuntimeError as exc:
            evidence.row("plain api_server command, heterogeneous TP=2, healthy", False, str(exc).splitlines()[0])
        else:
            for i, prompt in enumerate(tiny_models.PROMPTS[:4]):
                texts[i] = server.post(port, "/v1/completions", {
                    "model": str(model), "prompt": prompt, "max_tokens": 16, "temperature": 0})
    finally:
        stopped = server.stop(proc)
    evidence.save("texts", {"reference": (ref or {}).get("text", [])[:4], "hetero": texts})
    for i, text in texts.items():
        want = ref["text"][i] if ref else None
        evidence.row(f"plugin path, completion {i} == GPU TP=1 greedy text", text == want,
                     f"{text!r:.60} vs {want!r:.60}")
    text = log.read_text(errors="replace")
    evidence.excerpt("log_excerpt", text, r"hetero_shim rank plan", r"rank \d+: (GPU|CPU)", r"Traceback|Error",
                     limit=40)
    evidence.row("the log shows the rank plan: 1 GPU rank + 1 CPU rank",
                 "hetero_shim rank plan: 1 GPU rank(s) + 1 CPU rank(s)" in text, "")
    evidence.row("SIGTERM ends the server, nothing left", stopped["exited"] and not stopped["left"],
                 f"{stopped['exit']} ({stopped['seconds']} s)")
    evidence.check()
