"""Cross-device collectives: one communicator for every rank of a GPU+CPU world, and warm-up
passes that need no matching.

Targets
- ``CudaPlatform.get_device_communicator_cls`` and ``CpuPlatform.get_device_communicator_cls``:
  with GPU and CPU ranks, both answer ``hetero_shim.comm.HeteroCommunicator`` (pinned host
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

from hetero_shim import run_state

WHY_COMM = "pynccl/custom all-reduce and CPU SHM collectives each serve one kind of rank"
WHY_DUMMY = "GPU and CPU workers run different numbers of warm-up passes; unmatched collectives deadlock"
WHY_CAPTURE = "vLLM's graph-capture context asserts a CUDA communicator; a GPU stage's pipeline group has ours"
REMOVE_WHEN = "vLLM supports process groups mixing CUDA and CPU ranks (not as of 0.33.0)"
COMMUNICATOR = "hetero_shim.comm.HeteroCommunicator"


def hetero_communicator(wrapped, instance, args, kwargs):
    return COMMUNICATOR if run_state.current().mixed else wrapped(*args, **kwargs)


def local_dummy_pass(wrapped, instance, args, kwargs):
    if not run_state.current().mixed:
        return wrapped(*args, **kwargs)
    from hetero_shim.comm import local_only

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
