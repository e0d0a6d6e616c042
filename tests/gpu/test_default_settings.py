"""Heterogeneous mode with vLLM's default settings, as a user first tries it on a GPU node.

- The OpenAI api_server through the launcher with TP=8 (1 GPU + 7 CPU ranks) and nothing but
  ``--dtype float32 --max-model-len 256`` and the address: no KV cache size, no
  VLLM_CPU_KVCACHE_SPACE, no --enforce-eager, no --gpu-memory-utilization. It must be healthy
  within 300 s, answer 4 greedy completions with the texts of GPU-only TP=1 on the same weights
  (a tiny Llama whose 8 heads divide by 8), log the rank plan with 7 CPU ranks each with its KV
  cache, and end on SIGTERM within 60 s with nothing left.
- An offline script without an ``if __name__ == "__main__":`` guard (module-level code, as many
  scripts are written for a CUDA host) builds ``LLM(..., device="heterogeneous",
  tensor_parallel_size=4)`` with default settings: it must exit 0 and print the greedy tokens of
  GPU-only TP=1 (tiny Llama).
"""

from __future__ import annotations

import json
import re
import sys

from hetero_shim.testing import kv_report, server, tiny_models

TP8_LLAMA = tiny_models.ModelSpec(hidden_size=256, num_heads=8, num_kv_heads=8)  # head_dim 32, 8 KV heads
PLAN_HEAD = re.compile(r"hetero_shim rank plan: (\d+) GPU rank\(s\) \+ (\d+) CPU rank\(s\)")
PLAN_CPU_RANK = re.compile(r"rank (\d+): CPU  cores .*?KV cache ([\d.]+) GiB")


def test_tp8_server_with_default_settings(gpu, evidence):
    model = tiny_models.get(TP8_LLAMA)
    ref = gpu.reference(model, "float32", tp=1, max_tokens=16)
    port = server.free_port()
    cmd = [sys.executable, "-m", "hetero_shim", "python", "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model), "--device", "heterogeneous", "--tensor-parallel-size", "8",
           "--dtype", "float32", "--max-model-len", "256", "--host", "127.0.0.1", "--port", str(port)]
    log = evidence.dir / "server-hetero-tp8.log"
    evidence.save("command", cmd)
    texts: dict[int, str] = {}
    proc = server.start(cmd, gpu.env(), log)
    try:
        try:
            took = server.wait_ready(proc, port, log, 300, path="/health")
            evidence.row("TP=8 server with default settings healthy within 300 s", True, f"after {took:.0f} s")
        except RuntimeError as exc:
            evidence.row("TP=8 server with default settings healthy within 300 s", False, str(exc).splitlines()[0])
        else:
            for i, prompt in enumerate(tiny_models.PROMPTS[:4]):
                try:
                    texts[i] = server.post(port, "/v1/completions", {
                        "model": str(model), "prompt": prompt, "max_tokens": 16, "temperature": 0})
                except Exception as exc:  # a row, not a stop: the shutdown is still checked
                    texts[i] = f"{type(exc).__name__}: {exc}"
    finally:
        stopped = server.stop(proc)
    evidence.save("texts", {"reference": (ref or {}).get("text", [])[:4], "hetero": texts})
    for i, text in texts.items():
        want = ref["text"][i] if ref else None
        evidence.row(f"TP=8 default settings, completion {i} == GPU TP=1 greedy text", text == want,
                     f"{text!r:.60} vs {want!r:.60}")
    evidence.row("TP=8 default settings: SIGTERM ends the server within 60 s, nothing left",
                 stopped["exited"] and not stopped["left"], f"{stopped['exit']} ({stopped['seconds']} s); "
                 f"left: {stopped['left'] or 'none'}")

    text = log.read_text(errors="replace")
    evidence.excerpt("log_excerpt", text, r"hetero_shim rank plan", r"rank \d+: (GPU|CPU)", r"KV cache",
                     r"reserved cores", r"Traceback|Error", limit=80)
    heads = PLAN_HEAD.findall(text)
    evidence.row("the log shows the rank plan: 1 GPU rank + 7 CPU ranks", ("1", "7") in heads,
                 f"plans logged: {heads or 'none'}")
    cpu_kv = {int(rank): float(gib) for rank, gib in PLAN_CPU_RANK.findall(text)}
    evidence.row("the rank plan gives each of the 7 CPU ranks its KV cache", sorted(cpu_kv) == list(range(1, 8)),
                 f"KV cache per CPU rank (GiB): {cpu_kv or 'none'}")
    report = kv_report.parse(text)
    kinds = sorted((report or {}).get("kinds", {}).values())
    evidence.save("kv", report)
    evidence.row("KV budgets agreed across the 8 ranks (the smallest wins)",
                 bool(report) and kinds == ["cpu"] * 7 + ["gpu"] and all(b > 0 for b in report["budgets"].values())
                 and kv_report.smallest_budget_wins(report),
                 f"budgets {report['budgets']} B, agreed {report['blocks']} blocks" if report else "no KV agreement line")
    evidence.check()


UNGUARDED = """\
import json

import hetero_shim

hetero_shim.enable()
from vllm import LLM, SamplingParams

from hetero_shim.testing.tiny_models import PROMPTS

llm = LLM(model={model!r}, device="heterogeneous", tensor_parallel_size=4, dtype="float32", max_model_len=256)
outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens={max_tokens}))
print("RESULT " + json.dumps({{"tokens": [list(o.outputs[0].token_ids) for o in outs]}}), flush=True)
"""


def test_unguarded_offline_script_with_default_settings(gpu, evidence):
    model = tiny_models.get(tiny_models.TINY_LLAMA)
    ref = gpu.reference(model, "float32", tp=1)
    script = evidence.dir / "unguarded.py"
    script.write_text(UNGUARDED.format(model=str(model), max_tokens=32))
    assert "__main__" not in script.read_text()
    done = gpu.run([sys.executable, str(script)], evidence.dir / "unguarded.log", gpu.opts.timeout)
    result = next((line for line in done.text.splitlines() if line.startswith("RESULT ")), None)
    got = {"tokens": json.loads(result[len("RESULT "):])["tokens"]} if result else None
    evidence.excerpt("log_excerpt", done.text, r"hetero_shim", r"Traceback|Error|bootstrapping", limit=60)
    evidence.row("unguarded script, TP=4, default settings: exits 0, nothing left",
                 done.rc == 0 and done.left == [], f"rc={done.rc} after {done.seconds:.0f} s; left: {done.left}")
    evidence.compare("unguarded script TP=4 greedy == GPU TP=1", ref, got)
    evidence.check()
