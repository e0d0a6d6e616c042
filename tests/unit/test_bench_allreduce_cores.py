"""bench/allreduce.py's core split: ``plan`` gives its ranks the cores heterogeneous mode would give
one GPU rank and its CPU ranks (the GPU rank: the reserved cores), ``even`` equal blocks."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import allreduce  # noqa: E402
from hetero_shim import settings  # noqa: E402
from hetero_shim.planning import build  # noqa: E402
from hetero_shim.planning.plan import Cpu  # noqa: E402


@pytest.fixture
def host16(monkeypatch):
    monkeypatch.setattr(build.node, "allowed_cpus", lambda: [Cpu(node=0, id=i, core=i) for i in range(16)])
    monkeypatch.setattr(allreduce.os, "sched_getaffinity", lambda pid: set(range(16)))
    for name in (settings.OMP_BIND, settings.PLAN):  # set, then removed: restored after the test (build_plan sets PLAN)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.parametrize("cpu_ranks", [1, 3])
def test_plan_split_is_the_shims_plan_with_one_gpu_rank(host16, cpu_ranks):
    world = 1 + cpu_ranks
    split = [allreduce.cores_for(r, world, "plan") for r in range(world)]
    plan = build.build_plan(world, gpus_on_node=1)
    assert plan.gpu_ranks == 1
    assert split[0] == list(plan.reserved) and split[1:] == [list(c) for c in plan.cpu_lists]
    assert sorted(sum(split, [])) == list(range(16))  # disjoint, every core used
    if cpu_ranks == 1:
        assert split == [[13, 14, 15], list(range(13))]


def test_even_split_is_equal_blocks(host16):
    assert [allreduce.cores_for(r, 2) for r in range(2)] == [list(range(8)), list(range(8, 16))]
    assert [len(allreduce.cores_for(r, 4, "even")) for r in range(4)] == [4, 4, 4, 4]
