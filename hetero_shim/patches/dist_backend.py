"""Distributed backend: gloo for every rank, GPU and CPU, in heterogeneous mode.

Targets ``init_worker_distributed_environment`` (``vllm.v1.worker.gpu_worker``), which both
the GPU and the CPU worker call with their platform's backend; the world group, and every
group vLLM builds from it (TP, PP, DP, EP), take the backend of the world group.
Why: NCCL cannot include CPU ranks, so all ranks must agree on gloo.
Remove when: vLLM supports mixed-device process groups (not as of 0.33.0).
"""

from __future__ import annotations

import inspect

from hetero_shim import settings

WHY = "NCCL cannot include CPU ranks; every rank must use one backend"
REMOVE_WHEN = "vLLM supports process groups mixing CUDA and CPU ranks (not as of 0.33.0)"


def gloo_for_all_ranks(wrapped, instance, args, kwargs):
    if not settings.heterogeneous():
        return wrapped(*args, **kwargs)
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.arguments["backend"] = "gloo"
    return wrapped(*bound.args, **bound.kwargs)
