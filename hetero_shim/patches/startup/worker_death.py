"""Worker death at start-up: say which rank died instead of "see stack trace for root cause".

Targets ``WorkerProc.wait_for_ready`` (``vllm.v1.executor.multiproc_executor``, a staticmethod
taking ``unready_proc_handles``, each with ``.proc`` and ``.rank``; same in 0.26.0 .. 0.33.0).
Why: when a worker process dies before it reports ready (killed, out of memory, a crash in a
native kernel), stock vLLM raises "WorkerProc initialization failed due to an exception in a
background process. See stack trace for root cause." There is no stack trace of a killed
process, and nothing names the rank. In heterogeneous mode the rank's kind matters (a CPU
rank of a GPU node is the likely victim of the host's OOM killer), so the error names the
rank, its kind, its pid and how it ended. Once the workers are ready, vLLM's own monitor
names a dead worker ("Worker proc VllmWorker-1 died unexpectedly"); this patch adds nothing then.
Remove when: vLLM names the dead worker in this error itself (not as of 0.33.0).
"""

from __future__ import annotations

import signal
import time

from hetero_shim import run_state
from hetero_shim.arguments import Params
from hetero_shim.errors import WorkerDiedAtStartup
from hetero_shim.registry import Fact, Patch

WHY = "vLLM's start-up error for a dead worker names no rank"
REMOVE_WHEN = "vLLM names the dead worker in its start-up error"
UPSTREAM = 'a worker that dies before it is ready gives "See stack trace for root cause", naming no rank'
WAIT_FOR_READY = Params(unready_proc_handles=0)  # a staticmethod
NAMES_NO_RANK = Fact("vllm.v1.executor.multiproc_executor", "WorkerProc.wait_for_ready", r"See stack trace for root cause",
                     "wait_for_ready reports a dead worker without its rank")


def rows(release: str) -> tuple[Patch, ...]:
    return (
        Patch("worker death at start-up", "vllm.v1.executor.multiproc_executor", "WorkerProc.wait_for_ready",
              name_dead_rank_at_start, why=WHY, remove_when=REMOVE_WHEN, upstream=UPSTREAM,
              tripwires=(NAMES_NO_RANK,), params=WAIT_FOR_READY),
    )


def how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def describe_dead(handles) -> list[str]:
    """One phrase per handle whose process has ended: 'CPU rank 1 (pid 123, killed by SIGKILL)'."""
    plan = run_state.plan()
    dead = []
    for handle in handles:
        proc = handle.proc
        if proc.exitcode is None and proc.is_alive():
            continue
        kind = plan.kind(handle.rank).upper() if plan and 0 <= handle.rank < plan.world_size else "worker"
        dead.append(f"{kind} rank {handle.rank} (pid {proc.pid}, {how_it_ended(proc.exitcode)})")
    return dead


def name_dead_rank_at_start(wrapped, instance, args, kwargs):
    if not run_state.heterogeneous():
        return wrapped(*args, **kwargs)
    handles = list(WAIT_FOR_READY.get(args, kwargs, "unready_proc_handles"))
    try:
        return wrapped(*args, **kwargs)
    except Exception as exc:
        # The pipe closes a moment before the dead process can be reaped: give it two seconds.
        deadline = time.monotonic() + 2.0
        while not (dead := describe_dead(handles)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not dead:
            raise
        raise WorkerDiedAtStartup(
            f"hetero_shim: {', '.join(dead)} ended during engine start-up, before it was ready; "
            "the engine cannot start without every tensor-parallel rank"
        ) from exc
