"""The OpenAI server of vLLM as a test sees it: start it in its own process session, wait until it
answers, ask it, stop it with SIGTERM and check that nothing of it is left. Stdlib HTTP only (the
GPU machine has no ``openai`` client).

Used by the GPU tests (``tests/gpu/test_server.py``, ``test_default_settings.py``) and the
integration server test.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from hetero_shim.testing import tiny_models
from hetero_shim.testing.proctree import kill_session, session_pids, wait_session_gone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict, stream: bool = False, timeout: float = 120) -> str:
    """One request; the text of the first choice (completion text or chat content), streamed or not."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if not stream:
            data = json.loads(resp.read())
            choice = data["choices"][0]
            return choice["text"] if "text" in choice else choice["message"]["content"]
        text = []
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]
                text.append(delta.get("text") or delta.get("delta", {}).get("content") or "")
        return "".join(text)


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The server in its own session (so every process it starts can be found and killed), output to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float, path: str = "/v1/models") -> float:
    """Seconds until ``path`` answers 200; RuntimeError (with the log's tail) if the server exits or
    does not answer within ``timeout``."""
    started = time.monotonic()
    while True:
        if proc.poll() is not None or time.monotonic() - started > timeout:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            state = f"exit {proc.returncode}" if proc.returncode is not None else f"not up within {timeout:.0f} s"
            raise RuntimeError(f"server not up ({state}); see {log}:\n{tail}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)


def stop(proc: subprocess.Popen, grace: float = 60) -> dict:
    """SIGTERM the server, wait up to ``grace`` s for it and 30 s more for every process of its session;
    then SIGKILL whatever is left. Returns {'exited': bool, 'exit': str, 'seconds': float, 'left': [pids]}."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
        exited, what = True, f"exited {proc.returncode} within {grace:.0f} s of SIGTERM"
    except subprocess.TimeoutExpired:
        exited, what = False, f"did not exit within {grace:.0f} s of SIGTERM"
    seconds = round(time.monotonic() - started, 1)
    left = wait_session_gone(proc.pid, 30) if exited else session_pids(proc.pid)
    kill_session(proc.pid)
    proc.wait()
    return {"exited": exited, "exit": what, "seconds": seconds, "left": left}


def serve_and_ask(model: Path, tp: int, hetero: bool, port: int, log: Path, env: dict[str, str],
                  start_timeout: float = 240) -> dict:
    """``vllm serve`` (through ``python -m hetero_shim`` with ``--device heterogeneous`` when ``hetero``,
    else stock vLLM) answers 4 greedy completions, a chat, a streamed chat and a streamed completion.
    Returns those texts by name, and '_exit', '_left', '_stop' after SIGTERM."""
    cmd = [sys.executable, "-m", "hetero_shim", "python", "-m", "vllm.entrypoints.cli.main", "serve", str(model),
           "--tensor-parallel-size", str(tp), "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
           "--max-model-len", "256", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
    if hetero:
        cmd += ["--device", "heterogeneous"]
    else:
        cmd = [sys.executable, *cmd[4:]]  # stock vLLM, no shim
    answers: dict = {}
    proc = start(cmd, env, log)
    try:
        wait_ready(proc, port, log, start_timeout)
        for i, prompt in enumerate(tiny_models.PROMPTS[:4]):
            answers[f"completion {i}"] = post(port, "/v1/completions", {
                "model": str(model), "prompt": prompt, "max_tokens": 32, "temperature": 0})
        chat = {"model": str(model), "messages": [{"role": "user", "content": "Hello, who are you?"}],
                "max_tokens": 24, "temperature": 0}
        answers["chat"] = post(port, "/v1/chat/completions", chat)
        answers["chat streamed"] = post(port, "/v1/chat/completions", {**chat, "stream": True}, stream=True)
        answers["completion streamed"] = post(port, "/v1/completions", {
            "model": str(model), "prompt": tiny_models.PROMPTS[0], "max_tokens": 32, "temperature": 0, "stream": True},
            stream=True)
    finally:
        stopped = stop(proc)
        answers["_exit"], answers["_left"], answers["_stop"] = stopped["exit"], stopped["left"], stopped
    return answers

