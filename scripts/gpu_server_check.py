"""Server check: the OpenAI server in heterogeneous mode (launched through hetero_shim) answers
/v1/completions and /v1/chat/completions (plain and streaming) with the text of a GPU-only
TP=1 server on the same weights. Prints a pass/fail table; stdlib HTTP only.

    python scripts/gpu_server_check.py [--model llama] [--tp 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gpu_check  # noqa: E402  (scripts/ is on sys.path when this script runs)
from hetero_shim.testing import tiny_models  # noqa: E402


def post(port: int, path: str, body: dict, stream: bool = False) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
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


def serve_and_ask(model: Path, tp: int, hetero: bool, port: int, log: Path) -> dict:
    cmd = [sys.executable, "-m", "hetero_shim", "python", "-m", "vllm.entrypoints.cli.main", "serve", str(model),
           "--tensor-parallel-size", str(tp), "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
           "--max-model-len", "256", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
    if hetero:
        cmd += ["--device", "heterogeneous"]
    else:
        cmd = [sys.executable, *cmd[4:]]  # stock vLLM, no shim
    env = gpu_check.env()
    answers: dict = {}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server not up (exit {proc.returncode}); see {log}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        for i, prompt in enumerate(tiny_models.PROMPTS[:4]):
            answers[f"completion {i}"] = post(port, "/v1/completions", dict(
                model=str(model), prompt=prompt, max_tokens=32, temperature=0))
        chat = dict(model=str(model), messages=[{"role": "user", "content": "Hello, who are you?"}],
                    max_tokens=24, temperature=0)
        answers["chat"] = post(port, "/v1/chat/completions", chat)
        answers["chat streamed"] = post(port, "/v1/chat/completions", {**chat, "stream": True}, stream=True)
        answers["completion streamed"] = post(port, "/v1/completions", dict(
            model=str(model), prompt=tiny_models.PROMPTS[0], max_tokens=32, temperature=0, stream=True), stream=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
            answers["_exit"] = f"exited {proc.returncode} within 60 s of SIGTERM"
        except subprocess.TimeoutExpired:
            answers["_exit"] = "did not exit within 60 s of SIGTERM"
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", default="gpu_server_out")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_models.get(tiny_models.NAMED[opts.model])
    rows = []
    try:
        ref = serve_and_ask(model, 1, False, 8011, out / "server-gpu-tp1.log")
        got = serve_and_ask(model, opts.tp, True, 8012, out / f"server-hetero-tp{opts.tp}.log")
        for key in [k for k in ref if not k.startswith("_")]:
            rows.append((f"server {key}: hetero TP={opts.tp} == GPU TP=1", ref[key] == got.get(key),
                         repr(got.get(key))[:60]))
        rows.append(("hetero server shutdown", got["_exit"].startswith("exited"), got["_exit"]))
    except Exception as exc:  # report, do not hang
        rows.append(("server check", False, f"{type(exc).__name__}: {exc}"))
    print(f"\nserver check, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {sys.argv}")
    for name, ok, detail in rows:
        print(f"{name:<58}  {'PASS' if ok else 'FAIL':<6}  {detail}")
    (out / "server_check.json").write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
