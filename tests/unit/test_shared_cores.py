"""Sharing the reserved cores with the CPU ranks (HETERO_SHIM_SHARE_CORES): the plan it builds, and
the doorbell a GPU rank sleeps on while the CPU stage works."""

import mmap
import os
import time

import pytest

from hetero_shim import settings
from hetero_shim.collectives.doorbell import Doorbell
from hetero_shim.planning import build
from hetero_shim.planning.layer_split import LayerSplit
from hetero_shim.planning.plan import Cpu, plan_from_json, plan_to_json


@pytest.fixture
def host16(monkeypatch):
    monkeypatch.setattr(build.node, "allowed_cpus", lambda: [Cpu(node=0, id=i, core=i) for i in range(16)])
    for name in (settings.OMP_BIND, settings.PLAN, settings.SHARE_CORES):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_pipeline_plan_shares_only_when_asked(host16):
    split = LayerSplit((14, 14), "test")
    plain = build.build_plan(2, 1, split)
    assert plain.cpu_lists == (tuple(range(13)),) and plain.reserved == (13, 14, 15) and not plain.shared_cores
    host16.setenv(settings.SHARE_CORES, "1")
    shared = build.build_plan(2, 1, split)
    assert shared.cpu_lists == (tuple(range(16)),)
    assert shared.reserved == shared.shared_cores == (13, 14, 15)  # the engine core and GPU rank stay confined there
    assert plan_from_json(plan_to_json(shared)) == shared
    assert "shared with the CPU ranks' threads: 13-15" in shared.describe()


def test_tensor_parallel_plan_never_shares(host16):
    host16.setenv(settings.SHARE_CORES, "1")
    plan = build.build_plan(2, 1)
    assert plan.cpu_lists == (tuple(range(13)),) and not plan.shared_cores


def test_bad_share_value_is_one_clear_error(host16):
    host16.setenv(settings.SHARE_CORES, "sometimes")
    with pytest.raises(Exception, match="HETERO_SHIM_SHARE_CORES='sometimes' is not understood; use 1 or 0"):
        settings.share_cores()


def test_doorbell_wait_returns_at_once_when_the_count_moved():
    mm = mmap.mmap(-1, 4096)
    bell = Doorbell(mm, 832)
    seen = bell.count
    bell.ring()
    start = time.perf_counter()
    bell.wait(seen, 5.0)
    assert time.perf_counter() - start < 0.5 and bell.count == seen + 1


def test_doorbell_wait_times_out_without_a_ring():
    bell = Doorbell(mmap.mmap(-1, 4096), 0)
    start = time.perf_counter()
    bell.wait(bell.count, 0.2)
    assert 0.15 < time.perf_counter() - start < 2.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_ring_wakes_a_sleeper_in_another_process():
    mm = mmap.mmap(-1, 4096)  # MAP_SHARED: the child sees the parent's stores
    bell = Doorbell(mm, 64)
    assert bell.futex  # Linux x86-64 / aarch64: the futex path, not the 50 us nap
    seen = bell.count
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sleeper: one wait of up to 10 s; reports how long it slept
        os.close(read)
        start = time.perf_counter()
        Doorbell(mm, 64).wait(seen, 10.0)
        os.write(write, f"{time.perf_counter() - start:.3f}".encode())
        os._exit(0)
    os.close(write)
    time.sleep(0.3)
    bell.ring()
    slept = float(os.read(read, 64))
    os.waitpid(pid, 0)
    assert 0.2 < slept < 5.0  # woke by the ring, long before its 10 s limit
