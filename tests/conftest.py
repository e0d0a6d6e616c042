import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHM = Path("/dev/shm")


def _shim_segments() -> set[str]:
    try:
        return {p.name for p in SHM.iterdir() if p.name.startswith("hetero_shim_")}
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def no_shim_segment_left():
    """Every test, the kill tests included: no shared-memory segment of the shim stays in /dev/shm."""
    before = _shim_segments()
    yield
    left = _shim_segments() - before
    assert not left, f"shared-memory segments of the shim left in /dev/shm: {sorted(left)} (pid {os.getpid()})"
