"""Keeping the other processes of a GPU + CPU run off the CPU ranks' cores.

The rank plan gives each CPU rank its own cores and keeps ``reserved`` cores for everything
else: the engine core and the GPU ranks' worker processes. Nothing made them stay there. Both
busy-wait between steps (vLLM's shared-memory message queue spins with ``sched_yield`` for up to
a second after each read), and a spinning process that the kernel puts on a CPU rank's core
time-shares that core with one of the rank's OpenMP threads, so every parallel region of the rank
waits for that thread.

So, in a run with GPU and CPU ranks and reserved cores (``HETERO_SHIM_CONFINE=0`` turns it off):
- the engine core confines itself (every thread) to the reserved cores, with their SMT siblings,
  before it starts the workers;
- each worker gets ``HETERO_SHIM_PROCESS_CPUS`` at spawn (GPU ranks: the reserved cores; CPU
  ranks: their own cores) and confines itself to it when the shim activates in it, before torch
  and its OpenMP runtime load (a child inherits the engine core's mask, and a CPU rank must
  leave it for its own cores).
Linux only (``os.sched_setaffinity``); a mask the kernel refuses is logged and left as it was.
"""

from __future__ import annotations

import os

from hetero_shim import settings
from hetero_shim.logs import log
from hetero_shim.planning import node
from hetero_shim.planning.plan import RankPlan, format_id_list, parse_id_list


def confines(plan: RankPlan | None) -> bool:
    """Whether the processes of this run are confined (GPU and CPU ranks, reserved cores, not turned off)."""
    return (plan is not None and bool(plan.reserved) and 0 < plan.gpu_ranks < plan.world_size
            and settings.confine_processes())


def reserved_cpus(plan: RankPlan) -> list[int]:
    """The plan's reserved cores with their SMT siblings (the plan names one logical CPU per core)."""
    cpus = node.allowed_cpus()
    keys = {(c.node, c.core) for c in cpus if c.id in plan.reserved}
    return sorted({c.id for c in cpus if (c.node, c.core) in keys} | set(plan.reserved))


def confine_this_process(cpus: list[int]) -> bool:
    """Set the affinity of every thread of this process to ``cpus``; False (logged) if refused."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]
    for task in tasks:
        try:
            os.sched_setaffinity(task, cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as exc:
            log.warning("hetero_shim: could not confine this process to CPUs %s (%s); left as it was",
                        format_id_list(cpus), exc)
            return False
    return True


def confine_from_environment() -> None:
    """In a worker process: confine it to ``HETERO_SHIM_PROCESS_CPUS`` if the engine core set it."""
    raw = os.environ.get(settings.PROCESS_CPUS, "").strip()
    if raw:
        confine_this_process(parse_id_list(raw))
