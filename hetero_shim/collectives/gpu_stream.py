"""Stream-ordered shared-memory all-reduce for a GPU rank (``StreamOrderedShm``).

Why: with host-side waiting (``ShmCollectives``) a GPU rank's all-reduce of 8 KiB took 100-126 us
on the H100 (the target is 50 us): its host thread copies its input into the segment and waits for
the copy (a stream synchronize, behind every kernel queued before), publishes its flag, spins for
the peers, and only then queues the copy back. Here the host thread only queues work on the
current stream, in stream order with the kernels around it:
- by default one kernel (``hetero_shim.collectives.fused_kernel``) for tensors of fp32, bf16 or fp16
  up to ``ZERO_COPY_MAX_BYTES`` (2-rank groups) or below the chunked size (larger groups): it
  copies the input into the segment, publishes the flag, waits for every peer and sums in rank
  order. H100 (2026-11-24): 8 KiB between 1 GPU and 1 CPU rank 29-43 us;
- in 2-rank groups otherwise (larger tensors, other dtypes, ``HETERO_SHIM_SHM_FUSED_KERNEL=0`` or no
  NVRTC): four operations, a copy into the segment, ``cuStreamWriteValue64`` of the flag (fenced
  behind the copy), ``cuStreamWaitValue64`` for the peer, and an add (up to ``ZERO_COPY_MAX_BYTES``
  reading the peer's piece straight from the mapped segment; larger pieces DMA-copied first).
  H100: 8 KiB 79 us against 104 us with host waits. With 1 GPU + 3 CPU ranks that form
  was slower than host waits (113 vs 84 us: one wait and one add per peer), so larger groups
  use host waits for what the kernel does not take.

Protocol: the same segment, flags and buffers as ``ShmCollectives`` (its docstring), so the CPU
ranks cannot tell the difference. Double buffering holds in stream order: the copy into buffer
``seq % 2`` runs after the wait of operation ``seq - 1``, i.e. after every peer arrived at
``seq - 1`` and so finished reading operation ``seq - 2`` (the buffer's last use); and this rank's
reads of operation ``seq - 2`` ran before its ``arrive = seq - 1``, which the peers wait for before
they write that buffer again. Every rank computes each element with the same IEEE additions in
the same order, so they hold the same bits.

Host bookkeeping ("settling"): before queuing operation ``seq`` the host thread waits (the base
class's ``_wait``: liveness checks every 0.1 s, ``HETERO_SHIM_SHM_TIMEOUT``) until every peer has
arrived at operation ``seq - 1``. So the stream waits on at most one collective that
the host thread has not seen complete, a peer that died is named at the next collective (as with
host waits), this rank's signature of ``seq`` can be written from the host (the peers finished
checking ``seq - 2``'s), and the peers' signatures of ``seq - 1`` are checked then: one collective
late, but before the collective returns. Broadcast, all-gather and every gloo path of the
communicator first settle fully (conditions, then the stream's queued work) and then run the
host-waiting protocol. After an error the stream's pending wait is released (the kernel's by
this rank's own release flag; the four-operation form's, 2-rank groups only, by overwriting the
peer's arrive flag, which no other rank reads), so this process can still synchronize and exit;
the communicator refuses further calls.

Limit: a host synchronization *between* two collectives (none happens inside vLLM's decoder
forward pass) waits until the peers arrive; if a peer died at exactly that point, this rank is
ended by vLLM's worker monitor, not named by this module.
``HETERO_SHIM_SHM_STREAM_OPS=0`` turns this off (host waits, as before). Remove when: never for
GPU+CPU groups (NCCL cannot include CPU ranks); torch may one day expose stream memory operations.
"""

from __future__ import annotations

import torch

from hetero_shim.collectives import fused_kernel as cuda_fused_allreduce, stream_ops as cuda_stream_ops
from hetero_shim import settings
from hetero_shim.logs import log
from hetero_shim.collectives.shm import ARRIVE, RELEASE, SIG, ShmCollectives
from hetero_shim.collectives.shm_segment import FLAG_STRIDE

RELEASED = cuda_stream_ops.RELEASED  # written into awaited flags after an error: every pending stream wait passes
# 2-rank groups: up to this the GPU reads the peer's piece over PCIe (fused kernel or add); above: DMA copy first
ZERO_COPY_MAX_BYTES = 256 << 10


class _MappedBytes:
    """``__cuda_array_interface__`` of the mapped segment, so torch can view it as a CUDA tensor."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"data": (address, False), "shape": (nbytes,), "typestr": "|u1",
                                         "version": 2}


class StreamOrderedShm(ShmCollectives):
    """ShmCollectives whose all-reduce on a CUDA rank waits on the stream, not on the host.

    Groups of 2 ranks: the fused kernel, or the four stream operations without it. Larger
    groups: the fused kernel (one launch whatever the group size) for tensors below the chunked
    size, host waits otherwise and without it (four operations per peer measured slower than
    host waits, see the module docstring). This class decides the form by group size;
    ``factory.for_group`` gives it only to the one GPU rank of a group (several GPU
    ranks polling each other through host memory was never run)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ops = None
        self._fused = None  # cuda_fused_allreduce.FusedAllReduce when loaded
        limit = ZERO_COPY_MAX_BYTES if self.world == 2 else self.chunked_min_bytes - 1  # larger: chunked sums
        self._fused_max = min(limit, self.slot)  # bytes: one piece, read over PCIe
        self._peers = [q for q in range(self.world) if q != self.rank]
        self._queued: tuple | None = None  # (seq, signature, raw stream) of the op not yet seen met
        if not self.registered:
            return
        self._device_index = torch.cuda.current_device()
        ops, why = cuda_stream_ops.load(self._device_index)
        if ops is None:
            log.info("hetero_shim: GPU rank waits on the host in shared-memory collectives (%s)", why)
            return
        fused = None
        if settings.shm_fused_kernel():
            fused, why = cuda_fused_allreduce.load(self._device_index)
        else:
            why = f"{settings.SHM_FUSED_KERNEL}=0"
        if fused is None and self.world != 2:
            log.info("hetero_shim: %s: GPU rank waits on the host (no fused kernel: %s)", self.label or "group", why)
            return
        self._ops, self._fused = ops, fused
        self._base = ops.device_pointer(self._bytes.data_ptr())
        self._on_device = torch.as_tensor(_MappedBytes(self._base, self._bytes.numel()), device="cuda")
        self._device_views: dict[tuple, torch.Tensor] = {}
        how = f"one fused kernel up to {self._fused_max} bytes" if fused else f"stream memory operations ({why})"
        log.info("hetero_shim: %s: this GPU rank's all-reduce waits on its CUDA stream (%s)", self.label or "group",
                 how)

    @property
    def stream_ordered(self) -> bool:
        return self._ops is not None

    @property
    def fused_kernel(self) -> bool:
        """Whether the fused kernel is loaded (small all-reduces are one launch)."""
        return self._fused is not None

    def _fusable(self, src: torch.Tensor) -> bool:
        """The fused kernel takes this (contiguous) tensor: its dtype, at most ``_fused_max`` bytes."""
        return (self._fused is not None and src.numel() * src.element_size() <= self._fused_max
                and self._fused.supports(src.dtype))

    def _address(self, rank: int, which: int) -> int:
        return self._base + 8 * self._flag_index(rank, which)

    def _device_data(self, buf: int, dtype: torch.dtype, start: int, count: int) -> torch.Tensor:
        """``_data``'s elements as a CUDA tensor: kernels read them from host memory over PCIe (zero copy)."""
        key = (buf, dtype, start, count)
        view = self._device_views.get(key)
        if view is None:
            if len(self._device_views) > 1024:
                self._device_views.clear()
            host = self._data(buf, dtype, start, count)
            offset = host.data_ptr() - self._bytes.data_ptr()
            view = self._device_views[key] = self._on_device[offset: offset + count * dtype.itemsize].view(dtype)
        return view

    # -- settling -------------------------------------------------------------------------
    def _settle_conditions(self) -> None:
        """Wait on the host until the peer has arrived at the queued operation (named if it died)."""
        if self._queued is None:
            return
        seq, sig, _ = self._queued
        self._wait(ARRIVE, seq, self._peers, "all_reduce")
        self._check_signatures(seq, sig, "all_reduce")
        self._queued = None

    def settle(self) -> None:
        """The queued operation's conditions met and its stream work done: host-side protocol may follow."""
        if self._queued is None:
            return
        handle = self._queued[2]
        self._settle_conditions()
        self._ops.synchronize(handle)

    def _release_stream(self) -> None:
        """Let the stream's pending wait pass (after an error, or at close: the data it guards is
        not used). The fused kernel also watches this rank's own release flag; the stream wait of
        the four-operation path (2-rank groups only) watches the peer's arrive flag, so that one is
        overwritten, and only while still below the awaited value (in a 2-rank group no other rank
        reads it)."""
        if self._queued is None or self._mm is None:
            return
        self._flags[self._flag_index(self.rank, RELEASE)] = RELEASED
        if self.world == 2:
            index = self._flag_index(self._peers[0], ARRIVE)
            if self._flags[index] < self._queued[0]:
                self._flags[index] = RELEASED
        self._queued = None

    def _fail(self, message: str):
        self._release_stream()
        super()._fail(message)

    def close(self) -> None:
        self._release_stream()
        if self._ops is not None:
            self._device_views.clear()
            self._on_device = None  # no CUDA view may outlive the registration
        super().close()

    # -- collectives ------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor the fused kernel takes goes to it as it is (no flattening: ~4 us less host work)."""
        if x.is_cuda and x.is_contiguous() and self._fusable(x):
            out = torch.empty_like(x)
            self._queue_all_reduce(x, out, fused=True)
            return out
        return super().all_reduce(x)

    def _all_reduce_piece(self, src: torch.Tensor, out: torch.Tensor) -> None:
        fused = self._fusable(src)
        if self._ops is None or out.device.type != "cuda" or (self.world != 2 and not fused):
            self.settle()
            return super()._all_reduce_piece(src, out)
        self._queue_all_reduce(src, out, fused)

    def _queue_all_reduce(self, src: torch.Tensor, out: torch.Tensor, fused: bool) -> None:
        """Queue operation ``seq`` on the current stream: the fused kernel, or (2 ranks) the four operations."""
        nbytes = src.numel() * src.element_size()
        seq = self._begin()
        self._settle_conditions()
        buf, n, dtype, r = seq & 1, src.numel(), src.dtype, self.rank
        sig = self._signature(1, dtype, nbytes)
        self._flags[self._flag_index(r, SIG + (seq & 1))] = sig
        handle, ops = torch._C._cuda_getCurrentRawStream(self._device_index), self._ops
        if fused:
            self._fused.launch(handle, src, out, self._base + self._area_offset(buf), self._address(0, ARRIVE),
                               self._address(r, RELEASE), seq, r, self.world, FLAG_STRIDE // 8)
            self._queued = (seq, sig, handle)
            return
        peer = self._peers[0]
        self._data(buf, dtype, r * n, n).copy_(src, non_blocking=True)
        ops.write(handle, self._address(r, ARRIVE), seq)
        ops.wait_at_least(handle, self._address(peer, ARRIVE), seq)
        if nbytes <= ZERO_COPY_MAX_BYTES:
            torch.add(src, self._device_data(buf, dtype, peer * n, n), out=out)
        else:
            out.copy_(self._data(buf, dtype, peer * n, n), non_blocking=True)
            out.add_(src)
        self._queued = (seq, sig, handle)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.settle()
        return super().broadcast(x, src)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self.settle()
        return super().all_gather(x, dim)
