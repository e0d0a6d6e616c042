"""The pipeline's side of the GEMM channel: this process's end of it, counted by pipeline step,
and a CPU stage's activations handed to the next (GPU) stage through the channel's segment.

``patches/per_step/pipeline_transfer.py`` calls :func:`before_send` before each pipeline send and
:func:`before_receive` before each receive; ``patches/per_step/cpu_gemm_on_gpu.py`` opens the
client end (:func:`open_client`). The next stage's rank opens the server end at its first receive
after the client's segment appeared, and serves its linear layers while it waits.

Why: vLLM sends a stage's ``IntermediateTensors`` with ``isend_tensor_dict``: the pickled metadata
and then each tensor over gloo. Gloo delivers a message only once the receiver has posted its
receive, and the GPU rank posts it only after it stopped serving the CPU stage's linear layers
(``gemm_channel``). Measured on the H200 (3B, batch-1 decode): the CPU rank's four gloo sends took
2.4 ms a step, ~5 % of it. The two ranks already share a segment that the GPU rank registered
with CUDA, so the CPU rank writes the tensors there and the GPU rank copies them to its device.

Protocol (words of ``gemm_channel``'s header; steps counted on both sides as there): for its
k-th send the client writes the mode of step k into ``MODES[k % RING]`` (``SHM`` or ``GLOO``) and
then publishes ``SENDS = k``; the server, at its k-th receive, reads the mode once ``SENDS >= k``.
In ``SHM`` mode the client first waits until ``TAKEN >= k - 1`` (the server has copied the previous
step out), writes each tensor into the ``act`` region and the pickled layout into ``meta``; the
server builds the step's tensors on its device from there and sets ``TAKEN = k``. ``GLOO`` mode
(the server not attached yet, a tensor dict that does not fit, a tensor-parallel all-gather) sends
as vLLM does; the server sets ``TAKEN = k`` and receives as vLLM does. The server sets ``TAKEN`` to
its receives so far when it attaches, so the client never waits for a step received over gloo.
"""

from __future__ import annotations

import math
import pickle

from hetero_shim.collectives import gemm_channel as ch, gemm_server
from hetero_shim.logs import log

SHM, GLOO = 1, 2
ALIGN = 64
_announced = False
_sends = 0  # this process's pipeline sends so far (a CPU stage's rank)
_receives = 0  # this process's pipeline receives so far (the next stage's rank)
_client: ch.GemmClient | None = None
_server: gemm_server.GemmServer | None = None
_server_gone = False  # stop looking for a client after a failure


def open_client(layers: list, max_tokens: int, rank: int, wide_tokens: int = 0) -> ch.GemmClient:
    """The CPU rank's end: its linear weights moved into a new segment (gemm_channel.GemmClient)."""
    global _client
    _client = ch.GemmClient(layers, max_tokens, rank, sends=_sends, wide_tokens=wide_tokens)
    import atexit

    atexit.register(_client.close)
    return _client


def before_send(tensor_dict: dict, vllm_only: bool) -> bool:
    """A CPU stage's rank is about to send a step's activations. True: they were handed to the next
    stage's rank through the segment, so vLLM's send is skipped. ``vllm_only``: the send takes a path
    the hand-over does not copy (an explicit destination, a tensor-parallel all-gather of slices)."""
    global _sends
    _sends += 1
    if _client is None:
        return False
    return send(_client, _sends, tensor_dict, vllm_only)


def before_receive(plan, rank: int, device, stand_in: bool) -> dict | None:
    """The next stage's rank is about to wait for a step's activations: serve its client meanwhile.
    Returns the step's tensors when they came through the segment, else None (vLLM receives them)."""
    global _receives, _server, _server_gone
    _receives += 1
    if _server_gone:
        return None
    if _server is None:
        client = ch.client_rank(plan, rank, stand_in)
        if client is None:
            _server_gone = True
            return None
        path = ch.find_client(client)
        if path is None:
            return None  # the CPU rank has not opened its side (or keeps its layers on the CPU)
        try:
            _server = gemm_server.GemmServer(path, device, receives=_receives, sleep_at_once=bool(plan.shared_cores))
        except Exception as exc:  # noqa: BLE001 - the client sees the file gone and computes on the CPU
            log.warning("hetero_shim: cannot compute the CPU stage's linear layers here: %s: %s",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _server_gone = True
            ch.remove_file(path)
            return None
    if not _server.serve_until(_receives):
        _server_gone = True  # the client is gone: vLLM's receive reports it
        return None
    return receive(_server, _receives, device)


def send(client: ch.GemmClient, k: int, tensor_dict: dict, vllm_only: bool) -> bool:
    """The client's k-th send. True: handed over through the segment (vLLM's send is skipped);
    False: the step goes over gloo as vLLM sends it."""
    w = client.seg.words
    layout = None if vllm_only or not w[ch.SERVER_PID] else _placement(client.seg, tensor_dict)
    if layout is None:
        w[ch.MODES + k % ch.RING] = GLOO
        client.publish_sends(k)
        return False
    meta, placed = layout
    client.wait_taken(k - 1)
    act = client.seg.bytes
    start, _ = client.seg.table["act"]
    for tensor, offset in placed:
        nbytes = tensor.numel() * tensor.element_size()
        act[start + offset:start + offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    m_start, _ = client.seg.table["meta"]
    client.seg.mm[m_start:m_start + len(meta)] = meta
    w[ch.META_LEN] = len(meta)
    w[ch.MODES + k % ch.RING] = SHM
    client.publish_sends(k)
    return True


def _placement(seg, tensor_dict: dict) -> tuple[bytes, list] | None:
    """(pickled layout, [(tensor, offset in act)]) of a dict of CPU tensors that fits the segment."""
    import torch

    items, placed, at = [], [], 0
    _, act_size = seg.table["act"]
    for key, value in tensor_dict.items():
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                return None
            value = value.contiguous()
            items.append((key, ("tensor", str(value.dtype).removeprefix("torch."), tuple(value.shape), at)))
            placed.append((value, at))
            at += -(-value.numel() * value.element_size() // ALIGN) * ALIGN
        else:
            items.append((key, ("value", value)))
    meta = pickle.dumps(items)
    if at > act_size or len(meta) > seg.table["meta"][1]:
        return None
    return meta, placed


def receive(server: gemm_server.GemmServer, k: int, device) -> dict | None:
    """The server's k-th receive, once the client published it: the step's tensors on ``device``,
    or None when it comes over gloo (vLLM then receives it)."""
    global _announced
    import torch

    w = server.seg.words
    if w[ch.MODES + k % ch.RING] != SHM:
        w[ch.TAKEN] = k
        return None
    m_start, _ = server.seg.table["meta"]
    items = pickle.loads(bytes(server.seg.mm[m_start:m_start + w[ch.META_LEN]]))  # noqa: S301 - our own peer
    start, _ = server.seg.table["act"]
    act = server.seg.bytes
    tensors: dict = {}
    for key, (kind, *rest) in items:
        if kind == "value":
            tensors[key] = rest[0]
            continue
        dtype_name, shape, offset = rest
        dtype = getattr(torch, dtype_name)
        view = act[start + offset:start + offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        tensors[key] = view.to(device, non_blocking=True) if device.type == "cuda" else view.clone()
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # copied out before the client may write again
    w[ch.TAKEN] = k
    if not _announced:
        _announced = True
        log.info("hetero_shim: this rank takes the CPU stage's activations from their shared memory (step %d: %s)",
                 k, ", ".join(f"{key} {tuple(v.shape)}" for key, v in tensors.items() if hasattr(v, "shape")))
    return tensors
