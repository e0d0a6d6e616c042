"""Pipeline activations between a CUDA stage and a CPU stage, staged through pinned host memory.

Targets ``GroupCoordinator.isend_tensor_dict`` and ``GroupCoordinator.irecv_tensor_dict``
(``vllm.distributed.parallel_state``; ``send_tensor_dict``/``recv_tensor_dict`` call them).
vLLM's V1 worker (``Worker.execute_model``) sends a stage's ``IntermediateTensors`` to the next
stage with ``isend_tensor_dict``: the metadata (``TensorMetadata(device type, dtype, size)``)
goes over the group's gloo ``cpu_group``, and each tensor over ``cpu_group`` if it is a CPU
tensor, else over ``device_group``, with ``torch.distributed.isend`` directly (not through
the device communicator). In heterogeneous mode with GPU ranks every group is gloo, which
cannot send CUDA tensors, and the receiver would allocate ``device="cuda"`` buffers on a CPU
rank. So, with GPU and CPU ranks in the world:
- a sending CUDA rank copies each CUDA tensor into pinned host memory (one synchronisation),
  and vLLM sends those host tensors (metadata says "cpu", tensors go over ``cpu_group``); the
  pinned copies stay alive in vLLM's send handles until the next step waits on them;
- a receiving CUDA rank (a GPU stage after a GPU stage) gets host tensors and copies them to
  its device after the receive completes (one more post-processing step, after vLLM's own).
CPU-only worlds (no GPU ranks) and GPU-only worlds are left alone: vLLM's own paths serve them.
A GPU rank whose previous stage is a CPU stage computes that stage's large linear layers while it
waits for its activations (``collectives/gemm_channel.py``), and takes those activations from the
segment they share (``collectives/stage_handover.py``); both sides count the steps here.
Only the last stage samples; the other stages get the sampled tokens from the scheduler
(``CachedRequestData.new_token_ids``, filled because heterogeneous mode with GPU ranks turns
async scheduling off), so no other tensor crosses between stages.
Why: gloo has no CUDA send/recv, and vLLM assumes every stage is on the same kind of device.
Runs every step, so it is ``hetero_only``: applied only in processes in heterogeneous mode.
Remove when: vLLM supports pipeline stages on different devices (not as of 0.33.0).
"""

from __future__ import annotations

import os

from hetero_shim import run_state, settings
from hetero_shim.arguments import NO_PARAMS, Params
from hetero_shim.collectives import gemm_channel, stage_handover
from hetero_shim.registry import Fact, Patch

WHY = "gloo has no CUDA send/recv; vLLM sends CUDA IntermediateTensors over the device group"
REMOVE_WHEN = "vLLM supports pipeline stages on different kinds of device"
UPSTREAM = "a stage sends CUDA tensors over its device group and the next stage allocates them on the sender's device"
PARALLEL_STATE = "vllm.distributed.parallel_state"
ISEND = Params(tensor_dict=0, dst=1, all_gather_group=2)
SENDS_OVER_DEVICE_GROUP = Fact(PARALLEL_STATE, "GroupCoordinator.isend_tensor_dict",
                               r"comm_group = metadata_group if tensor\.is_cpu else group",
                               "isend_tensor_dict sends a non-CPU tensor over the device group")
ALLOCATES_ON_SENDER_DEVICE = Fact(PARALLEL_STATE, "GroupCoordinator.irecv_tensor_dict", r"device=value\.device",
                                  "irecv_tensor_dict allocates each tensor on the device the sender named")


def rows(release: str) -> tuple[Patch, ...]:
    def row(name, wrapper, tripwire, params=NO_PARAMS):
        return Patch("pipeline activations", PARALLEL_STATE, name, wrapper, why=WHY, remove_when=REMOVE_WHEN,
                     upstream=UPSTREAM, tripwires=(tripwire,), params=params, hetero_only=True)

    return (
        row("GroupCoordinator.isend_tensor_dict", stage_cuda_tensors_on_host, SENDS_OVER_DEVICE_GROUP, ISEND),
        row("GroupCoordinator.irecv_tensor_dict", received_tensors_to_device, ALLOCATES_ON_SENDER_DEVICE),
    )


_serve_mode: list = []  # [None | "gpu" | "stand-in"], decided at the first receive


def _serving() -> str | None:
    """Whether this rank may compute the previous stage's large linear layers: "gpu" (a GPU rank,
    HETERO_SHIM_CPU_GEMM_ON_GPU and _VIA as by default), "stand-in" (a CPU rank told to stand in,
    tests on machines without a GPU) or None."""
    if not _serve_mode:
        state = run_state.current()
        mode = None
        if state.plan is not None and state.plan.pp_size > 1:
            if state.cpu_rank:
                mode = "stand-in" if os.environ.get(settings.CPU_RANK_GPU) == gemm_channel.NEXT_STAGE else None
            elif settings.cpu_gemm_on_gpu_wanted(pipeline=True) and settings.cpu_gemm_via() != "own":
                mode = "gpu"
        _serve_mode.append(mode)
    return _serve_mode[0]


def _this_rank_is_cuda(group) -> bool:
    return getattr(getattr(group, "device", None), "type", None) == "cuda"


def stage_cuda_tensors_on_host(wrapped, instance, args, kwargs):
    """isend_tensor_dict: CUDA tensors are sent as pinned host copies. A CPU stage's rank whose
    next stage's rank computes its large steps hands its activations over through their shared
    segment instead (collectives/stage_handover.py)."""
    tensor_dict = ISEND.get(args, kwargs, "tensor_dict")
    group = ISEND.get(args, kwargs, "all_gather_group", None)
    vllm_only = ISEND.get(args, kwargs, "dst", None) is not None or getattr(group, "world_size", 1) > 1
    if stage_handover.before_send(tensor_dict, vllm_only):
        return []  # no handles: the next stage's rank has the step already
    if not (run_state.current().mixed and _this_rank_is_cuda(instance)):
        return wrapped(*args, **kwargs)
    import torch

    staged = {}
    for name, value in tensor_dict.items():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            value = host
        staged[name] = value
    torch.cuda.current_stream(instance.device).synchronize()
    args, kwargs = ISEND.replace(args, kwargs, "tensor_dict", staged)
    return wrapped(*args, **kwargs)


def received_tensors_to_device(wrapped, instance, args, kwargs):
    """irecv_tensor_dict on a CUDA rank: host tensors from the previous stage move to this device.
    Before the wait, this rank computes the previous (CPU) stage's large linear layers, if it asks."""
    serve = _serving()
    if serve is not None:
        import torch

        device = instance.device if _this_rank_is_cuda(instance) else torch.device("cpu")
        handed = stage_handover.before_receive(run_state.plan(), instance.rank, device, stand_in=serve == "stand-in")
        if handed is not None:  # through the shared segment, already on this rank's device
            return handed, [], []
    result = wrapped(*args, **kwargs)
    if not (run_state.current().mixed and _this_rank_is_cuda(instance)):
        return result
    tensor_dict, handles, postprocess = result
    if tensor_dict is None:
        return result

    def to_device(tensor_dict=tensor_dict, device=instance.device) -> None:
        for name, value in list(tensor_dict.items()):
            if getattr(value, "is_cuda", True) is False:
                tensor_dict[name] = value.to(device)

    return tensor_dict, handles, [*postprocess, to_device]
