"""CPU ranks' memory for the KV cache in heterogeneous mode: the user's settings, NUMA nodes shared.

Applied by the worker-selection patch (``WorkerWrapperBase.init_worker``) to a CPU rank's own
copy of the engine config, before vLLM constructs its ``CPUWorker``. The worker then
reports its KV budget, and the engine core takes the smallest report over all ranks, GPU
ranks included (logged by ``kv_cache_agreement``).

A CPU rank's budget, first match wins:
1. ``VLLM_CPU_KVCACHE_SPACE`` (GiB): vLLM's CPU platform turns it into
   ``kv_cache_memory_bytes`` in its own config step, which never runs when the engine is a
   CUDA build; here it is applied in the CPU rank itself. GPU ranks ignore it.
2. ``--kv-cache-memory-bytes`` / ``kv_cache_memory_bytes=`` (every rank, GPU ranks too).
3. Otherwise vLLM's CPU sizing with the memory fraction ``gpu_memory_utilization`` taken of
   the memory the rank's NUMA node has *available* at start-up (not its total) and divided
   by the CPU ranks sharing that node. Stock vLLM gives every CPU rank a node of its own and
   asks for the fraction of the node's total, so ranks sharing a node would each claim it,
   and a node already partly used by the GPU rank's process fails vLLM's start-up check.

Why: without this a CUDA build ignores VLLM_CPU_KVCACHE_SPACE, and with the default
``gpu_memory_utilization`` (meant for the GPU) CPU ranks fail at start-up or over-claim.
Remove when: vLLM sizes CPU ranks' memory when they share a NUMA node and applies the CPU
settings in CPU workers of a CUDA build (not as of 0.33.0).
"""

from __future__ import annotations

import os

from hetero_shim import mode, node
from hetero_shim.logs import log

CPU_KVCACHE_SPACE = "VLLM_CPU_KVCACHE_SPACE"
GIB = 1 << 30


def ranks_sharing_node_of(rank: int) -> tuple[int, int]:
    """(NUMA node of ``rank``'s first core, CPU ranks of the plan with cores on that node)."""
    plan = mode.current_plan()
    if plan is None or not plan.cpu_lists:
        return 0, max(1, len(plan.cpu_ranks)) if plan else 1
    nodes = [node.numa_node(cores[0]) if cores else 0 for cores in plan.cpu_lists]
    index = rank - plan.gpu_ranks
    if not 0 <= index < len(nodes):
        return 0, 1
    return nodes[index], nodes.count(nodes[index])


def configure_cpu_rank(cache_config, rank: int) -> str:
    """Set this CPU rank's KV budget inputs on its config; return where the budget comes from."""
    space = os.environ.get(CPU_KVCACHE_SPACE, "").strip()
    if space:
        try:
            cache_config.kv_cache_memory_bytes = int(space) * GIB
        except ValueError:
            raise ValueError(f"{CPU_KVCACHE_SPACE}={space!r} is not a whole number of GiB") from None
        source = f"{CPU_KVCACHE_SPACE}={space}"
    elif cache_config.kv_cache_memory_bytes is not None:
        source = f"kv_cache_memory_bytes={cache_config.kv_cache_memory_bytes}"
    else:
        from vllm.utils.cpu_resource_utils import get_memory_node_info

        numa, sharers = ranks_sharing_node_of(rank)
        info = get_memory_node_info(numa)
        fraction = cache_config.gpu_memory_utilization * info.available_memory / info.total_memory / sharers
        source = (f"{cache_config.gpu_memory_utilization} of NUMA node {numa}'s available "
                  f"{info.available_memory / GIB:.1f} GiB, shared by {sharers} CPU rank(s)")
        cache_config.gpu_memory_utilization = fraction
    log.info("hetero_shim: CPU rank %d KV cache budget from %s", rank, source)
    return source
