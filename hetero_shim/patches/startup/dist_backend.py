"""Distributed backend: gloo for every rank, GPU and CPU, in heterogeneous mode, with a
deliberate timeout on every gloo wait.

Targets ``init_worker_distributed_environment`` (``vllm.v1.worker.gpu_worker``), which both
the GPU and the CPU worker call with their platform's backend; the world group, and every
group vLLM builds from it (TP, PP, DP, EP), take the backend of the world group.
Why: NCCL cannot include CPU ranks, so all ranks must agree on gloo.
Remove when: vLLM supports mixed-device process groups (not as of 0.33.0).

Timeouts: vLLM gives ``init_process_group`` (rendezvous and the world group) and the device
groups ``parallel_config.distributed_timeout_seconds``, and its gloo "cpu" groups
``parallel_config.cpu_distributed_timeout_seconds`` (0.26.0 .. 0.33.0, read in
``init_worker_distributed_environment``, ``GroupCoordinator.__init__`` and
``vllm.distributed.utils.get_*distributed_timeout_or_none``). Both default to None, which
means torch's 30 minutes for gloo. In heterogeneous mode every group is gloo, so a peer that
is alive but never arrives (stopped, stuck in another collective) would hold the others for
30 minutes. The shim sets both fields, when the user left them unset, to
``HETERO_SHIM_GLOO_TIMEOUT_S`` (default 300 s, see ``settings.GLOO_TIMEOUT_DEFAULT_S``).
A peer that dies closes its sockets, and gloo fails at once; this bound is for the live ones.
"""

from __future__ import annotations

from hetero_shim import run_state, settings
from hetero_shim.arguments import Params
from hetero_shim.logs import log
from hetero_shim.registry import Fact, Patch

WHY = "NCCL cannot include CPU ranks; every rank must use one backend"
REMOVE_WHEN = "vLLM supports process groups mixing CUDA and CPU ranks"
UPSTREAM = "each worker passes its own platform's backend: NCCL on CUDA ranks, gloo on CPU ranks"
TIMEOUT_FIELDS = ("distributed_timeout_seconds", "cpu_distributed_timeout_seconds")
INIT_DISTRIBUTED = Params(vllm_config=0, backend=4)
TRIPWIRES = (
    Fact("vllm.v1.worker.cpu_worker", "CPUWorker.init_device", r"current_platform\.dist_backend",
         "the CPU worker passes current_platform.dist_backend"),
    Fact("vllm.v1.worker.gpu_worker", "Worker.init_device", r"current_platform\.dist_backend",
         "the GPU worker passes current_platform.dist_backend"),
    Fact("vllm.platforms.cuda", "CudaPlatformBase.dist_backend", r'"nccl"', "the CUDA platform's backend is NCCL"),
)


def rows(release: str) -> tuple[Patch, ...]:
    return (
        Patch("distributed backend", "vllm.v1.worker.gpu_worker", "init_worker_distributed_environment",
              gloo_for_all_ranks, why=WHY, remove_when=REMOVE_WHEN, upstream=UPSTREAM, tripwires=TRIPWIRES,
              aliases=("vllm.v1.worker.cpu_worker",), params=INIT_DISTRIBUTED),
    )


def gloo_for_all_ranks(wrapped, instance, args, kwargs):
    if not run_state.heterogeneous():
        return wrapped(*args, **kwargs)
    args, kwargs = INIT_DISTRIBUTED.replace(args, kwargs, "backend", "gloo")
    bound_gloo_waits(INIT_DISTRIBUTED.get(args, kwargs, "vllm_config").parallel_config)
    return wrapped(*args, **kwargs)


def bound_gloo_waits(parallel_config) -> int | None:
    """Give every gloo group a timeout; a value the user set through vLLM is kept."""
    seconds = settings.gloo_timeout_seconds()
    for name in TIMEOUT_FIELDS:
        if getattr(parallel_config, name, None) is None:
            setattr(parallel_config, name, seconds)
    chosen = getattr(parallel_config, TIMEOUT_FIELDS[0], None)
    log.debug("hetero_shim: gloo timeouts %s", {n: getattr(parallel_config, n, None) for n in TIMEOUT_FIELDS})
    return chosen
