"""Start method: always ``spawn`` in heterogeneous mode.

Targets ``get_mp_context`` (``vllm.utils.system_utils``) and the modules that imported it
by name. Why: a CPU rank must pick vLLM's CPU platform in a fresh interpreter, and a forked
child would inherit the parent's platform and any CUDA state.
Remove when: vLLM spawns per-platform workers itself (not as of 0.33.0).
"""

from __future__ import annotations

import multiprocessing
import os

from hetero_shim import settings

WHY = "CPU ranks need a fresh interpreter to take the CPU platform; fork would inherit CUDA state"
REMOVE_WHEN = "vLLM spawns per-platform workers itself (not as of 0.33.0)"


def force_spawn(wrapped, instance, args, kwargs):
    context = wrapped(*args, **kwargs)
    if settings.heterogeneous() and context.get_start_method() != "spawn":
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        return multiprocessing.get_context("spawn")
    return context
