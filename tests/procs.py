"""Run a child process in its own session and make sure nothing of it outlives the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hetero_shim.testing.proctree import SessionTimeout, kill_session, run_session, session_pids, wait_session_gone

__all__ = ["REPO", "kill_session", "python_env", "run", "run_python", "session_pids", "wait_session_gone"]

REPO = Path(__file__).resolve().parents[1]


def python_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HETERO_SHIM_")}
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run to completion; on timeout kill the whole session and fail loudly.

    After it returns, asserts that no process of its session is left behind.
    """
    try:
        result, left = run_session(args, timeout, env=env, cwd=cwd)
    except SessionTimeout as e:
        raise AssertionError(f"{e}; output tail:\n{e.output[-4000:]}") from None
    if left:
        raise AssertionError(f"{args} left processes behind: {left}\n{result.stdout[-4000:]}")
    return result


def run_python(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, *args], python_env(**env), timeout)
