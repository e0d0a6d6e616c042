"""The next pipeline stage's side of the GEMM channel (``gemm_channel``: the segment, its protocol and
the CPU rank's side): the CPU rank's segment mapped and registered with CUDA, and its requests
served while this rank waits for the CPU stage's activations, on its GPU (weights streamed by
``weight_stream``) or, standing in on a CPU rank (tests without a GPU), on its own CPU. With
``HETERO_SHIM_CPU_GEMM_QUEUE_STEP`` (default 1) a small step's split requests are queued ahead
(``gemm_queue``). Remove when: vLLM offloads a CPU worker's large GEMMs itself (not as of 0.33.0).
"""

from __future__ import annotations

import json
import mmap
import os
import time

from hetero_shim import settings
from hetero_shim.collectives import gemm_channel as ch, gemm_queue
from hetero_shim.logs import log


class GemmServer:
    """The next stage's side: the client's segment, mapped and registered with CUDA; serves requests
    while this rank waits for the client's pipeline send."""

    def __init__(self, path: str, device, receives: int = 1, sleep_at_once: bool = False) -> None:
        """``receives``: this rank's pipeline receives so far, the one it is in included;
        ``sleep_at_once``: wait on the bell without spinning first (cores shared with the CPU ranks)."""
        import torch

        from hetero_shim.collectives import weight_stream

        with open(path) as f:
            pid, fd, size, table_len = (int(v) for v in f.read().split())
        handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        try:
            mm = mmap.mmap(handle, size)
        finally:
            os.close(handle)
        table = json.loads(bytes(mm[ch.HEADER_BYTES:ch.HEADER_BYTES + table_len]))
        seg = self.seg = ch.Segment(mm, table)
        if seg.words[ch.MAGIC] != ch.MAGIC_VALUE:
            raise RuntimeError(f"{path} does not name a hetero_shim GEMM segment")
        self.device, self.client_pid, self.registered = device, pid, False
        self.layers = [_ServedLayer(i, seg, entry) for i, entry in enumerate(table["layers"])]
        # each layer's leading rows, for small steps' splits: after the layers, a ring of their own;
        # each other kind of leading rows (HETERO_SHIM_CPU_GEMM_SPLIT_WIDE, or =adapt) another
        split = [i for i, entry in enumerate(table["layers"]) if entry.get("split")]
        self.kinds: dict[str, dict[int, _ServedLayer]] = {}
        streamed = len(self.layers)
        for kind in ch.KINDS:
            have = [i for i in split if table["layers"][i].get(kind)]
            if have:
                self.kinds[kind] = {i: _ServedLayer(streamed + j, seg, table["layers"][i], kind)
                                    for j, i in enumerate(have)}
                streamed += len(have)
        self.heads = self.kinds.get("split", {})
        self.answered = seg.words[ch.ANSWER]  # a request the client made before this server existed is pending
        self.serving = True  # False once computing a layer failed or the client went idle: waits only
        self.streamer = None
        self.spin_turns = 0 if sleep_at_once else 2000
        if device.type == "cuda":
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(seg.bytes.data_ptr(), size, 0)
            if err != cudart.cudaError.success:
                from hetero_shim.collectives.shm_segment import clear_cuda_error

                clear_cuda_error()
                seg.words[ch.STATE] = ch.FAILED
                raise RuntimeError(f"cudaHostRegister of {size / (1 << 30):.2f} GiB failed ({err})")
            self.registered = True
            streamed = self.layers + [layer for rows in self.kinds.values() for layer in rows.values()]
            slot = max(layer.weight.shape[1] * layer.weight.element_size() * (end - first)
                       for layer in streamed for first, end in layer.pieces)
            rings = (len(self.layers),) + tuple(len(rows) for rows in self.kinds.values())
            self.streamer = weight_stream.WeightStreamer(device, streamed, slot, rings, settings.cpu_gemm_ahead())
        self.step = receives  # the pipeline step being served
        self.ahead = self._step_queue() if self.heads and settings.cpu_gemm_queue_step() else None
        seg.words[ch.TAKEN] = receives - 1  # steps received before this server existed came over gloo
        seg.words[ch.SERVER_PID] = os.getpid()
        ch.remove_file(path)
        log.info("hetero_shim: rank serving the linear layers of large steps of the CPU stage (pid %d) on %s: "
                 "%d layers, %.2f GiB of shared memory%s%s", pid, device, len(self.layers), size / (1 << 30),
                 " registered with CUDA" if self.registered else "",
                 f"; and the leading rows of {len(self.heads)} layers in its small steps" if self.heads else "")
        if "wide" in self.kinds and table.get("wide_tokens"):
            log.info("hetero_shim: small steps of >= %d tokens: more leading rows of %d layers (%s)",
                     table["wide_tokens"], len(self.kinds["wide"]), settings.CPU_GEMM_SPLIT_WIDE)
        elif len(self.kinds) > 1:
            log.info("hetero_shim: small steps take one of %d shares of the leading rows, as the CPU stage's rank "
                     "chooses (%s=%s)", len(self.kinds), settings.CPU_GEMM_SPLIT, settings.cpu_gemm_split_word())

    def _step_queue(self):
        """gemm_queue.StepQueue on this server's stream (the stand-in: a thread), or None (logged)
        where the GPU lacks stream memory operations."""
        from hetero_shim.collectives import stream_ops

        seg = self.seg
        if self.streamer is None:
            def failed(exc):  # on the thread: the host loop sees STATE and releases the rest
                _log_failure(exc)
                seg.words[ch.STATE] = ch.FAILED

            sequence = gemm_queue.ThreadQueue(seg.words, failed)
        else:
            import torch

            ops, why = stream_ops.load(torch.cuda.current_device() if self.device.index is None else self.device.index)
            if ops is None:
                log.info("hetero_shim: small steps' split requests are served as they come (%s)", why)
                return None
            sequence = gemm_queue.StreamQueue(ops, self.streamer.stream, ops.device_pointer(seg.bytes.data_ptr()))
        return gemm_queue.StepQueue(sequence, sorted(self.heads), self._compute_head, seg.words, seg.expect, ch.GO,
                                    ch.DONE, ch.STATE, ch.FAILED)

    def serve_until(self, sends: int) -> bool:
        """Serve requests (while :attr:`serving`) until the client published ``sends`` pipeline
        sends, as long as a gloo receive may wait (HETERO_SHIM_GLOO_TIMEOUT_S) at most. False: the
        client is gone."""
        w, bell = self.seg.words, self.seg.bell
        limit, patience = ch.answer_timeout(), settings.gloo_timeout_seconds()
        idle_since = start = time.monotonic()
        waiter = ch.Waiter(bell, self.spin_turns)
        self.step = sends
        while True:
            seen = bell.count  # before the checks: a ring after them wakes the sleep below
            if self.serving and w[ch.STATE] != ch.OPEN:
                self.serving = False
                self._release()
            if w[ch.SENDS] >= sends:
                if self.ahead is not None and self.ahead.pending():
                    self.ahead.release("a small step ended before the requests queued for it came")
                break
            request = w[ch.REQUEST]
            if self.serving and request != self.answered:
                self.serving = self._serve(request)
                idle_since, waiter.spins = time.monotonic(), 0
                if self.ahead is not None and self.ahead.pending():
                    waiter.spins = waiter.spin_limit  # the step's requests are queued: sleep until it ends
                continue
            waiter.pause(seen)
            if waiter.due():
                now = time.monotonic()
                if not ch.alive(self.client_pid):
                    self._release()
                    return False
                if now - start > patience:
                    raise RuntimeError(f"the CPU stage's rank (pid {self.client_pid}) sent no step within {patience} s "
                                       f"({settings.GLOO_TIMEOUT})")
                if self.serving and now - idle_since > limit:
                    log.warning("hetero_shim: the CPU stage sent neither a request nor its step within %.0f s; "
                                "this rank stops computing its linear layers", limit)
                    w[ch.STATE] = ch.FAILED
                    self.serving = False
                    self._release()
        return True

    def _serve(self, request: int) -> bool:
        """Answer request ``request``; a split one first publishes the step's following requests, which
        are queued after the answer (gemm_queue.py)."""
        w, ahead = self.seg.words, self.ahead
        try:
            if ahead is not None and ahead.pending():
                ahead.release(f"request {request} came as the server had queued others for it (the CPU stage's "
                              f"split layers were not called in load order)")
            rows, index, m, with_bias = w[ch.ROWS], w[ch.LAYER], w[ch.TOKENS], bool(w[ch.BIAS])
            split, kind = rows != 0, w[ch.KIND]
            layer = self._head(index, kind) if split else self.layers[index]
            if split and layer.weight.shape[0] != rows:
                raise RuntimeError(f"layer {index}: asked for {rows} leading rows of a {m}-token step, the table "
                                   f"gives {layer.weight.shape[0]}")
            self._compute(layer, m, with_bias)
            chain = ahead.publish(index, request, self.step, m, with_bias, kind) if ahead is not None and split else []
            if self.streamer is not None:
                self.streamer.stream.synchronize()
            self.answered = request
            w[ch.ANSWER] = request
            if chain:
                ahead.queue(chain, m, kind)
        except Exception as exc:  # noqa: BLE001 - the client computes on the CPU instead
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: BaseException) -> None:
        _log_failure(exc)
        self.seg.words[ch.STATE] = ch.FAILED
        self._release()
        if self.streamer is not None:
            self.streamer.forget()

    def _release(self) -> None:
        """After STATE became FAILED or the client went: queued requests run and are waited for."""
        if self.ahead is not None:
            self.ahead.release(None)

    def _head(self, index: int, kind: int):
        """The leading rows of layer ``index`` of the kind a request names (an index into gemm_channel.KINDS)."""
        name = ch.KINDS[kind] if 0 <= kind < len(ch.KINDS) else None
        rows = self.kinds.get(name, {}).get(index)
        if rows is None:
            raise RuntimeError(f"layer {index}: a split of kind {kind} ({name}) asked for, which the table does "
                               "not give")
        return rows

    def _compute_head(self, index: int, m: int, with_bias: bool, kind: int = 0) -> None:
        self._compute(self._head(index, kind), m, with_bias)

    def _compute(self, layer, m: int, with_bias: bool) -> None:
        """``x @ layer.weight.T (+ bias)`` of the segment's regions into y: queued on the streamer's
        stream (not waited for), or on the stand-in computed here."""
        import torch

        n, k = layer.weight.shape
        dtype = layer.weight.dtype
        elem = layer.weight.element_size()
        x = self.seg.region("x", m * k * elem, dtype).view(m, k)
        bias = self.seg.region("bias", n * elem, dtype) if with_bias else None
        y = self.seg.region("y", m * n * elem, dtype)
        if self.streamer is None:  # the stand-in: this rank's own CPU
            for first, end in layer.pieces:
                part = torch.nn.functional.linear(x, layer.weight[first:end], None if bias is None else bias[first:end])
                ch.piece(y, m, first, end).copy_(part)
        else:
            self._on_gpu(layer, x, bias, y, m)

    def _on_gpu(self, layer, x, bias, y, m: int) -> None:
        import torch

        streamer, dev = self.streamer, self.device
        before = torch.cuda.current_stream(dev)
        torch.cuda.set_stream(streamer.stream)
        try:
            flat = x.to(dev, non_blocking=True)
            gpu_bias = None if bias is None else bias.to(dev, non_blocking=True)

            def emit(first, end, part):
                ch.piece(y, m, first, end).copy_(part, non_blocking=True)

            streamer.multiply(flat, layer, gpu_bias, emit)
        finally:
            torch.cuda.set_stream(before)


def _log_failure(exc: BaseException) -> None:
    log.warning("hetero_shim: computing the CPU stage's linear layer failed (%s: %s); it computes on the CPU "
                "from now on", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


class _ServedLayer:
    """A layer as the server sees it: its weight in the segment and its pieces; with ``split`` (one
    of gemm_channel.KINDS), only those leading rows, in their pieces."""

    __slots__ = ("index", "weight", "pieces")

    def __init__(self, index: int, seg: ch.Segment, entry: dict, split: str = "") -> None:
        import torch

        n, k = entry["shape"]
        dtype = getattr(torch, entry["dtype"])
        nbytes = n * k * dtype.itemsize
        self.index = index
        self.weight = seg.bytes[entry["offset"]:entry["offset"] + nbytes].view(dtype).view(n, k)
        self.pieces = [tuple(p) for p in entry["pieces"]]
        if split:
            self.weight, self.pieces = self.weight[:entry[split]], [tuple(p) for p in entry[f"{split}_pieces"]]
