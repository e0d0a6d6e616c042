"""Linear layers computed on a GPU whose weights stay in host memory: each weight crosses PCIe in
pieces of whole rows through GPU buffers, the copies of the next ``ahead`` pieces in call order
(``HETERO_SHIM_CPU_GEMM_AHEAD``, default 1) queued on a copy stream while the GPU multiplies the
current one; after a layer's last piece come the next layer's first ones (load order is the order a
forward pass calls them), so that they cross while the host works between the layers.

Used by a CPU pipeline stage's large steps (``patches/per_step/cpu_gemm_on_gpu.py``): in the CPU
rank's own process (weights page-locked there), or in the next stage's GPU rank, which reads the
weights from the CPU rank's shared memory (``collectives/gemm_channel.py``).

The GPU memory held is ``ahead`` + 1 buffers (``HETERO_SHIM_CPU_GEMM_CHUNK_MIB`` each, or the largest
weight) and each call's activations. Results equal one ``torch.nn.functional.linear`` of the whole
weight up to the GEMM's own rounding: each output column is one dot product over the same inputs.
A copy into a buffer is queued behind the GEMM that last read it (an event), and a GEMM behind its
piece's copy, so no piece is read before it arrived or overwritten while it is read.
"""

from __future__ import annotations

from collections import deque


def row_pieces(n: int, row_bytes: int, chunk_bytes: int | None) -> list[tuple[int, int]]:
    """Rows [0, n) as ranges of at most ``chunk_bytes`` (at least one row; all of them when None)."""
    rows = n if chunk_bytes is None else max(1, min(n, chunk_bytes // row_bytes))
    return [(first, min(first + rows, n)) for first in range(0, n, rows)]


def cut_into_pieces(layers: list, chunk_bytes: int | None) -> int:
    """Set each layer's ``pieces`` (row_pieces) and return the bytes a buffer needs for the largest piece."""
    largest = 0
    for layer in layers:
        n, k = layer.weight.shape
        row = k * layer.weight.element_size()
        layer.pieces = row_pieces(n, row, chunk_bytes)
        largest = max(largest, max(end - first for first, end in layer.pieces) * row)
    return largest


#: a split's rows are whole blocks of this many (vLLM's packed CPU kernel packs 16 or 32 rows a block)
SPLIT_ROW_BLOCK = 64


def split_rows(n: int, pct) -> int:
    """The leading rows of an ``n``-row layer that the next stage's rank computes in small steps: ``pct``
    percent (an int or a Fraction), rounded down to whole blocks; 0 when either side would get less
    than a block."""
    rows = n * pct // 100 // SPLIT_ROW_BLOCK * SPLIT_ROW_BLOCK
    return rows if rows >= SPLIT_ROW_BLOCK and n - rows >= SPLIT_ROW_BLOCK else 0


def balanced_share(cpu_rate: float, copy_rate: float, low: int, high: int) -> int:
    """The next stage's rank's share of each layer's rows, in whole percent within [low, high], at
    which its copies (``copy_rate`` bytes/s) and the CPU rank's kernels (``cpu_rate``) take as long:
    the share s with s / copy_rate = (1 - s) / cpu_rate."""
    if cpu_rate <= 0 or copy_rate <= 0:
        raise ValueError(f"rates must be positive (CPU {cpu_rate}, copies {copy_rate} bytes/s)")
    return max(low, min(high, round(100 * copy_rate / (cpu_rate + copy_rate))))


def split_plan(layers: list[tuple[int, int]], pct: int, large_only: bool = False, max_pct: int = 90) -> list[int]:
    """``split_rows`` of each layer (``(rows, bytes a row)`` each): ``pct`` percent of every layer; with
    ``large_only``, only of the layers of at least half the largest one's bytes, each of them with
    the share (at most ``max_pct``) that gives the next stage's rank ``pct`` percent of all the
    layers' bytes, as splitting every layer would: half as many requests a step at Llama's shapes
    (gate_up and down split, qkv and o whole on the CPU)."""
    from fractions import Fraction

    if not large_only or not layers or not pct:
        return [split_rows(n, pct) for n, _ in layers]
    sizes = [n * row for n, row in layers]
    large = [2 * size >= max(sizes) for size in sizes]
    share = min(Fraction(pct * sum(sizes), sum(size for size, big in zip(sizes, large) if big)), max_pct)
    return [split_rows(n, share) if big else 0 for (n, _), big in zip(layers, large)]


class Slot:
    """A GPU buffer for a piece of weight: which piece it holds, and events for when its copy is done
    and when the last GEMM that read it is done."""

    def __init__(self, buffer) -> None:
        from torch.cuda import streams

        self.buffer, self.view, self.key = buffer, None, None
        self.ready, self.free = streams.Event(), streams.Event()


class WeightStreamer:
    """``ahead`` + 1 buffers on ``device`` and the streams that fill and read them, for ``layers``
    (objects with ``weight``: a host tensor, page-locked or registered with CUDA; ``pieces``;
    ``index``: the position in ``layers``). Call :meth:`multiply` with this streamer's ``stream``
    current. ``rings``: the sizes of consecutive groups of ``layers``, each called in its own order
    (after a group's last layer its first is queued); default one group."""

    def __init__(self, device, layers: list, slot_bytes: int, rings: tuple[int, ...] | None = None,
                 ahead: int = 1) -> None:
        import torch
        from torch.cuda import streams

        self.device, self.layers = device, layers
        self.following: list[int] = []
        self.depth: list[int] = []  # pieces queued ahead in each layer's ring: at most the ring's pieces
        start = 0
        for size in rings or (len(layers),):
            ring = range(start, start + size)
            self.following += [start + (i + 1) % size for i in range(size)]
            self.depth += [min(ahead, sum(len(layers[j].pieces) for j in ring))] * size
            start += size
        self.stream = streams.Stream(device=device)
        self.copies = streams.Stream(device=device)
        self.slots = [Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=device)) for _ in range(ahead + 1)]
        self.turn = 0  # the slot the next piece goes to: slots are filled and read in the same turn
        self.queued: deque[Slot] = deque()  # copies queued, in call order, not yet multiplied
        self.last: tuple[int, int] | None = None  # (layer index, piece) of the last copy queued

    def multiply(self, flat, layer, bias, emit) -> None:
        """``flat @ layer.weight.T + bias`` piece by piece (``flat``, ``bias`` on the device):
        ``emit(first, end, part)`` for each piece of output columns, in order, on ``self.stream``."""
        import torch

        queued, depth = self.queued, self.depth[layer.index]
        if not queued or queued[0].key != (layer.index, 0):  # not what the last call queued: start over
            self.forget()
            self._stage((layer.index, 0))
        for i, (first, end) in enumerate(layer.pieces):
            slot = queued.popleft()
            if slot.key != (layer.index, i):
                self.forget()
                raise RuntimeError(f"weight stream out of order: piece {slot.key} queued where layer "
                                   f"{layer.index} piece {i} was due")
            while len(queued) < depth:  # into slots whose last GEMM was queued before (their events)
                self._stage(self._after(self.last))
            self.stream.wait_event(slot.ready)
            part = torch.nn.functional.linear(flat, slot.view, None if bias is None else bias[first:end])
            emit(first, end, part)
            slot.free.record(self.stream)

    def forget(self) -> None:
        """The next call finds nothing queued (after a failure, or when the weights were replaced).
        Copies already queued still land; the slots they fill are refilled behind them."""
        self.queued.clear()
        self.last = None

    def _after(self, key: tuple[int, int]) -> tuple[int, int]:
        """The piece a forward pass needs after ``key``: the layer's next, else the following layer's first."""
        index, piece = key
        if piece + 1 < len(self.layers[index].pieces):
            return index, piece + 1
        return self.following[index], 0

    def _stage(self, key: tuple[int, int]) -> None:
        """Queue the copy of piece ``key`` into the next slot, on the copy stream, behind the last GEMM
        that read that slot."""
        import torch

        slot = self.slots[self.turn]
        self.turn = (self.turn + 1) % len(self.slots)
        layer = self.layers[key[0]]
        first, end = layer.pieces[key[1]]
        w = layer.weight
        rows = w[first:end]
        slot.view = slot.buffer[:rows.numel() * rows.element_size()].view(w.dtype).view(rows.shape)
        self.copies.wait_event(slot.free)
        torch.cuda.set_stream(self.copies)
        try:
            slot.view.copy_(rows, non_blocking=True)
            slot.ready.record(self.copies)
        finally:
            torch.cuda.set_stream(self.stream)
        slot.key = key
        self.queued.append(slot)
        self.last = key
