"""CPU ranks' KV cache budget in heterogeneous mode: the user's settings, and NUMA nodes shared.

Targets ``CPUWorker.determine_available_memory`` (``vllm.v1.worker.cpu_worker``), which
reports the bytes a CPU rank can give its KV cache; the engine core then takes the
smallest report over all ranks (see ``kv_cache_agreement``), GPU ranks included.

A CPU rank's budget, first match wins:
1. ``VLLM_CPU_KVCACHE_SPACE`` (GiB): vLLM's CPU platform turns it into
   ``kv_cache_memory_bytes`` in its own config step, which never runs when the engine is a
   CUDA build; here it is applied in the CPU rank itself. GPU ranks ignore it.
2. ``--kv-cache-memory-bytes`` / ``kv_cache_memory_bytes=`` (every rank, GPU ranks too).
3. vLLM's CPU default, ``gpu_memory_utilization`` x the NUMA node's memory minus what the
   rank already uses, divided by the number of CPU ranks sharing that NUMA node (stock
   vLLM gives every CPU rank a node of its own, so each one would claim the same 90%).

Why: without it a CUDA build ignores VLLM_CPU_KVCACHE_SPACE, and CPU ranks sharing a node
each size their KV cache for the whole node.
Remove when: vLLM sizes KV per CPU rank when ranks share a NUMA node, and applies the CPU
settings in CPU workers of a CUDA build (not as of 0.33.0).
"""

from __future__ import annotations

import math
import os

from hetero_shim import mode, node, settings
from hetero_shim.logs import log

WHY = "a CUDA build ignores VLLM_CPU_KVCACHE_SPACE; CPU ranks sharing a NUMA node would each claim 90% of it"
REMOVE_WHEN = "vLLM sizes the KV cache per CPU rank on shared NUMA nodes (not as of 0.33.0)"
CPU_KVCACHE_SPACE = "VLLM_CPU_KVCACHE_SPACE"
GIB = 1 << 30


def ranks_sharing_my_node(rank: int) -> int:
    """CPU ranks of the plan whose cores are on the NUMA node of ``rank``'s first core (>= 1)."""
    plan = mode.current_plan()
    if plan is None or not plan.cpu_lists:
        return max(1, len(plan.cpu_ranks)) if plan else 1
    nodes = [node.numa_node(cores[0]) if cores else -1 for cores in plan.cpu_lists]
    index = rank - plan.gpu_ranks
    if not 0 <= index < len(nodes):
        return 1
    return max(1, nodes.count(nodes[index]))


def size_cpu_kv_cache(wrapped, instance, args, kwargs):
    if not settings.heterogeneous():
        return wrapped(*args, **kwargs)
    cache = instance.cache_config
    space = os.environ.get(CPU_KVCACHE_SPACE, "").strip()
    if space:
        try:
            cache.kv_cache_memory_bytes = int(space) * GIB
        except ValueError:
            raise ValueError(f"{CPU_KVCACHE_SPACE}={space!r} is not a whole number of GiB") from None
        source = f"{CPU_KVCACHE_SPACE}={space}"
    elif cache.kv_cache_memory_bytes is not None:
        source = "kv_cache_memory_bytes"
    else:
        sharers = ranks_sharing_my_node(instance.rank)
        if sharers > 1 and hasattr(instance, "requested_cpu_memory"):
            instance.requested_cpu_memory = math.ceil(instance.requested_cpu_memory / sharers)
        source = f"gpu_memory_utilization={cache.gpu_memory_utilization} of the NUMA node, shared by {sharers} CPU rank(s)"
    budget = wrapped(*args, **kwargs)
    log.info("hetero_shim: CPU rank %d KV cache budget %.3f GiB (%s)", instance.rank, budget / GIB, source)
    return budget
