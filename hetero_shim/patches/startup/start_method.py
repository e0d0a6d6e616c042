"""Start method: vLLM's workers are spawned in heterogeneous mode; nothing else changes.

Targets ``get_mp_context`` (``vllm.utils.system_utils``) where the multiprocessing executor
imported it (``vllm.v1.executor.multiproc_executor``), the one place vLLM starts its workers.
The engine core keeps vLLM's own choice (fork on a CUDA host when CUDA is not initialized, so a
script without a ``__main__`` guard works as it does with stock vLLM). A worker spawned from
such a script does not import the script again (``main_guard.main_hidden``, applied by the
rank-process patch), and where vLLM would spawn the engine core itself from an unguarded
script (the CPU build) the engine config is refused with one line saying to add the guard.
Why: a CPU rank must take vLLM's CPU platform in a fresh interpreter; a forked child would
inherit the parent's platform and any CUDA state.
Remove when: vLLM spawns per-platform workers itself (not as of 0.33.0).
"""

from __future__ import annotations

import multiprocessing

from hetero_shim import run_state
from hetero_shim.registry import Fact, Patch

WHY = "CPU ranks need a fresh interpreter to take the CPU platform; fork would inherit CUDA state"
REMOVE_WHEN = "vLLM spawns per-platform workers itself"
UPSTREAM = "one start method for all workers: `VLLM_WORKER_MULTIPROC_METHOD`, default fork (spawn once CUDA is initialized)"
TRIPWIRES = (
    Fact("vllm.utils.system_utils", "get_mp_context", r"mp_method = envs\.VLLM_WORKER_MULTIPROC_METHOD\b",
         "the workers' start method follows VLLM_WORKER_MULTIPROC_METHOD"),
    Fact("vllm.envs", "environment_variables", r'"VLLM_WORKER_MULTIPROC_METHOD",\s*"fork"',
         "VLLM_WORKER_MULTIPROC_METHOD defaults to fork"),
)


def rows(release: str) -> tuple[Patch, ...]:
    return (
        Patch("start method", "vllm.utils.system_utils", "get_mp_context", spawn_workers, why=WHY,
              remove_when=REMOVE_WHEN, upstream=UPSTREAM, tripwires=TRIPWIRES,
              aliases=("vllm.v1.executor.multiproc_executor",), wrap_primary=False),
    )


def spawn_workers(wrapped, instance, args, kwargs):
    context = wrapped(*args, **kwargs)
    if run_state.heterogeneous() and context.get_start_method() != "spawn":
        return multiprocessing.get_context("spawn")
    return context
