"""The processes of a run started in its own session: list them, kill them, wait until gone.

Used by the tests, the GPU checks, the fault and load checks and the benchmark harness, which
all start vLLM with ``start_new_session=True`` and must leave no process behind. Linux /proc only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session or process group is ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and sid in (int(fields[2]), int(fields[3])):
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL the process group ``sid`` (nothing happens if it is gone)."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_session_gone(sid: int, timeout: float = 30.0, poll: float = 0.25) -> list[int]:
    """Wait up to ``timeout`` seconds for session ``sid`` to be empty; return what is still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not session_pids(sid):
            return []
        time.sleep(poll)
    return session_pids(sid)


class SessionTimeout(Exception):
    """A ``run_session`` child did not finish in time; its session was killed. ``output``: what it printed."""

    def __init__(self, args: list[str], timeout: float, output: str) -> None:
        super().__init__(f"{args} did not finish in {timeout:.0f} s")
        self.output = output


def run_session(args: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None,
                grace: float = 30.0) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run ``args`` to completion in a session of its own, stdout and stderr merged into ``stdout``.
    On timeout the session is killed and ``SessionTimeout`` raised. Returns the result and the pids
    of its session still alive ``grace`` seconds after it ended (those are killed before returning)."""
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, _ = proc.communicate()
        raise SessionTimeout(args, timeout, out) from None
    left = wait_session_gone(proc.pid, timeout=grace)
    if left:
        kill_session(proc.pid)
    return subprocess.CompletedProcess(args, proc.returncode, out, ""), left
