"""Device option: ``device="heterogeneous"`` / ``--device heterogeneous`` and the rank plan.

Targets ``vllm.engine.arg_utils``: ``EngineArgs.__init__`` and ``AsyncEngineArgs.__init__``
(dataclass constructors; vLLM 0.26+ has no ``device`` field), ``EngineArgs.add_cli_args`` and
``EngineArgs.from_cli_args`` (the CLI of ``vllm serve`` and the api_server module), and
``EngineArgs.create_engine_config`` (where the plan is made and bad input is refused before
any process starts). Pipeline mode (``pipeline_parallel_size > 1``) also takes
``hetero_gpu_layers=N`` / ``--hetero-gpu-layers N`` and hands the GPU/CPU layer split to vLLM as
``VLLM_PP_LAYER_PARTITION`` before any worker starts (``hetero_shim.planning.layer_split``).
Why: vLLM removed its ``device`` option and rejects a world size larger than the GPU count.
Remove when: vLLM grows a device option that places ranks on CPUs itself (none as of 0.33).
"""

from __future__ import annotations

from hetero_shim import main_guard, model_support, run_state, settings
from hetero_shim.arguments import NO_PARAMS, Params
from hetero_shim.collectives import sweep as shm_sweep
from hetero_shim.errors import HeteroConfigError
from hetero_shim.logs import log
from hetero_shim.patches.startup import rank_process
from hetero_shim.planning import build, kv_budget, layer_split
from hetero_shim.planning.kv_budget import KvBudgets
from hetero_shim.registry import Fact, Patch

V2_RUNNER = settings.V2_MODEL_RUNNER
GPU_LAYERS = "hetero_gpu_layers"  # the option; kept on the EngineArgs instance under _GPU_LAYERS_ATTR
_GPU_LAYERS_ATTR = "_hetero_shim_gpu_layers"
_own_partition: str | None = None  # the VLLM_PP_LAYER_PARTITION value this process set (not the user's)
WHY = "vLLM 0.26+ has no device option and rejects more TP ranks than GPUs"
REMOVE_WHEN = "vLLM places TP ranks on CPU cores itself"
UPSTREAM = "no `device` option; with the backend unset, a world size above the GPU count is refused"
ARG_UTILS = "vllm.engine.arg_utils"
FROM_CLI_ARGS = Params(args=0)
NO_DEVICE_OPTION = Fact(ARG_UTILS, "EngineArgs", r"^\s+device\s*:", "EngineArgs has a device field", present=False)
TOO_FEW_GPUS = Fact("vllm.config.parallel", "ParallelConfig.__post_init__", r"available GPUs \(\{gpu_count\}\)",
                    "ParallelConfig refuses a world size larger than the node's GPU count")


def rows(release: str) -> tuple[Patch, ...]:
    def row(name, wrapper, tripwire=NO_DEVICE_OPTION, params=NO_PARAMS):
        return Patch("device option", ARG_UTILS, name, wrapper, why=WHY, remove_when=REMOVE_WHEN, upstream=UPSTREAM,
                     tripwires=(tripwire,), params=params)

    return (
        row("EngineArgs.__init__", accept_device_kwarg),
        row("AsyncEngineArgs.__init__", accept_device_kwarg),
        row("EngineArgs.add_cli_args", add_device_cli_option),
        row("EngineArgs.from_cli_args", read_device_cli_option, params=FROM_CLI_ARGS),
        row("EngineArgs.create_engine_config", plan_before_config, TOO_FEW_GPUS),
    )


def accept_device_kwarg(wrapped, instance, args, kwargs):
    """EngineArgs(device="heterogeneous", ...): take the option out and switch the mode on."""
    if "device" in kwargs:
        settings.parse_device(kwargs.pop("device"))
        run_state.enter()
    gpu_layers = _parse_gpu_layers(kwargs.pop(GPU_LAYERS, None))
    result = wrapped(*args, **kwargs)
    setattr(instance, _GPU_LAYERS_ATTR, gpu_layers)
    return result


def _parse_gpu_layers(value) -> int | None:
    if value is None:
        return None
    if not run_state.heterogeneous():
        raise HeteroConfigError(f"{GPU_LAYERS}={value!r} needs device='heterogeneous' and pipeline_parallel_size > 1")
    return layer_split.parse_gpu_layers(value)


def add_device_cli_option(wrapped, instance, args, kwargs):
    parser = wrapped(*args, **kwargs)
    if "--device" not in getattr(parser, "_option_string_actions", {}):
        parser.add_argument(
            "--device",
            choices=[settings.HETEROGENEOUS],
            default=None,
            help="(hetero_shim) 'heterogeneous': tensor-parallel ranks beyond the GPU count run on CPU cores.",
        )
    if "--hetero-gpu-layers" not in getattr(parser, "_option_string_actions", {}):
        parser.add_argument(
            "--hetero-gpu-layers",
            default=None,
            help="(hetero_shim) with --device heterogeneous and --pipeline-parallel-size > 1: layers on the GPU "
            "stage(s); the CPU stages share the rest (default: as many as fit)",
        )
    return parser


def read_device_cli_option(wrapped, instance, args, kwargs):
    namespace = FROM_CLI_ARGS.get(args, kwargs, "args", None)
    device = getattr(namespace, "device", None)
    if device is not None:
        settings.parse_device(device)
        run_state.enter()
    gpu_layers = _parse_gpu_layers(getattr(namespace, "hetero_gpu_layers", None))
    engine_args = wrapped(*args, **kwargs)
    setattr(engine_args, _GPU_LAYERS_ATTR, gpu_layers)
    return engine_args


def _gpus_on_node() -> int:
    from vllm.platforms import current_platform

    return current_platform.device_count() if current_platform.is_cuda_alike() else 0


def plan_before_config(wrapped, instance, args, kwargs):
    """In heterogeneous mode: refuse what cannot work, make the rank plan, then build the config."""
    if not run_state.heterogeneous():
        return wrapped(*args, **kwargs)
    gpu_layers = getattr(instance, _GPU_LAYERS_ATTR, None)
    backend = instance.distributed_executor_backend
    if backend not in (None, "mp"):
        raise HeteroConfigError(
            f"device='heterogeneous' needs the multiprocessing executor; got distributed_executor_backend="
            f"{backend!r}. Leave it unset or use 'mp' (Ray and external launchers are not supported)."
        )
    if getattr(instance, "data_parallel_size", 1) != 1:
        raise HeteroConfigError("device='heterogeneous' supports data_parallel_size=1 only")
    tp, pp = instance.tensor_parallel_size, instance.pipeline_parallel_size
    if not isinstance(tp, int) or tp < 1 or not isinstance(pp, int) or pp < 1:
        raise HeteroConfigError(
            f"tensor_parallel_size and pipeline_parallel_size must be whole numbers >= 1; got {tp!r} and {pp!r}"
        )
    if gpu_layers is not None and pp == 1:
        raise HeteroConfigError(
            f"{GPU_LAYERS}={gpu_layers} needs pipeline mode (pipeline_parallel_size > 1): it sets how many layers "
            "the GPU stage holds; heterogeneous tensor parallelism splits every layer instead"
        )
    shm_sweep.at_plan()
    # "mp" explicitly: with the backend unset, ParallelConfig rejects more ranks than GPUs.
    instance.distributed_executor_backend = "mp"
    gpus = _gpus_on_node()
    cpu_first = pp > 1 and settings.stage_order() != "gpu-first"
    kinds = layer_split.stage_kinds(pp, tp, build.gpu_ranks_for(tp * pp, gpus), cpu_first) if pp > 1 else ()
    if gpus:
        _settings_for_mixed_ranks(instance, graphs=pp > 1 and tp == 1 and settings.gpu_stage_graphs())
    _forget_own_partition()
    settings.cpu_kvcache_space_gib()  # vLLM's CPU build parses it inside the config step: a bad value is ours to name
    config = wrapped(*args, **kwargs)  # vLLM's own checks (heads divisible by TP, ...) first
    _check_main_guard()
    split = _pipeline_split(config, kinds, gpu_layers) if pp > 1 else None
    plan = build.build_plan(tp * pp, gpus, split, kv_for=lambda p: _cpu_kv_budgets(config, p), cpu_first=cpu_first,
                            cpu_compile=lambda p: rank_process.cpu_compile_reason(config, p),
                            cpu_gemm=rank_process.large_steps_route)
    if plan.world_size > plan.gpu_ranks:
        model_support.check_cpu_ranks_support(config, ranks=_cpu_ranks_text(plan))
        warning = model_support.routing_warning(config, plan)
        if warning:
            log.warning("hetero_shim: %s", warning)
    log.info("%s", plan.describe())
    return config


def _cpu_ranks_text(plan) -> str:
    ranks = list(plan.cpu_ranks)
    return f"CPU rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _cpu_kv_budgets(config, plan) -> KvBudgets:
    """The CPU ranks' KV budgets from the memory the run can really use (kv_budget.py): one pool per
    NUMA node where the nodes' meminfo is trusted, else the host's (cgroup-aware) figures."""
    from hetero_shim.planning import node
    from hetero_shim.planning.layer_costs import copies_note, cpu_rank_needs, decoder_weight_copies

    weights, per_token = cpu_rank_needs(config, plan)
    note = copies_note(decoder_weight_copies(plan))
    memory = node.host_memory()
    space = settings.cpu_kvcache_space_gib()
    cache, sched = config.cache_config, config.scheduler_config
    pools: dict[int, list[int]] = {}
    for i, rank in enumerate(plan.cpu_ranks):
        cores = plan.cpu_lists[i] if plan.cpu_lists else ()
        pools.setdefault(node.numa_node(cores[0]) if cores and memory.nodes_trusted else -1, []).append(i)
    per_rank = [0] * len(weights)
    notes: list[str] = []
    others = plan.gpu_ranks + 1  # GPU-rank processes and the engine core, counted in the first pool
    for key, members in pools.items():
        pool = memory.for_node(key) if key >= 0 else memory.host
        work = kv_budget.Workload(
            cpu_weights=tuple(weights[i] for i in members), cpu_bytes_per_token=tuple(per_token[i] for i in members),
            max_model_len=config.model_config.max_model_len, max_num_seqs=sched.max_num_seqs,
            processes=len(members) + others, fraction=cache.gpu_memory_utilization, weights_note=note)
        others = 0
        found = kv_budget.budgets(work, pool.available, space, cache.kv_cache_memory_bytes, memory.describe())
        for i, value in zip(members, found.per_rank):
            per_rank[i] = value
        notes.extend(n for n in found.notes if n not in notes)
    return KvBudgets(tuple(per_rank), f"{found.source}; host memory: {memory.describe()}", tuple(notes))


def _check_main_guard() -> None:
    """A script building its engine outside ``if __name__ == "__main__":`` works as with stock vLLM
    where vLLM forks the engine core (its workers are spawned without importing the script again);
    where vLLM spawns the engine core itself (the CPU build), one line says to add the guard."""
    unguarded = main_guard.engine_built_unguarded()
    if unguarded and main_guard.engine_core_spawns():
        raise HeteroConfigError(main_guard.unguarded_message())
    run_state.set_env(settings.UNGUARDED_MAIN, "1" if unguarded else None)


def _forget_own_partition() -> None:
    """A partition this process set for an earlier engine is not the user's."""
    if _own_partition is not None and settings.pp_layer_partition() == _own_partition:
        run_state.set_env(settings.PP_LAYER_PARTITION, None)


def _pipeline_split(config, kinds: tuple[str, ...], gpu_layers: int | None) -> layer_split.LayerSplit:
    """Choose the layer split and hand it to vLLM's get_pp_indices (workers inherit the variable)."""
    global _own_partition
    layers = config.model_config.get_total_num_hidden_layers()
    user = settings.pp_layer_partition()
    fits, detail = None, ""
    if "gpu" in kinds and "cpu" in kinds and user is None:
        from vllm.platforms import current_platform

        from hetero_shim.planning.layer_costs import cpu_ranks_on_each_gpu, gpu_layer_costs

        own, served = cpu_ranks_on_each_gpu(kinds)
        costs = gpu_layer_costs(config, current_platform.get_device_total_memory(0), cpu_ranks_on_gpu=own,
                                served_on_gpu=served)
        detail = costs.describe()
        # an explicit count is refused only when its weights alone cannot fit; the KV reserve is an estimate
        fits = costs.fits(with_kv=gpu_layers is None)
        if gpu_layers is not None and gpu_layers > costs.fits(with_kv=True) * kinds.count("gpu"):
            log.warning("hetero_shim: %s=%d may leave little room for the KV cache (%s)", GPU_LAYERS, gpu_layers,
                        detail)
    split = layer_split.choose_split(layers, kinds, gpu_layers, user, fits, detail)
    if user is None:
        _own_partition = split.env_value
        run_state.set_env(settings.PP_LAYER_PARTITION, _own_partition)
    return split


def _settings_for_mixed_ranks(instance, graphs: bool) -> None:
    """What GPU and CPU ranks must share: synchronous scheduling, the V1 runner, and eager execution
    unless ``graphs``: pipeline stages of one rank have nothing collective inside their forward, so
    a GPU stage compiles and replays CUDA graphs as stock vLLM would (the CPU ranks' own copies of the
    config are made eager in worker_selection). Tensor parallelism across GPU and CPU ranks has
    cross-device all-reduces inside the forward, which no CUDA graph can hold: eager."""
    if not instance.enforce_eager and not graphs:
        log.warning("hetero_shim: device='heterogeneous' runs this configuration eagerly (enforce_eager=True): its "
                    "GPU ranks share collectives with CPU ranks inside the forward, which CUDA graphs cannot hold")
        instance.enforce_eager = True
    if getattr(instance, "async_scheduling", None):
        log.warning("hetero_shim: device='heterogeneous' with GPU ranks disables async scheduling")
    if hasattr(instance, "async_scheduling"):
        instance.async_scheduling = False  # the CPU model runner does not overlap steps
    if settings.v2_model_runner_requested():
        raise HeteroConfigError(f"device='heterogeneous' supports vLLM's V1 model runner only; unset {V2_RUNNER}")
    run_state.set_env(V2_RUNNER, "0")  # the patches target the V1 runner and sampler; workers inherit this
