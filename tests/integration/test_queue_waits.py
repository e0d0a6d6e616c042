"""Shared cores: vLLM's own message queue with the shim's reader wait (patches/startup/queue_waits.py).

The engine core broadcasts to a pipeline's two ranks through one queue with two readers, and reads
each rank's reply through its own. With ``busy_loop_s = 0`` (vLLM's idle mode for every wait) such
a ping-pong lost pings and waited seconds for messages already written; the shim's napping wait
must never. Real vLLM classes, real processes; only the pipeline's compute is a short sleep."""

import multiprocessing as mp
import random
import time

import pytest
import wrapt

from hetero_shim import settings
from hetero_shim.patches.startup import queue_waits
from hetero_shim.planning.plan import RankPlan, plan_to_json

shm_broadcast = pytest.importorskip("vllm.distributed.device_communicators.shm_broadcast")

ROUNDS = 150


def _run_environment(shared: bool) -> dict[str, str]:
    plan = RankPlan(2, 1, ((0, 1),), (2,), pp_size=2, layers=(1, 1), shared_cores=(2,) if shared else ())
    return {settings.DEVICE: settings.HETEROGENEOUS, settings.PLAN: plan_to_json(plan)}


@pytest.fixture
def patched():
    """The shim's wrapper on vLLM's SpinCondition.__init__, as the ledger applies it; removed after."""
    cls = shm_broadcast.SpinCondition
    original = cls.__dict__["__init__"]
    wrapt.wrap_function_wrapper(queue_waits.SHM_BROADCAST, "SpinCondition.__init__", queue_waits.sleeping_reader)
    yield
    cls.__init__ = original


def _rank(rank: int, handle, replies: mp.Queue, delay_s: float) -> None:
    broadcast = shm_broadcast.MessageQueue.create_from_handle(handle, rank)
    reply = shm_broadcast.MessageQueue(1, 1)
    replies.put((rank, reply.export_handle(), broadcast._spin_condition.wait.__func__ is queue_waits.napping_wait))
    broadcast.wait_until_ready()
    reply.wait_until_ready()
    while (message := broadcast.dequeue(indefinite=True)) is not None:
        time.sleep(delay_s * random.random())
        reply.enqueue((rank, message))


@pytest.mark.parametrize("shared", [True, False])
def test_two_readers_never_wait_for_a_lost_ping(monkeypatch, patched, shared):
    for name, value in _run_environment(shared).items():
        monkeypatch.setenv(name, value)  # the ranks inherit it, as vLLM's workers do
    ctx = mp.get_context("fork")  # the ranks inherit the wrapper (a spawned one would activate the whole shim)
    broadcast = shm_broadcast.MessageQueue(2, 2)
    replies = ctx.Queue()
    ranks = [ctx.Process(target=_rank, args=(r, broadcast.export_handle(), replies, d)) for r, d in ((0, 0.02), (1, 0.003))]
    for p in ranks:
        p.start()
    try:
        got = sorted(replies.get(timeout=60) for _ in ranks)
        assert [napping for _, _, napping in got] == [shared, shared]  # only a shared-core run naps
        readers = [shm_broadcast.MessageQueue.create_from_handle(handle, 0) for _, handle, _ in got]
        assert all((r._spin_condition.wait.__func__ is queue_waits.napping_wait) == shared for r in readers)
        broadcast.wait_until_ready()
        for r in readers:
            r.wait_until_ready()
        worst = 0.0
        for i in range(ROUNDS):
            start = time.perf_counter()
            broadcast.enqueue(i)
            assert [r.dequeue(timeout=30) for r in readers] == [(0, i), (1, i)]
            worst = max(worst, time.perf_counter() - start)
        broadcast.enqueue(None)
        assert worst < 0.5, f"a round trip took {worst:.2f} s: a reader slept through its ping"
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
