"""Confining the engine core and GPU-rank processes (hetero_shim/affinity.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from hetero_shim import affinity, settings
from hetero_shim.errors import HeteroConfigError
from hetero_shim.planning.plan import Cpu, RankPlan, parse_id_list

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_only_runs_with_gpu_and_cpu_ranks_and_reserved_cores(monkeypatch):
    monkeypatch.delenv(settings.CONFINE, raising=False)
    mixed = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((2, 3),), reserved=(0, 1))
    assert affinity.confines(mixed)
    assert not affinity.confines(None)
    assert not affinity.confines(RankPlan(world_size=2, gpu_ranks=0, cpu_lists=((0,), (1,)), reserved=(2,)))
    assert not affinity.confines(RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((0, 1),)))  # nothing reserved
    monkeypatch.setenv(settings.CONFINE, "0")
    assert not affinity.confines(mixed)
    monkeypatch.setenv(settings.CONFINE, "sometimes")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_CONFINE='sometimes' is not understood"):
        affinity.confines(mixed)


def test_reserved_cores_bring_their_smt_siblings(monkeypatch):
    # 4 cores x 2 threads: logical CPUs i and i+4 share core i; the plan names the higher id per core
    cpus = [Cpu(0, i, i % 4) for i in range(8)]
    monkeypatch.setattr(affinity.node, "allowed_cpus", lambda: cpus)
    plan = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((4, 5),), reserved=(6, 7))
    assert affinity.reserved_cpus(plan) == [2, 3, 6, 7]


def test_every_thread_is_confined_and_a_worker_takes_its_cores_from_the_environment():
    """A real process: a thread started before confinement moves too; a worker leaves its
    parent's mask for the cores it was given (a CPU rank must widen past the engine core's)."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    first = min(os.sched_getaffinity(0))
    everything = sorted(os.sched_getaffinity(0))
    code = textwrap.dedent(f"""
        import os, sys, threading, subprocess
        from hetero_shim import affinity
        stop = threading.Event()
        worker = threading.Thread(target=stop.wait); worker.start()
        assert affinity.confine_this_process([{first}])
        masks = {{int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}}
        stop.set(); worker.join()
        assert len(masks) >= 2 and all(m == [{first}] for m in masks.values()), masks
        env = dict(os.environ, HETERO_SHIM_PROCESS_CPUS="{','.join(map(str, everything))}")
        child = ("from hetero_shim import affinity; import os; affinity.confine_from_environment(); "
                 "print(sorted(os.sched_getaffinity(0)))")
        print(subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True).stdout)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(everything)


def test_cpu_lists_beyond_linux_limit_are_refused_before_expanding():
    with pytest.raises(HeteroConfigError, match="beyond Linux's limit"):
        parse_id_list("0-999999999")
    assert parse_id_list("8190-8191") == [8190, 8191]
