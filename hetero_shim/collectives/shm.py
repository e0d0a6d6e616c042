"""Shared-memory collectives for the ranks of one host: all-reduce (sum), broadcast, all-gather.

Why: in heterogeneous mode a GPU rank and CPU ranks of one node talk over gloo, which costs
about 330-530 us for an 8 KiB all-reduce and reaches ~1 GB/s at 16 MiB (the targets are 50 us and
20 GB/s). Ranks of one host can instead meet in one shared-memory segment. ``HeteroCommunicator``
uses this automatically when every rank of its group is on this host (``for_group``), gloo
otherwise; ``HETERO_SHIM_COLLECTIVES=auto|shm|gloo`` forces one.

Segment: one file in /dev/shm per process group, set up by ``shm_segment.open_group`` (its name,
size and mapping, and why nothing of it stays in /dev/shm: ``hetero_shim.collectives.shm_segment``).

Layout (``slot`` = HETERO_SHIM_SHM_SLOT_MB, by default ``shm_segment.default_slot``: 16 MiB for 2 ranks,
8 MiB for more)::

    header    per rank, 128 bytes apart (no false sharing): arrive, reduced, sig[0], sig[1], release (int64;
              release: read by this rank's own GPU kernels only, see hetero_shim.collectives.gpu_stream)
    buffer 0  data area (world x slot; rank r's piece of k elements at r*k) | result area (slot)
    buffer 1  the same

Protocol: every collective call (or each slot-sized piece of a larger tensor) is operation
``seq`` = 1, 2, ... on every rank and uses buffer ``seq % 2``. A rank writes its input into the
data area, writes the operation's signature (kind, dtype, bytes) to ``sig[seq % 2]``, publishes
``arrive = seq``, and waits until every rank has arrived (so finishing operation ``seq`` means
all ranks have finished ``seq - 1``, and the buffer written next, last used by ``seq - 1``, is
free: double buffering needs no other acknowledgement). Mismatched calls (another kind, dtype or
size on some rank) raise at once instead of mixing data. All-reduce then takes one of:
- 2 ranks: each rank adds the peer's piece to its own, on its own device (one IEEE addition is
  commutative, so both ranks hold the same bits; the GPU rank adds on the GPU);
- small tensors (< ``CHUNKED_MIN_BYTES``): every rank sums all pieces in rank order on the CPU;
- large tensors: reduce-scatter + all-gather through the segment: each *reducer* (CPU ranks; all
  ranks if none is a CPU rank) sums its own chunk over the ranks (``torch.sum``: one pass over
  the inputs; 16-bit types accumulate in fp32) into the result area and publishes
  ``reduced = seq``; everyone copies the result out. The memory bandwidth of all CPU ranks is used,
  and the GPU rank's single host core does no reduction.
Each element of a result is computed once (large tensors) or by the same CPU additions in rank
order on every rank (small ones), so every rank holds the same bits.
Tensors above the slot go through the segment in slot-sized pieces (never a gloo fallback).

Memory ordering: this relies on x86-64 TSO (stores become visible in program order, loads are not
reordered with older loads) and a single writer per flag: data is written (torch kernels, whose
worker threads finish before the call returns; glibc memcpy, whose non-temporal loops end with
sfence; a CUDA copy followed by a stream synchronize), then a locked read-modify-write (an
uncontended ``threading.Lock``) and the 8-byte aligned flag store; readers load the flag before
the data. Other architectures would need real fences: ``auto`` falls back to gloo there and
``shm`` refuses (``shm_segment.unsupported_reason``).

GPU rank: the segment is registered with CUDA (``cudaHostRegister``), so device<->host copies go
straight into and out of it at pinned speed; if registration fails, a pinned staging buffer is
used (a warning says so). By default its all-reduce is stream-ordered (``hetero_shim.collectives.gpu_stream``:
the flag store and the wait for the peers are queued on the CUDA stream). Otherwise, and for its
broadcast and all-gather: copies into the segment are waited for (stream synchronize) before the
flag is published; copies out of it are queued on the current stream and a CUDA event is waited
for before this rank next publishes a flag (no peer can overwrite what the copy reads before then).

Waiting: spin 50 us, then spin with ``sched_yield`` up to 20 ms, then sleep in steps growing to
1 ms. Every 0.1 s of waiting the missing ranks' processes are checked (pid and start time, seen
through /proc; ranks whose process is not visible there, e.g. in another pid namespace, get only the
deadline): an exited rank is named at once. A rank that is alive but never arrives is named
after ``HETERO_SHIM_SHM_TIMEOUT`` seconds (default 300: far above any one layer's compute on a CPU
rank, far below gloo's 30 minutes). After such an error the communicator refuses further calls.
"""

from __future__ import annotations

import mmap
import os
import threading
import time

import torch

from hetero_shim import settings
from hetero_shim.collectives.shm_segment import FLAG_STRIDE, clear_cuda_error, process_start_time, segment_bytes
from hetero_shim.errors import ShmCollectiveError
from hetero_shim.logs import log

CHUNKED_MIN_BYTES = 256 << 10
SPIN_HOT_S = 50e-6
SPIN_YIELD_S = 0.02
SLEEP_MAX_S = 1e-3
LIVENESS_EVERY_S = 0.1

ARRIVE, _REDUCED, SIG, RELEASE = 0, 1, 2, 4  # int64 offsets inside a rank's flag group (sig: 2 and 3)
_OPS = {1: "all_reduce", 2: "broadcast", 3: "all_gather"}
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]
_fence_lock = threading.Lock()


def _fence() -> None:
    """A locked read-modify-write: orders earlier stores before the flag store that follows (x86)."""
    with _fence_lock:
        pass


class ShmCollectives:
    """Collectives of one group through one mapped segment (see the module docstring)."""

    def __init__(self, mm: mmap.mmap, *, rank: int, world: int, slot: int, reducers: list[int],
                 peers: dict[int, tuple[int, str | None]], device: torch.device, timeout_s: float,
                 label: str = "", chunked_min_bytes: int = CHUNKED_MIN_BYTES):
        self.rank, self.world, self.slot, self.label = rank, world, slot, label
        self.reducers, self.peers, self.timeout_s = reducers, peers, timeout_s
        self.chunked_min_bytes = chunked_min_bytes
        self._mm = mm
        self._header, _ = segment_bytes(world, slot)
        self._flags = memoryview(mm).cast("q")
        self._bytes = torch.frombuffer(mm, dtype=torch.uint8)
        self._typed: dict[torch.dtype, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}
        self._seq = 0
        self._broken: str | None = None
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        self._registered = False
        self._reading: torch.cuda.Event | None = None  # a queued copy out of the segment
        self._reading_pending = False
        if device.type == "cuda":
            self._register_cuda()

    # -- set-up and teardown ------------------------------------------------------------
    def _register_cuda(self) -> None:
        try:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(self._bytes.data_ptr(), self._bytes.numel(), 0)
            if err == cudart.cudaError.success:
                self._registered = True
                return
        except Exception as e:  # no usable CUDA runtime binding: same fallback
            err = e
        clear_cuda_error()
        log.warning("hetero_shim: cudaHostRegister of the shared-memory segment failed (%s); the GPU "
                    "rank copies through a pinned staging buffer instead", err)

    def close(self) -> None:
        if self._mm is None:
            return
        if self._registered:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self._bytes.data_ptr())
            self._registered = False
        self._typed.clear()
        self._views.clear()
        self._staging.clear()
        self._bytes = None
        self._flags.release()
        try:
            self._mm.close()
        except BufferError:  # a view is still referenced somewhere; the mapping goes with it
            pass
        self._mm = None
        self._broken = self._broken or "the shared-memory segment was closed"

    @property
    def registered(self) -> bool:
        return self._registered

    def settle(self) -> None:
        """Nothing of this rank's collectives is left queued on a device stream (here: never)."""

    # -- views --------------------------------------------------------------------------
    def _view(self, dtype: torch.dtype) -> torch.Tensor:
        typed = self._typed.get(dtype)
        if typed is None:
            typed = self._typed[dtype] = self._bytes.view(dtype)
        return typed

    def _data(self, buf: int, dtype: torch.dtype, start: int, count: int, area: int = 0) -> torch.Tensor:
        """Elements [start, start+count) of buffer ``buf``'s data area (area 0) or result area (1).

        Views are cached (a model repeats a few shapes; making a view costs about 1 us)."""
        key = (buf, dtype, start, count, area)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 1024:
                self._views.clear()
            base = self._area_offset(buf, area) // dtype.itemsize
            view = self._views[key] = self._view(dtype)[base + start: base + start + count]
        return view

    def _area_offset(self, buf: int, area: int = 0) -> int:
        """Byte offset in the segment of buffer ``buf``'s data area (area 0) or result area (1)."""
        return self._header + buf * (self.world + 1) * self.slot + area * self.world * self.slot

    def _result(self, buf: int, dtype: torch.dtype, start: int, count: int) -> torch.Tensor:
        return self._data(buf, dtype, start, count, area=1)

    def _host_scratch(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        buf = self._staging.get(dtype)
        if buf is None or buf.numel() < count:
            elems = max(count, self.slot // dtype.itemsize)
            buf = self._staging[dtype] = torch.empty(elems, dtype=dtype, pin_memory=torch.cuda.is_available())
        return buf[:count]

    # -- copies in and out of the segment -----------------------------------------------
    def _put(self, shm: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type == "cpu" or self._registered:
            shm.copy_(src)  # CUDA -> registered host memory: DMA, then a stream synchronize
        else:
            shm.copy_(self._host_scratch(src.dtype, src.numel()).copy_(src))

    def _get(self, dst: torch.Tensor, shm: torch.Tensor) -> None:
        if dst.device.type == "cpu":
            dst.copy_(shm)
        elif self._registered:
            dst.copy_(shm, non_blocking=True)
            if self._reading is None:
                self._reading = torch.cuda.Event()
            self._reading.record()
            self._reading_pending = True
        else:
            dst.copy_(self._host_scratch(shm.dtype, shm.numel()).copy_(shm))

    # -- flags --------------------------------------------------------------------------
    def _flag_index(self, rank: int, which: int) -> int:
        return rank * (FLAG_STRIDE // 8) + which

    def _publish(self, which: int, seq: int) -> None:
        if self._reading_pending:  # a queued device copy may still read the segment
            self._reading.synchronize()
            self._reading_pending = False
        _fence()
        self._flags[self._flag_index(self.rank, which)] = seq

    @staticmethod
    def _signature(op: int, dtype: torch.dtype, nbytes: int) -> int:
        code = _DTYPES.index(dtype) if dtype in _DTYPES else 63
        return (op << 56) | (code << 48) | nbytes

    def _arrive(self, seq: int, op: int, dtype: torch.dtype, nbytes: int) -> int:
        sig = self._signature(op, dtype, nbytes)
        self._flags[self._flag_index(self.rank, SIG + (seq & 1))] = sig
        self._publish(ARRIVE, seq)
        return sig

    def _wait(self, which: int, seq: int, ranks, what: str) -> None:
        flags, stride = self._flags, FLAG_STRIDE // 8
        pending = [r for r in ranks if flags[r * stride + which] < seq]
        if not pending:
            return
        start = time.perf_counter()
        hot_until, yield_until = start + SPIN_HOT_S, start + SPIN_YIELD_S
        next_check, deadline, nap = start + LIVENESS_EVERY_S, start + self.timeout_s, 20e-6
        while True:
            pending = [r for r in pending if flags[r * stride + which] < seq]
            if not pending:
                return
            now = time.perf_counter()
            if now < hot_until:
                continue
            if now < yield_until:
                os.sched_yield()
                continue
            if now >= next_check:
                self._check_alive(pending, what, seq)
                next_check = now + LIVENESS_EVERY_S
            if now >= deadline:
                self._fail(f"{self._where(what, seq)}: group rank(s) {pending} did not arrive within "
                           f"{self.timeout_s:g} s ({settings.SHM_TIMEOUT}); they are stuck or run other "
                           f"collectives. {settings.COLLECTIVES}=gloo bypasses shared memory")
            time.sleep(nap)
            nap = min(nap * 2, SLEEP_MAX_S)

    def _check_alive(self, pending: list[int], what: str, seq: int) -> None:
        dead = []
        for r in pending:
            pid, started = self.peers.get(r, (None, None))
            if pid is not None and started is not None and process_start_time(pid) != started:
                dead.append(f"{r} (pid {pid})")
        if dead:
            ranks = "group rank" + ("s " if len(dead) > 1 else " ") + ", ".join(dead)
            self._fail(f"{self._where(what, seq)}: {ranks} died (the process exited before arriving)")

    def _check_signatures(self, seq: int, sig: int, what: str) -> None:
        flags, stride, which = self._flags, FLAG_STRIDE // 8, SIG + (seq & 1)
        other = [flags[r * stride + which] for r in range(self.world)]
        if other.count(sig) != self.world:
            calls = "; ".join(f"rank {r}: {_describe(v)}" for r, v in enumerate(other))
            self._fail(f"{self._where(what, seq)}: ranks called different collectives ({calls}); every "
                       f"rank of a group must run the same collectives in the same order")

    def _where(self, what: str, seq: int) -> str:
        name = f" of group {self.label!r}" if self.label else ""
        return f"hetero_shim shared-memory {what}{name} (op #{seq}, this is group rank {self.rank})"

    def _fail(self, message: str):
        self._broken = message
        raise ShmCollectiveError(message)

    def _begin(self) -> int:
        if self._broken:
            raise ShmCollectiveError(f"shared-memory collectives unusable after an earlier error: {self._broken}")
        self._seq += 1
        return self._seq

    def _meet(self, seq: int, op: int, dtype: torch.dtype, nbytes: int) -> None:
        """Publish arrival of operation ``seq`` and wait for every rank's (checking they agree)."""
        sig = self._arrive(seq, op, dtype, nbytes)
        self._wait(ARRIVE, seq, range(self.world), _OPS[op])
        self._check_signatures(seq, sig, _OPS[op])

    # -- collectives --------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group. CPU tensors: in place, returned. Others: a new tensor on x's device."""
        cpu = x.device.type == "cpu"
        flat_in = x.contiguous().view(-1)
        if cpu:
            flat_out = flat_in if flat_in.data_ptr() == x.data_ptr() else torch.empty_like(flat_in)
        else:
            flat_out = torch.empty_like(flat_in)
        per_piece = max(1, self.slot // x.element_size())
        if flat_in.numel() <= per_piece:
            self._all_reduce_piece(flat_in, flat_out)
        else:
            for p0 in range(0, flat_in.numel(), per_piece):
                p1 = min(p0 + per_piece, flat_in.numel())
                self._all_reduce_piece(flat_in[p0:p1], flat_out[p0:p1])
        if not cpu:
            return flat_out.view(x.shape)
        if flat_out.data_ptr() != x.data_ptr():
            x.copy_(flat_out.view(x.shape))
        return x

    def _all_reduce_piece(self, src: torch.Tensor, out: torch.Tensor) -> None:
        seq = self._begin()
        buf, n, dtype, r = seq & 1, src.numel(), src.dtype, self.rank
        self._put(self._data(buf, dtype, r * n, n), src)
        self._meet(seq, 1, dtype, n * src.element_size())
        if self.world == 2:
            peer = self._data(buf, dtype, (1 - r) * n, n)
            if out.device.type == "cpu":
                torch.add(src, peer, out=out)
            else:
                self._get(out, peer)
                out.add_(src)
            return
        if n * src.element_size() < self.chunked_min_bytes:
            acc = out if out.device.type == "cpu" else self._host_scratch(dtype, n)
            _sum_in_rank_order([self._data(buf, dtype, q * n, n) for q in range(self.world)], acc)
            if acc is not out:
                out.copy_(acc)
            return
        if r in self.reducers:
            lo, hi = _chunk(n, self.reducers.index(r), len(self.reducers), dtype.itemsize)
            if hi > lo:
                every = self._data(buf, dtype, 0, self.world * n).view(self.world, n)
                torch.sum(every[:, lo:hi], dim=0, dtype=dtype, out=self._result(buf, dtype, lo, hi - lo))
            self._publish(_REDUCED, seq)
        self._wait(_REDUCED, seq, self.reducers, "all_reduce")
        self._get(out, self._result(buf, dtype, 0, n))

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank ``src``'s tensor into ``x`` on every rank (in place; returns x)."""
        flat = x.contiguous().view(-1)
        per_piece = max(1, self.world * self.slot // x.element_size())
        for p0 in range(0, flat.numel(), per_piece):
            part = flat[p0:p0 + per_piece]
            seq = self._begin()
            area = self._data(seq & 1, x.dtype, 0, part.numel())
            if self.rank == src:
                self._put(area, part)
            self._meet(seq, 2, x.dtype, part.numel() * x.element_size())
            if self.rank != src:
                self._get(part, area)
        if flat.data_ptr() != x.data_ptr():
            x.copy_(flat.view(x.shape))
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation of every rank's ``x`` along ``dim`` (a new tensor on x's device)."""
        dim = dim % x.dim()
        flat = x.contiguous().view(-1)
        n = flat.numel()
        gathered = torch.empty((self.world, n), dtype=x.dtype, device=x.device)
        per_piece = max(1, self.slot // x.element_size())
        for p0 in range(0, n, per_piece):
            k = min(per_piece, n - p0)
            seq = self._begin()
            buf = seq & 1
            self._put(self._data(buf, x.dtype, self.rank * k, k), flat[p0:p0 + k])
            self._meet(seq, 3, x.dtype, k * x.element_size())
            every = self._data(buf, x.dtype, 0, self.world * k).view(self.world, k)
            if k == n:
                self._get(gathered, every)
            else:
                for q in range(self.world):
                    self._get(gathered[q, p0:p0 + k], every[q])
        out = gathered.view(self.world, *x.shape).movedim(0, dim)
        return out.reshape(*x.shape[:dim], self.world * x.shape[dim], *x.shape[dim + 1:])


def _sum_in_rank_order(pieces: list[torch.Tensor], out: torch.Tensor) -> None:
    torch.add(pieces[0], pieces[1], out=out)
    for p in pieces[2:]:
        out.add_(p)


def _chunk(n: int, index: int, parts: int, itemsize: int) -> tuple[int, int]:
    """Element range of reducer ``index`` of ``parts``, boundaries on 64-byte multiples."""
    align = max(1, 64 // itemsize)
    step = -(-n // (parts * align)) * align
    return min(n, index * step), min(n, (index + 1) * step)


def _describe(sig: int) -> str:
    if sig == 0:
        return "nothing yet"
    op, code, nbytes = sig >> 56, (sig >> 48) & 0xFF, sig & ((1 << 48) - 1)
    dtype = str(_DTYPES[code]).removeprefix("torch.") if code < len(_DTYPES) else "other dtype"
    return f"{_OPS.get(op, op)} of {nbytes} bytes {dtype}"
