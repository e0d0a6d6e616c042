"""Readers of vLLM's shared-memory message queues sleep instead of spinning, where the CPU ranks'
threads run on every core (``HETERO_SHIM_SHARE_CORES``).

Targets ``SpinCondition.__init__`` (``vllm.distributed.device_communicators.shm_broadcast``), the
wait of a ``MessageQueue`` reader: for ``busy_loop_s`` (1 s) after its last read it spins with
``sched_yield``, then sleeps on a zmq socket that the writer pings on every write. The engine core
reads its workers' replies and each worker reads the engine core's broadcasts through such
queues, so in a pipeline whose CPU stage takes tens of milliseconds a step, the engine core spins
through all of them (measured: 107 % of a core on the H100) on a core the plan reserves for it.
Where the plan gives the reserved cores to the CPU ranks' threads as well, a spinning reader
would displace one of those threads and every parallel region of the rank would wait for it.
This patch gives each reader of such a run its own wait: sleep on the writer's ping, at most 1 ms
at a time. Not ``busy_loop_s = 0`` (vLLM's idle mode for every wait): with two readers on one
queue (a pipeline's two ranks reading the engine core's broadcasts) pings got lost and a wait
ran into vLLM's 5-60 s poll timeout (reproduced on this repository's CI machine; a 3B pipeline on
the H200 made no progress for minutes that way); a lost ping costs 1 ms here.
Why: vLLM sizes its readers' spin for GPU workers that answer within a millisecond.
Remove when: vLLM lets the user choose the readers' spin time (not as of 0.32.0).
"""

from __future__ import annotations

from hetero_shim import run_state, versions
from hetero_shim.registry import Fact, Patch

WHY = "vLLM's message-queue readers spin for a second after each read, on cores a CPU rank may share"
REMOVE_WHEN = "vLLM lets the user choose how long its message-queue readers spin"
UPSTREAM = "SpinCondition readers spin with sched_yield for busy_loop_s = 1 s after a read, not configurable"
SHM_BROADCAST = "vllm.distributed.device_communicators.shm_broadcast"
TRIPWIRES = (
    Fact(SHM_BROADCAST, "SpinCondition.__init__", r"busy_loop_s: float = 1\b",
         "a reader spins for one second after each read by default"),
    Fact(SHM_BROADCAST, "SpinCondition.wait", r"self\.last_read \+ self\.busy_loop_s",
         "the reader's wait spins while the last read is less than busy_loop_s ago, then polls its socket"),
    Fact(SHM_BROADCAST, "SpinCondition.wait", r"self\.poller\.poll\(timeout=timeout_ms\)",
         "the reader sleeps on self.poller, which holds its notify and cancel sockets"),
    Fact(SHM_BROADCAST, "SpinCondition.wait", r"self\.local_notify_socket\.recv\(flags=zmq\.NOBLOCK, copy=False\)",
         "a ping is taken off self.local_notify_socket without blocking"),
)
NAP_MS = 1  # longest sleep of a reader's wait: a lost ping costs at most this


#: the last release whose source was checked for the target (no 0.33.0 wheel could be fetched since)
LAST_CHECKED = (0, 32, 0)


def rows(release: str) -> tuple[Patch, ...]:
    if versions.release_key(release) > LAST_CHECKED:
        return ()
    return (
        Patch("message-queue waits", SHM_BROADCAST, "SpinCondition.__init__", sleeping_reader, why=WHY,
              remove_when=REMOVE_WHEN, upstream=UPSTREAM, tripwires=TRIPWIRES),
    )


def sleeping_reader(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    state = run_state.current()
    shared = state.heterogeneous and state.plan is not None and state.plan.shared_cores
    if shared and getattr(instance, "is_reader", False):
        import types

        instance.wait = types.MethodType(napping_wait, instance)
    return result


def napping_wait(self, timeout_ms: int | None = None) -> None:
    """A reader's wait: sleep until the writer's ping (taken off the socket) or a cancel, at most
    ``NAP_MS``; the caller checks the queue again either way."""
    import zmq

    nap = NAP_MS if timeout_ms is None else max(0, min(NAP_MS, timeout_ms))
    events = dict(self.poller.poll(timeout=nap))
    if self.local_notify_socket in events and self.read_cancel_socket not in events:
        self.local_notify_socket.recv(flags=zmq.NOBLOCK, copy=False)
