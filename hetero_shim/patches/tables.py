"""Per-release patch tables: for each supported vLLM release, exactly what is wrapped.

Each row names its target as strings and says why and when it can go; the wrappers live
in one module per concern. A release missing here is refused (``versions.SUPPORTED`` lists
the same releases, so that enable() can refuse one without importing this module; a unit test
checks that the two agree). This module is imported when vLLM is, not by enable().
The targets of every table are checked against the real wheel of that release by
``scripts/vllm_symbols.py`` (manifests in ``tests/data/vllm_symbols/``).
"""

from __future__ import annotations

from hetero_shim.patches.per_step import pipeline_buffers, pipeline_transfer, sampling_sync
from hetero_shim.patches.startup import (
    communicators,
    cpu_rank_kernels,
    cpu_worker_env,
    device_option,
    dist_backend,
    kv_cache_agreement,
    rank_process,
    start_method,
    worker_death,
    worker_selection,
)
from hetero_shim.registry import Patch

ARG_UTILS = "vllm.engine.arg_utils"
CPU_WORKER_MODULE = "vllm.v1.worker.cpu_worker"
CPU_WORKER_CLS = "vllm.v1.worker.cpu_worker.CPUWorker"


def _device_option() -> tuple[Patch, ...]:
    def row(name, wrapper):
        return Patch("device option", ARG_UTILS, name, wrapper, device_option.WHY, device_option.REMOVE_WHEN)

    return (
        row("EngineArgs.__init__", device_option.accept_device_kwarg),
        row("AsyncEngineArgs.__init__", device_option.accept_device_kwarg),
        row("EngineArgs.add_cli_args", device_option.add_device_cli_option),
        row("EngineArgs.from_cli_args", device_option.read_device_cli_option),
        row("EngineArgs.create_engine_config", device_option.plan_before_config),
    )


def _worker_selection() -> Patch:
    return Patch(
        "worker selection", "vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker",
        worker_selection.cpu_worker_for_cpu_ranks(CPU_WORKER_CLS),
        worker_selection.WHY, worker_selection.REMOVE_WHEN, needs_params=("self", "all_kwargs"),
    )


def _start_method() -> Patch:
    return Patch(
        "start method", "vllm.utils.system_utils", "get_mp_context", start_method.spawn_workers,
        start_method.WHY, start_method.REMOVE_WHEN, aliases=("vllm.v1.executor.multiproc_executor",),
        wrap_primary=False,
    )


def _dist_backend() -> Patch:
    return Patch(
        "distributed backend", "vllm.v1.worker.gpu_worker", "init_worker_distributed_environment",
        dist_backend.gloo_for_all_ranks, dist_backend.WHY, dist_backend.REMOVE_WHEN,
        aliases=(CPU_WORKER_MODULE,), needs_params=("backend",),
    )


def _numa_autobind_omp_manager() -> Patch:
    return Patch(
        "CPU worker: cores", "vllm.utils.ompmultiprocessing", "OMPProcessManager._get_autobind_cpu_ids",
        cpu_worker_env.bind_cores_from_plan, cpu_worker_env.WHY_BIND, cpu_worker_env.REMOVE_WHEN_BIND,
        needs_params=("self", "cpu_selector"),
    )


def _memory_env_op() -> Patch:
    return Patch(
        "CPU worker: env op", CPU_WORKER_MODULE, "CPUWorker.__init__",
        cpu_worker_env.tolerate_missing_env_op,
        cpu_worker_env.WHY_OP, cpu_worker_env.REMOVE_WHEN_OP,
    )


def _memory_figures() -> Patch:
    return Patch(
        "CPU worker: memory", "vllm.utils.cpu_resource_utils", "get_memory_node_info",
        cpu_worker_env.host_figures_where_numa_meminfo_is_short, cpu_worker_env.WHY_MEMORY,
        cpu_worker_env.REMOVE_WHEN_MEMORY, aliases=(CPU_WORKER_MODULE,), wrap_primary=False, needs_params=("node_id",),
    )


def _rank_process() -> tuple[Patch, ...]:
    return (
        Patch("CPU rank process", "vllm.v1.executor.multiproc_executor", "WorkerProc.make_worker_process",
              rank_process.spawn_with_rank_environment, rank_process.WHY, rank_process.REMOVE_WHEN,
              needs_params=("local_rank", "rank")),
        Patch("CPU rank process", "vllm.platforms", "resolve_current_platform_cls_qualname",
              rank_process.cpu_platform_in_cpu_ranks, rank_process.WHY, rank_process.REMOVE_WHEN),
    )


def _worker_death() -> Patch:
    return Patch("worker death at start-up", "vllm.v1.executor.multiproc_executor", "WorkerProc.wait_for_ready",
                 worker_death.name_dead_rank_at_start, worker_death.WHY, worker_death.REMOVE_WHEN,
                 needs_params=("unready_proc_handles",))


def _cpu_kernels() -> Patch:
    return Patch("CPU kernels", "vllm.platforms.cpu", "CpuPlatform.import_kernels", cpu_rank_kernels.kernels_for_cpu_ranks,
                 cpu_rank_kernels.WHY, cpu_rank_kernels.REMOVE_WHEN)


def _collectives() -> tuple[Patch, ...]:
    def row(module, name, wrapper, why):
        return Patch("cross-device collectives", module, name, wrapper, why, communicators.REMOVE_WHEN)

    runner = "vllm.v1.worker.gpu_model_runner"
    return (
        row("vllm.platforms.cuda", "CudaPlatformBase.get_device_communicator_cls", communicators.hetero_communicator,
            communicators.WHY_COMM),
        row("vllm.platforms.cpu", "CpuPlatform.get_device_communicator_cls", communicators.hetero_communicator,
            communicators.WHY_COMM),
        row(runner, "GPUModelRunner._dummy_run", communicators.local_dummy_pass, communicators.WHY_DUMMY),
        row(runner, "GPUModelRunner._dummy_sampler_run", communicators.local_dummy_pass, communicators.WHY_DUMMY),
        row("vllm.distributed.parallel_state", "GroupCoordinator.graph_capture",
            communicators.capture_without_hetero_communicator, communicators.WHY_CAPTURE),
    )


def _sampling_sync() -> Patch:
    return Patch("same tokens on every rank", "vllm.v1.sample.sampler", "Sampler.forward",
                 sampling_sync.broadcast_rank0_tokens, sampling_sync.WHY, sampling_sync.REMOVE_WHEN, hetero_only=True)


def _kv_cache_agreement(module: str) -> Patch:
    return Patch("KV cache agreement", module, "get_kv_cache_configs", kv_cache_agreement.agree_on_kv_cache,
                 kv_cache_agreement.WHY, kv_cache_agreement.REMOVE_WHEN, aliases=("vllm.v1.engine.core",),
                 needs_params=("kv_cache_specs",))


def _pipeline_transfer() -> tuple[Patch, ...]:
    def row(name, wrapper, params):
        return Patch("pipeline activations", "vllm.distributed.parallel_state", name, wrapper,
                     pipeline_transfer.WHY, pipeline_transfer.REMOVE_WHEN, needs_params=params, hetero_only=True)

    return (
        row("GroupCoordinator.isend_tensor_dict", pipeline_transfer.stage_cuda_tensors_on_host,
            ("self", "tensor_dict")),
        row("GroupCoordinator.irecv_tensor_dict", pipeline_transfer.received_tensors_to_device, ("self", "src")),
    )


def _pipeline_buffers() -> Patch:
    return Patch("pipeline receive buffer", "vllm.v1.worker.gpu_model_runner",
                 "GPUModelRunner.sync_and_gather_intermediate_tensors", pipeline_buffers.allocate_receive_buffer,
                 pipeline_buffers.WHY, pipeline_buffers.REMOVE_WHEN, hetero_only=True,
                 needs_params=("num_tokens", "intermediate_tensors"))


def _table_v1_mp_executor(kv_planning: str = "vllm.v1.core.kv_cache_utils") -> tuple[Patch, ...]:
    """vLLM 0.26.0 .. 0.33.0: V1 engine, multiprocessing executor, OMPProcessManager auto-bind.

    Every target has the same module, qualname and parameters in all these releases
    (checked per wheel: tests/data/vllm_symbols/<release>.json), except where
    get_kv_cache_configs lives: kv_cache_utils up to 0.32, kv_cache_planning in 0.33.
    """
    return (
        _kv_cache_agreement(kv_planning),
        *_device_option(),
        _worker_selection(),
        _start_method(),
        _dist_backend(),
        _numa_autobind_omp_manager(),
        _memory_env_op(),
        _memory_figures(),
        *_rank_process(),
        _worker_death(),
        _cpu_kernels(),
        *_collectives(),
        _sampling_sync(),
        *_pipeline_transfer(),
        _pipeline_buffers(),
    )


TABLES = {
    "0.26.0": _table_v1_mp_executor,
    "0.27.0": _table_v1_mp_executor,
    "0.27.1": _table_v1_mp_executor,
    "0.28.0": _table_v1_mp_executor,
    "0.29.0": _table_v1_mp_executor,
    "0.30.0": _table_v1_mp_executor,
    "0.31.0": _table_v1_mp_executor,
    "0.32.0": _table_v1_mp_executor,
    "0.33.0": lambda: _table_v1_mp_executor(kv_planning="vllm.v1.core.kv_cache_planning"),
}

SUPPORTED = tuple(TABLES)


def table(release: str) -> tuple[Patch, ...]:
    return TABLES[release]()
