"""Cross-device collectives: one communicator for every rank of a GPU+CPU world, and warm-up
passes that need no matching.

Targets
- ``CudaPlatform.get_device_communicator_cls`` and ``CpuPlatform.get_device_communicator_cls``:
  with GPU and CPU ranks, both answer ``hetero_shim.collectives.communicator.HeteroCommunicator`` (pinned host
  staging + gloo), so no pynccl/custom all-reduce is built for a group with CPU members and
  CPU ranks do not take the SHM path the GPU rank cannot join.
- ``GPUModelRunner._dummy_run`` and ``GPUModelRunner._dummy_sampler_run``
  (``vllm.v1.worker.gpu_model_runner``; the CPU model runner inherits them): profiling and
  warm-up passes run with collectives skipped. GPU and CPU workers warm up with different
  numbers of dummy passes (a public fork deadlocked there); their results are discarded.
- ``GroupCoordinator.graph_capture`` (``vllm.distributed.parallel_state``): a GPU pipeline stage
  captures CUDA graphs inside its groups' capture contexts, which accept only CUDA communicators;
  a group with ``HeteroCommunicator`` (the pipeline group between GPU and CPU stages) is entered
  as a group without one. Nothing collective runs inside a one-rank stage's forward.
Why: NCCL and vLLM's CPU SHM all-reduce each serve one kind of rank.
Remove when: vLLM supports mixed-device groups (not as of 0.33.0).
"""

from __future__ import annotations

import contextlib

from hetero_shim import run_state, versions
from hetero_shim.registry import Fact, Patch

WHY_COMM = "pynccl/custom all-reduce and CPU SHM collectives each serve one kind of rank"
WHY_DUMMY = "GPU and CPU workers run different numbers of warm-up passes; unmatched collectives deadlock"
WHY_CAPTURE = "vLLM's graph-capture context asserts a CUDA communicator; a GPU stage's pipeline group has ours"
REMOVE_WHEN = "vLLM supports process groups mixing CUDA and CPU ranks"
UPSTREAM_COMM = "each platform names a communicator for its own kind of rank: CudaCommunicator, CpuCommunicator"
UPSTREAM_DUMMY = "GPU workers warm up with `_dummy_run` per compile size, CPU workers with `warming_up_model`"
UPSTREAM_CAPTURE = "graph capture asserts a CudaCommunicator or XpuCommunicator"
RUNNER = "vllm.v1.worker.gpu_model_runner"
COMMUNICATOR = "hetero_shim.collectives.communicator.HeteroCommunicator"
CUDA_COMMUNICATOR = Fact("vllm.platforms.cuda", "CudaPlatformBase.get_device_communicator_cls", r"\.CudaCommunicator\b",
                         "CUDA ranks build a CudaCommunicator (pynccl, custom all-reduce)")
CPU_COMMUNICATOR = Fact("vllm.platforms.cpu", "CpuPlatform.get_device_communicator_cls", r"\.CpuCommunicator\b",
                        "CPU ranks build a CpuCommunicator (CPU shared-memory collectives)")
CPU_WARM_UP = Fact("vllm.v1.worker.cpu_worker", "CPUWorker.compile_or_warm_up_model", r"warming_up_model\(\)",
                  "the CPU worker warms up with its own warming_up_model")
CUDA_CAPTURE_ONLY = Fact("vllm.distributed.parallel_state", "GroupCoordinator.graph_capture",
                         r"\(CudaCommunicator, XpuCommunicator\)",
                         "graph capture asserts a CudaCommunicator or XpuCommunicator")


def _warm_up_differs(release: str) -> tuple[Fact, ...]:
    """The GPU worker's warm-up loop: in compile_or_warm_up_model, from 0.33 in _compile_or_warm_up_model."""
    renamed = versions.release_key(release) >= (0, 33, 0)
    gpu = "Worker._compile_or_warm_up_model" if renamed else "Worker.compile_or_warm_up_model"
    return (Fact("vllm.v1.worker.gpu_worker", gpu, r"_dummy_run\(", "the GPU worker warms up with _dummy_run passes"),
            CPU_WARM_UP)


def rows(release: str) -> tuple[Patch, ...]:
    def row(module, name, wrapper, why, upstream, tripwires):
        return Patch("cross-device collectives", module, name, wrapper, why=why, remove_when=REMOVE_WHEN,
                     upstream=upstream, tripwires=tripwires)

    warm_up = _warm_up_differs(release)
    return (
        row("vllm.platforms.cuda", "CudaPlatformBase.get_device_communicator_cls", hetero_communicator, WHY_COMM,
            UPSTREAM_COMM, (CUDA_COMMUNICATOR,)),
        row("vllm.platforms.cpu", "CpuPlatform.get_device_communicator_cls", hetero_communicator, WHY_COMM,
            UPSTREAM_COMM, (CPU_COMMUNICATOR,)),
        row(RUNNER, "GPUModelRunner._dummy_run", local_dummy_pass, WHY_DUMMY, UPSTREAM_DUMMY, warm_up),
        row(RUNNER, "GPUModelRunner._dummy_sampler_run", local_dummy_pass, WHY_DUMMY, UPSTREAM_DUMMY, warm_up),
        row("vllm.distributed.parallel_state", "GroupCoordinator.graph_capture", capture_without_hetero_communicator,
            WHY_CAPTURE, UPSTREAM_CAPTURE, (CUDA_CAPTURE_ONLY,)),
    )


def hetero_communicator(wrapped, instance, args, kwargs):
    return COMMUNICATOR if run_state.current().mixed else wrapped(*args, **kwargs)


def local_dummy_pass(wrapped, instance, args, kwargs):
    if not run_state.current().mixed:
        return wrapped(*args, **kwargs)
    from hetero_shim.collectives.communicator import local_only

    with local_only():
        return wrapped(*args, **kwargs)


def capture_without_hetero_communicator(wrapped, instance, args, kwargs):
    if not run_state.current().mixed or type(instance.device_communicator).__name__ != "HeteroCommunicator":
        return wrapped(*args, **kwargs)
    return _entered_without_communicator(instance, wrapped, args, kwargs)


@contextlib.contextmanager
def _entered_without_communicator(group, wrapped, args, kwargs):
    """vLLM's context, entered while the group shows no device communicator (only entering reads it)."""
    saved = group.device_communicator
    with contextlib.ExitStack() as stack:
        group.device_communicator = None
        try:
            context = stack.enter_context(wrapped(*args, **kwargs))
        finally:
            group.device_communicator = saved
        yield context
