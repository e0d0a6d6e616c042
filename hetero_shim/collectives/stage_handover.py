"""A CPU stage's activations handed to the next (GPU) stage through the GEMM channel's segment.

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

import pickle

from hetero_shim.collectives import gemm_channel as ch
from hetero_shim.logs import log

SHM, GLOO = 1, 2
ALIGN = 64
_announced = False


def send(client: ch.GemmClient, k: int, tensor_dict: dict, all_gather: bool) -> bool:
    """The client's k-th send. True: handed over through the segment (vLLM's send is skipped);
    False: the step goes over gloo as vLLM sends it."""
    w = client.seg.words
    layout = None if all_gather or not w[ch.SERVER_PID] else _layout(client.seg, tensor_dict)
    if layout is None:
        w[ch.MODES + k % ch.RING] = GLOO
        w[ch.SENDS] = k
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
    w[ch.SENDS] = k
    return True


def _layout(seg, tensor_dict: dict) -> tuple[bytes, list] | None:
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


def receive(server: ch.GemmServer, k: int, device) -> dict | None:
    """The server's k-th receive, once the client published it: the step's tensors on ``device``,
    or None when it comes over gloo (vLLM then receives it)."""
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
        numel = 1
        for d in shape:
            numel *= d
        view = act[start + offset:start + offset + numel * dtype.itemsize].view(dtype).view(shape)
        tensors[key] = view.to(device, non_blocking=True) if device.type == "cuda" else view.clone()
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # copied out before the client may write again
    w[ch.TAKEN] = k
    global _announced
    if not _announced:
        _announced = True
        log.info("hetero_shim: this rank takes the CPU stage's activations from their shared memory (step %d: %s)",
                 k, ", ".join(f"{key} {tuple(v.shape)}" for key, v in tensors.items() if hasattr(v, "shape")))
    return tensors
