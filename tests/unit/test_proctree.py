"""run_session: a child in its own session, its output, a timeout, and what it leaves behind."""

import sys
import time
from pathlib import Path

import pytest

from hetero_shim.testing.proctree import SessionTimeout, run_session


def test_output_and_exit_status():
    result, left = run_session([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                               timeout=60)
    assert result.returncode == 3 and "out" in result.stdout and "err" in result.stdout and left == []


def test_timeout_kills_the_session_and_keeps_the_output():
    start = time.monotonic()
    with pytest.raises(SessionTimeout) as caught:
        run_session([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], timeout=3)
    assert "started" in caught.value.output and time.monotonic() - start < 30


def test_a_process_left_behind_is_named_and_killed():
    # the grandchild lets go of the output pipe, as a daemon would; it stays in the session
    child = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid, flush=True)")
    result, left = run_session([sys.executable, "-c", child], timeout=60, grace=1)
    orphan = int(result.stdout.split()[0])
    assert left == [orphan]
    deadline = time.monotonic() + 10
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(orphan)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
