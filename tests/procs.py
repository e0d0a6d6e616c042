"""Run a child process in its own session and make sure nothing of it outlives the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HETERO_SHIM_")}
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def session_pids(pgid: int) -> list[int]:
    """Live processes of the session/process group ``pgid`` (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp, sid = fields[0], int(fields[2]), int(fields[3])
        if state != "Z" and (pgrp == pgid or sid == pgid):
            pids.append(int(entry.name))
    return pids


def kill_session(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_session_gone(pgid: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = session_pids(pgid)
        if not left:
            return []
        time.sleep(0.5)
    return session_pids(pgid)


def run(args: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run to completion; on timeout kill the whole session and fail loudly.

    After it returns, asserts that no process of its session is left behind.
    """
    proc = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"{args} did not finish in {timeout}s; output tail:\n{out[-4000:]}") from None
    left = wait_session_gone(proc.pid, timeout=30)
    if left:
        kill_session(proc.pid)
        raise AssertionError(f"{args} left processes behind: {left}\n{out[-4000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def run_python(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, *args], python_env(**env), timeout)
