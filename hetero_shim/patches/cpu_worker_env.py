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
Why: one-NUMA-node hosts cannot run TP > 1 on CPU with auto-binding; a CUDA build of vLLM
has no CPU ops at all.
Remove when: vLLM shares NUMA nodes between CPU ranks itself (not as of 0.33.0).
"""

from __future__ import annotations


from hetero_shim import mode, settings

from hetero_shim.logs import log

WHY_BIND = "stock auto-bind needs one NUMA node per CPU rank"
REMOVE_WHEN_BIND = "vLLM shares NUMA nodes between CPU ranks itself (not as of 0.33.0)"
WHY_OP = "the CPU env op is missing when the CPU kernels are not loaded (CUDA wheel)"
REMOVE_WHEN_OP = "never needed with vLLM's own CPU build; drop when CPU ranks always load it"

ENV_OP = "init_cpu_memory_env"  # vLLM 0.26 .. 0.33: torch.ops._C.init_cpu_memory_env([node])


def bind_cores_from_plan(wrapped, instance, args, kwargs):
    """Return (cores of each local rank, reserved cores) as vLLM's LogicalCPUInfo lists."""
    plan = mode.current_plan() if settings.heterogeneous() else None
    if plan is None or not plan.cpu_lists:
        return wrapped(*args, **kwargs)
    import vllm.utils.cpu_resource_utils as cr_utils

    by_id = {cpu.id: cpu for cpu in cr_utils.get_allowed_cpu_list()}
    lists = [[by_id[i] for i in cores] for cores in plan.cpu_lists]
    log.info("hetero_shim: CPU ranks bound from the rank plan\n%s", plan.describe())
    return lists, [by_id[i] for i in plan.reserved if i in by_id]


def tolerate_missing_env_op(wrapped, instance, args, kwargs):
    """CPU worker constructor: if vLLM's CPU env op is missing, a no-op stands in, with a warning."""
    if settings.heterogeneous():
        from hetero_shim.cpu_kernels.fallback import install

        if install(only=(ENV_OP,)):
            log.warning(
                "hetero_shim: torch.ops._C.%s is missing (vLLM's CPU kernels are not loaded); using a no-op: "
                "CPU memory is not bound to a NUMA node by vLLM in this process",
                ENV_OP,
            )
    return wrapped(*args, **kwargs)
