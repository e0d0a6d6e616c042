"""Shared-memory collectives (hetero_shim.collectives.shm) on 2 and 3 real processes with gloo.

The worker script (shm_check.py) checks results bit for bit; here each scenario runs in its own
session, must leave no process and no segment in /dev/shm behind."""

import os
import re

import pytest

import procs

CHECK = str(procs.REPO / "tests" / "integration" / "shm_check.py")
PREFIX = f"hetero_shim_{os.getuid()}_"


def segments() -> set[str]:
    return {e for e in os.listdir("/dev/shm") if e.startswith(PREFIX)}


def run_check(world: int, scenario: str, timeout: float = 180):
    before = segments()
    proc = procs.run_python([CHECK, str(world), scenario], timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert segments() - before == set(), "segments left in /dev/shm"
    return proc.stdout


@pytest.mark.parametrize("world", [2, 3])
def test_results_are_exact(world):
    """fp32/bf16/fp16/int32, odd sizes, sizes above the slot, repeats, two groups, gather dims, broadcast from each rank."""
    out = run_check(world, "exact")
    assert all(f"RANK{r} OK" in out for r in range(world)), out[-4000:]


def test_rank_that_never_arrives_is_named_within_the_deadline():
    out = run_check(3, "stuck")
    messages = re.findall(r"RANK\d MESSAGE (.*)", out)
    assert len(messages) == 2, out[-4000:]  # both waiting ranks name rank 2
    assert all("group rank(s) [2] did not arrive within 3 s" in m for m in messages), messages
    assert all(f"RANK{r} OK" in out for r in range(3)), out[-4000:]


def test_rank_that_exits_is_named_at_once():
    out = run_check(2, "killed")
    assert re.search(r"RANK0 MESSAGE .*group rank 1 \(pid \d+\) died \(the process exited before arriving\)", out), out[-4000:]
