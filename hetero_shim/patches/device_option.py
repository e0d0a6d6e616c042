"""Device option: ``device="heterogeneous"`` / ``--device heterogeneous`` and the rank plan.

Targets ``vllm.engine.arg_utils``: ``EngineArgs.__init__`` and ``AsyncEngineArgs.__init__``
(dataclass constructors; vLLM 0.26+ has no ``device`` field), ``EngineArgs.add_cli_args`` and
``EngineArgs.from_cli_args`` (the CLI of ``vllm serve`` and the api_server module), and
``EngineArgs.create_engine_config`` (where the plan is made and bad input is refused before
any process starts).
Why: vLLM removed its ``device`` option and rejects a world size larger than the GPU count.
Remove when: vLLM grows a device option that places ranks on CPUs itself (none as of 0.33).
"""

from __future__ import annotations


import os

from hetero_shim import mode, settings
from hetero_shim.errors import HeteroConfigError

from hetero_shim.logs import log

V2_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"
WHY = "vLLM 0.26+ has no device option and rejects more TP ranks than GPUs"
REMOVE_WHEN = "vLLM places TP ranks on CPU cores itself (not as of 0.33.0)"


def accept_device_kwarg(wrapped, instance, args, kwargs):
    """EngineArgs(device="heterogeneous", ...): take the option out and switch the mode on."""
    if "device" in kwargs:
        settings.parse_device(kwargs.pop("device"))
        mode.enter()
    return wrapped(*args, **kwargs)


def add_device_cli_option(wrapped, instance, args, kwargs):
    parser = wrapped(*args, **kwargs)
    if "--device" not in getattr(parser, "_option_string_actions", {}):
        parser.add_argument(
            "--device",
            choices=[settings.HETEROGENEOUS],
            default=None,
            help="(hetero_shim) 'heterogeneous': tensor-parallel ranks beyond the GPU count run on CPU cores.",
        )
    return parser


def read_device_cli_option(wrapped, instance, args, kwargs):
    namespace = args[0] if args else kwargs.get("args")
    device = getattr(namespace, "device", None)
    if device is not None:
        settings.parse_device(device)
        mode.enter()
    return wrapped(*args, **kwargs)


def _gpus_on_node() -> int:
    from vllm.platforms import current_platform

    return current_platform.device_count() if current_platform.is_cuda_alike() else 0


def plan_before_config(wrapped, instance, args, kwargs):
    """In heterogeneous mode: refuse what cannot work, make the rank plan, then build the config."""
    if not settings.heterogeneous():
        return wrapped(*args, **kwargs)
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
    if pp != 1:
        raise HeteroConfigError("device='heterogeneous' supports tensor parallelism only (pipeline_parallel_size=1)")
    # "mp" explicitly: with the backend unset, ParallelConfig rejects more ranks than GPUs.
    instance.distributed_executor_backend = "mp"
    gpus = _gpus_on_node()
    if gpus:
        _settings_for_mixed_ranks(instance)
    config = wrapped(*args, **kwargs)  # vLLM's own checks (heads divisible by TP, ...) first
    plan = mode.build_plan(tp * pp, gpus)
    log.info("%s", plan.describe())
    return config


def _settings_for_mixed_ranks(instance) -> None:
    """What GPU and CPU ranks must share: eager execution, synchronous scheduling, V1 runner."""
    if not instance.enforce_eager:
        # gloo collectives cannot be captured in CUDA graphs, and CPU ranks cannot replay them
        log.warning("hetero_shim: device='heterogeneous' with GPU ranks runs eagerly (enforce_eager=True)")
        instance.enforce_eager = True
    if getattr(instance, "async_scheduling", None):
        log.warning("hetero_shim: device='heterogeneous' with GPU ranks disables async scheduling")
    if hasattr(instance, "async_scheduling"):
        instance.async_scheduling = False  # the CPU model runner does not overlap steps
    if os.environ.get(V2_RUNNER, "0") not in ("0", "false", "False"):
        raise HeteroConfigError(f"device='heterogeneous' supports vLLM's V1 model runner only; unset {V2_RUNNER}")
    os.environ[V2_RUNNER] = "0"  # the patches target the V1 runner and sampler; workers inherit this
