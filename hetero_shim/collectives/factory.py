"""Which collectives a group gets: shared memory (``shm``), its stream-ordered form for a group's
one GPU rank (``gpu_stream``), or None (pinned host staging + gloo in ``communicator``).

The one module above the implementations: ``shm`` knows nothing of its GPU subclass.
"""

from __future__ import annotations

import torch

from hetero_shim import settings
from hetero_shim.collectives import shm, shm_segment
from hetero_shim.logs import log


def for_group(cpu_group, ranks: list[int], rank: int, world: int, device: torch.device, *,
              mode: str | None = None, slot: int | None = None, timeout_s: float | None = None,
              reducer: bool | None = None, label: str = "", chunked_min_bytes: int = shm.CHUNKED_MIN_BYTES,
              stream_ops: bool | None = None) -> shm.ShmCollectives | None:
    """Shared-memory collectives for this group (every rank must call it), or None: use gloo.

    ``stream_ops``: the CUDA rank of a group with one CUDA rank queues its all-reduce on its
    stream (``gpu_stream``; default: HETERO_SHIM_SHM_STREAM_OPS, on); a local choice, peers see
    the same protocol. Groups with several CUDA ranks wait on the host. The other arguments:
    ``shm_segment.open_group``.
    """
    group = shm_segment.open_group(cpu_group, ranks, rank, world, device, mode=mode, slot=slot,
                                   timeout_s=timeout_s, reducer=reducer, label=label)
    if group is None:
        return None
    kind = shm.ShmCollectives
    if device.type == "cuda" and (settings.shm_stream_ops() if stream_ops is None else stream_ops):
        if group.cuda_ranks == 1:
            from hetero_shim.collectives.gpu_stream import StreamOrderedShm as kind  # its own choice of form by group size
        else:  # several GPUs polling each other through host memory was never run: keep what was checked
            log.info("hetero_shim: %s has %d GPU ranks: they wait on the host in shared-memory collectives "
                     "(the stream-ordered all-reduce is used with one GPU rank per group)", label or "group",
                     group.cuda_ranks)
    return kind(group.mm, rank=rank, world=world, slot=group.slot, reducers=group.reducers, peers=group.peers,
                device=device, timeout_s=group.timeout_s, label=label, chunked_min_bytes=chunked_min_bytes)
