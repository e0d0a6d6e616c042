"""CPU workers: cores per CPU rank from the rank plan, and a missing env op tolerated.

Targets
- the NUMA auto-bind (``OMPProcessManager._get_autobind_cpu_ids`` in
  ``vllm.utils.ompmultiprocessing``, 0.32+): stock vLLM gives every local rank its own
  NUMA node and asserts when there are fewer nodes than ranks. In heterogeneous mode the
  CPU ranks get the cores of the rank plan instead (nodes shared round-robin, cores split,
  no core given twice, cores kept free for the engine core and GPU ranks' processes).
- the CPU worker's constructor, which calls vLLM's thread/memory environment op
  (``torch.ops._C.init_cpu_memory_env`` in 0.26+): when the loaded kernels lack it, a no-op
  stands in with a warning instead of an AttributeError deep inside the worker.
- the memory figures vLLM's CPU worker checks its KV cache against
  (``get_memory_node_info`` as ``vllm.v1.worker.cpu_worker`` imported it): where the NUMA nodes'
  meminfo does not add up to the host's (VMs, some containers), a CPU rank gets the host's
  cgroup-aware figures instead, the same ones its budget was planned with (``node.host_memory``).
Why: one-NUMA-node hosts cannot run TP > 1 on CPU with auto-binding; a CUDA build of vLLM
has no CPU ops at all; a VM's NUMA meminfo can report a fraction of the memory.
Remove when: vLLM shares NUMA nodes between CPU ranks itself (not as of 0.33.0).
"""

from __future__ import annotations

from hetero_shim import run_state
from hetero_shim.arguments import Params
from hetero_shim.logs import log
from hetero_shim.registry import Fact, Patch

WHY_BIND = "stock auto-bind needs one NUMA node per CPU rank"
REMOVE_WHEN_BIND = "vLLM shares NUMA nodes between CPU ranks itself"
UPSTREAM_BIND = "auto-bind gives each local CPU rank a NUMA node of its own and asserts there are enough"
WHY_OP = "the CPU env op is missing when the CPU kernels are not loaded (CUDA wheel)"
REMOVE_WHEN_OP = "never needed with vLLM's own CPU build; drop when CPU ranks always load it"
UPSTREAM_OP = "the CPU worker's constructor calls `torch.ops._C.init_cpu_memory_env`, a CPU-build op"
WHY_MEMORY = "a VM's NUMA meminfo can report a fraction of the host's memory; vLLM checks the KV cache against it"
REMOVE_WHEN_MEMORY = "vLLM checks CPU memory against MemAvailable where NUMA meminfo is incomplete"
UPSTREAM_MEMORY = "the CPU worker checks its KV cache against the NUMA node's meminfo (`get_memory_node_info`)"

ENV_OP = "init_cpu_memory_env"  # vLLM 0.26 .. 0.33: torch.ops._C.init_cpu_memory_env([node])
CPU_WORKER = "vllm.v1.worker.cpu_worker"
MEMORY_NODE_INFO = Params(node_id=0)


def rows(release: str) -> tuple[Patch, ...]:
    return (
        Patch("CPU worker: cores", "vllm.utils.ompmultiprocessing", "OMPProcessManager._get_autobind_cpu_ids",
              bind_cores_from_plan, why=WHY_BIND, remove_when=REMOVE_WHEN_BIND, upstream=UPSTREAM_BIND,
              tripwires=(Fact("vllm.utils.ompmultiprocessing", "OMPProcessManager._get_autobind_cpu_ids",
                              r"Not enough allowed NUMA nodes", "auto-bind asserts one NUMA node per local CPU rank"),)),
        Patch("CPU worker: env op", CPU_WORKER, "CPUWorker.__init__", tolerate_missing_env_op, why=WHY_OP,
              remove_when=REMOVE_WHEN_OP, upstream=UPSTREAM_OP,
              tripwires=(Fact(CPU_WORKER, "CPUWorker.__init__", rf"torch\.ops\._C\.{ENV_OP}\(",
                              f"CPUWorker.__init__ calls torch.ops._C.{ENV_OP}"),)),
        Patch("CPU worker: memory", "vllm.utils.cpu_resource_utils", "get_memory_node_info",
              host_figures_where_numa_meminfo_is_short, why=WHY_MEMORY, remove_when=REMOVE_WHEN_MEMORY,
              upstream=UPSTREAM_MEMORY, aliases=(CPU_WORKER,), wrap_primary=False, params=MEMORY_NODE_INFO,
              tripwires=(Fact(CPU_WORKER, "CPUWorker.determine_available_memory",
                              r"get_memory_node_info\([^)]*\)\s+available_memory = memory_status\.available_memory",
                              "the CPU worker checks its KV cache against get_memory_node_info's available memory"),)),
    )


def bind_cores_from_plan(wrapped, instance, args, kwargs):
    """Return (cores of each local rank, reserved cores) as vLLM's LogicalCPUInfo lists."""
    plan = run_state.plan() if run_state.heterogeneous() else None
    if plan is None or not plan.cpu_lists:
        return wrapped(*args, **kwargs)
    import vllm.utils.cpu_resource_utils as cr_utils

    by_id = {cpu.id: cpu for cpu in cr_utils.get_allowed_cpu_list()}
    lists = [[by_id[i] for i in cores] for cores in plan.cpu_lists]
    log.info("hetero_shim: CPU ranks bound from the rank plan\n%s", plan.describe())
    return lists, [by_id[i] for i in plan.reserved if i in by_id]


def tolerate_missing_env_op(wrapped, instance, args, kwargs):
    """CPU worker constructor: if vLLM's CPU env op is missing, a no-op stands in, with a warning."""
    if run_state.heterogeneous():
        from hetero_shim.cpu_kernels.fallback import install

        if install(only=(ENV_OP,)):
            log.warning(
                "hetero_shim: torch.ops._C.%s is missing (vLLM's CPU kernels are not loaded); using a no-op: "
                "CPU memory is not bound to a NUMA node by vLLM in this process",
                ENV_OP,
            )
    return wrapped(*args, **kwargs)


def host_figures_where_numa_meminfo_is_short(wrapped, instance, args, kwargs):
    """In a CPU rank: vLLM's node memory figures, or the host's where the nodes' meminfo is short."""
    info = wrapped(*args, **kwargs)
    if not run_state.current().cpu_rank:
        return info
    from hetero_shim.planning import node

    memory = node.host_memory()
    if memory.nodes_trusted:
        return info
    node_id = MEMORY_NODE_INFO.get(args, kwargs, "node_id", 0)
    figures = memory.for_node(node_id)
    return type(info)(total_memory=figures.total, available_memory=figures.available)
