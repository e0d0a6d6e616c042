"""Same tokens on every rank: every TP rank continues from the token TP rank 0 sampled.

Targets ``Sampler.forward`` (``vllm.v1.sample.sampler``). In vLLM V1 every TP rank samples
its own next token and keeps it; nothing broadcasts rank 0's choice. With temperature > 0
CUDA and CPU random streams differ, so ranks would silently diverge. After sampling, rank 0's
``sampled_token_ids`` are broadcast over the TP group (skipped inside warm-up passes).
Why: ranks on different devices draw different random numbers.
Remove when: vLLM broadcasts the driver's sampled tokens itself (not as of 0.33.0).
"""

from __future__ import annotations

from hetero_shim import settings

WHY = "V1 lets each TP rank sample on its own; CUDA and CPU random streams differ"
REMOVE_WHEN = "vLLM broadcasts the driver rank's sampled tokens (not as of 0.33.0)"


def broadcast_rank0_tokens(wrapped, instance, args, kwargs):
    output = wrapped(*args, **kwargs)
    if not settings.heterogeneous():
        return output
    from vllm.distributed.parallel_state import get_tp_group

    from hetero_shim.comm import HeteroCommunicator, collectives_skipped

    group = get_tp_group()
    if group.world_size == 1 or collectives_skipped():
        return output
    if isinstance(group.device_communicator, HeteroCommunicator):
        group.device_communicator.broadcast(output.sampled_token_ids, src=0)
    else:  # all ranks on one kind of device: vLLM's own broadcast
        group.broadcast(output.sampled_token_ids, src=0)
    return output
