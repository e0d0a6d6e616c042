"""A CPU pipeline stage's large linear layers computed by the next stage's GPU rank.

Why: a CPU rank that opened a GPU itself for its prefill steps held a CUDA context there (0.77 GiB
on the H200 besides its weight buffers), which the layer split must charge to the GPU stage: 2-5
fewer layers on the GPU, every decode step slower. The next stage's GPU rank has a context already,
and while the CPU stage computes a step it only waits for that step's activations. So the CPU rank
(the *client*, this module) puts its linear weights in shared memory, and for each large-token call
writes the input there and waits; the GPU rank (the *server*, gemm_server.py), inside its wait for
the CPU stage's activations, streams the weights to its GPU (weight_stream) and writes the result
back.

Segment: a ``memfd`` of the CPU rank (anonymous shared memory, so /dev/shm's size does not limit
it; its pages are reserved with ``posix_fallocate`` for a clean error when memory is short), found
by the GPU rank through a small file ``/dev/shm/hetero_shim_<uid>_<cpu rank pid>_gemm_<engine core
pid>_<cpu rank>`` holding "pid fd size" (both ranks are children of the engine core), which the GPU
rank removes once it opened ``/proc/<pid>/fd/<fd>``; the CPU rank removes it at exit if no GPU rank
came, and ``collectives.sweep`` removes one whose CPU rank was killed. The GPU rank
registers the whole segment with CUDA (``cudaHostRegister``), so weights cross at pinned speed.

Layout::

    header   4 KiB: int64 words, each on its own 64-byte line (MAGIC .. DONE below)
    table    1 MiB: JSON: per layer the weight's offset, shape, dtype and row pieces; the regions
    expect   four int64 words per layer: a request the server queued ahead (gemm_queue.py)
    x        max_num_batched_tokens x the largest input width: a request's activations
    act      twice that: a pipeline step's activations handed to the server (stage_handover.py)
    meta     64 KiB: that step's tensor layout, pickled
    bias     the largest output width: a request's bias
    y        max_num_batched_tokens x the largest output width: the result, piece after piece
             (piece [first, end) of output columns as a contiguous [tokens, end - first] block)
    weights  each layer's weight, 4 KiB aligned

Protocol: the client writes x (and bias), LAYER, TOKENS, BIAS, ROWS, KIND, then REQUEST = n; the
server computes and writes y, then ANSWER = n (after its stream is synchronised). ROWS 0 asks for
the whole layer; otherwise for its leading rows of the kind KIND names (an index into ``KINDS``: the
table's ``split`` rows, ``ROWS`` of them, in ``split_pieces``; in steps of at least the table's
``wide_tokens`` tokens its ``wide`` rows, in ``wide_pieces``, where ``HETERO_SHIM_CPU_GEMM_SPLIT_WIDE``
is set; with ``HETERO_SHIM_CPU_GEMM_SPLIT=adapt`` the kind the client chose for the step among
``low``, ``split`` and ``wide``, collectives/share_choice.py), which a small step's split asks for; the
client computes the other rows meanwhile (``start`` ... ``finish``), and the server streams those
leading rows through the same two buffers, as a ring of layers of their own per kind, the next
layer's queued behind each answer, so that PCIe carries the next layer's rows while the CPU computes
this one's. With
``HETERO_SHIM_CPU_GEMM_QUEUE_STEP`` (default 1) the server queues a step's further split requests
before they come; those go through GO and DONE instead of REQUEST and ANSWER (gemm_queue.py).
Pipeline steps are matched by count: the client publishes SENDS = its pipeline sends so far before each send; a GPU
rank at its k-th receive serves requests until SENDS >= k, then receives as vLLM would. The client
rings BELL (collectives/doorbell.py) after each REQUEST, SENDS or STATE it publishes, and the server
sleeps on it between them: by default after ~2000 ``sched_yield`` turns, at once where the plan
shares the reserved cores with the CPU ranks (a poller there would displace one of their threads). Memory
ordering: x86-64 TSO, as in ``shm.py`` (data written, then the 8-byte aligned flag stored;
readers load the flag first).

Failures never change a result: the client falls back to vLLM's CPU kernel (``STATE`` FAILED, the
server stops serving) when the server reports a failure, when no answer came within
``HETERO_SHIM_CPU_GEMM_SERVED_TIMEOUT`` seconds (default 60), or when the server process is gone;
the server stops serving (the CPU rank then computes on its own) when the client is gone or idle
that long inside one wait.
"""

from __future__ import annotations

import json
import mmap
import os
import time

from hetero_shim import settings
from hetero_shim.collectives import gemm_queue
from hetero_shim.collectives.doorbell import NAP_S, Doorbell

#: HETERO_SHIM_CPU_RANK_GPU of a CPU rank whose large steps the next stage's rank computes
NEXT_STAGE = "next-stage"
HEADER_BYTES = 4096
TABLE_BYTES = 1 << 20
ALIGN = 4096
LINE = 8  # int64 words per 64-byte line
MAGIC_VALUE = 0x6873676D6D  # "hsgmm"
MAGIC, REQUEST, ANSWER, SENDS, STATE, LAYER, TOKENS, BIAS, CLIENT_PID, SERVER_PID, TAKEN, META_LEN, MODES, BELL, ROWS, \
    GO, DONE, KIND = (i * LINE for i in range(18))
RING = LINE  # MODES: the hand-over mode of step k in word MODES + k % RING (stage_handover.py)
META_BYTES = 64 << 10
BELL_WAIT_S = 0.1  # longest sleep on the bell: the peer's liveness is checked between sleeps
OPEN, FAILED = 0, 1
DTYPES = ("float32", "bfloat16", "float16")
#: a split's kinds of leading rows, by the index KIND carries: the share of HETERO_SHIM_CPU_GEMM_SPLIT,
#: the larger one of HETERO_SHIM_CPU_GEMM_SPLIT_WIDE or of ``adapt``, and ``adapt``'s smaller one
KINDS = ("split", "wide", "low")



def path_for(client_rank: int, client_pid: int | None = None) -> str:
    """The file that names a client's segment: ``hetero_shim_<uid>_<client pid>_gemm_<engine core pid>_<rank>``
    (the creator's pid where ``collectives.sweep`` looks for it: a file whose creator died is swept)."""
    pid = os.getpid() if client_pid is None else client_pid
    return f"/dev/shm/hetero_shim_{os.getuid()}_{pid}_gemm_{os.getppid()}_{client_rank}"


def find_client(client_rank: int) -> str | None:
    """The file of ``client_rank``'s segment (a child of the same engine core), if it exists."""
    import glob

    found = glob.glob(f"/dev/shm/hetero_shim_{os.getuid()}_*_gemm_{os.getppid()}_{client_rank}")
    return found[0] if found else None


def server_rank(plan, rank: int) -> int | None:
    """The rank that computes ``rank``'s large steps: the next stage's rank of the same TP index, if
    ``rank`` is a CPU rank of a pipeline and that rank is a GPU rank."""
    if plan is None or plan.pp_size < 2 or plan.kind(rank) != "cpu":
        return None
    tp = plan.world_size // plan.pp_size
    nxt = rank + tp
    return nxt if nxt < plan.world_size and plan.kind(nxt) == "gpu" else None


def client_rank(plan, rank: int, stand_in: bool = False) -> int | None:
    """The CPU rank whose large steps ``rank`` computes (the previous stage's rank of the same TP
    index), if any; ``stand_in``: a CPU rank serves too (tests on machines without a GPU)."""
    if plan is None or plan.pp_size < 2:
        return None
    tp = plan.world_size // plan.pp_size
    prev = rank - tp
    if prev < 0 or plan.kind(prev) != "cpu" or (plan.kind(rank) != "gpu" and not stand_in):
        return None
    return prev


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process not yet reaped by its parent counts as gone)."""
    from hetero_shim.collectives.shm_segment import process_start_time

    return process_start_time(pid) is not None


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def piece(y, tokens: int, first: int, end: int):
    """Output columns [first, end) of a result in the y region: each piece is one contiguous
    [tokens, end - first] block, the pieces in order."""
    return y[tokens * first:tokens * end].view(tokens, end - first)


def answer_timeout() -> float:
    """HETERO_SHIM_CPU_GEMM_SERVED_TIMEOUT in seconds."""
    return float(settings.cpu_gemm_served_timeout())


class Waiter:
    """How both sides wait for the other: spin with sched_yield (``spins`` turns, a few ms), then
    sleep: on the bell until it moves past ``seen`` (the server), else 50 us a turn; :meth:`due`
    says when 0.5 s passed since the last check of the peer."""

    def __init__(self, bell: Doorbell | None = None, spins: int = 2000) -> None:
        self.spins, self.spin_limit, self.bell = 0, spins, bell
        self.checked = time.monotonic()

    def pause(self, seen: int | None = None) -> None:
        self.spins += 1
        if self.spins <= self.spin_limit:
            os.sched_yield()
        elif self.bell is not None and seen is not None:
            self.bell.wait(seen, BELL_WAIT_S)
        else:
            time.sleep(NAP_S)

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.checked > 0.5:
            self.checked = now
            return True
        return False


class Segment:
    """The mapped segment: header words, regions as torch views."""

    def __init__(self, mm: mmap.mmap, table: dict) -> None:
        import torch

        self.mm, self.table = mm, table
        self.words = memoryview(mm)[:HEADER_BYTES].cast("q")
        off, size = table["expect"]
        self.expect = memoryview(mm)[off:off + size].cast("q")
        self.bytes = torch.frombuffer(mm, dtype=torch.uint8)
        self.bell = Doorbell(mm, BELL * 8)

    def region(self, name: str, nbytes: int, dtype):
        off, size = self.table[name]
        if nbytes > size:
            raise RuntimeError(f"{name}: {nbytes} bytes asked, the segment holds {size}")
        return self.bytes[off:off + nbytes].view(dtype)


def split_kind(table: dict, index: int, tokens: int) -> str:
    """Which rows a split of layer ``index`` in a ``tokens``-token step asks for where the client does
    not choose (``adapt``): ``"wide"`` (the layer's wide rows, from the table's ``wide_tokens`` on,
    where it has them) or ``"split"``. The answer names the table entry (``entry[kind]`` rows, streamed
    as ``entry[kind + "_pieces"]``); the request carries it (KIND)."""
    wide_from = table.get("wide_tokens", 0)
    return "wide" if wide_from and tokens >= wide_from and table["layers"][index].get("wide") else "split"


def _layout(layers: list, max_tokens: int, wide_tokens: int = 0) -> tuple[dict, int]:
    def up(n: int) -> int:
        return -(-n // ALIGN) * ALIGN

    elem = max(layer.weight.element_size() for layer in layers)
    widest_in = max(layer.weight.shape[1] for layer in layers)
    widest_out = max(layer.weight.shape[0] for layer in layers)
    table: dict = {}
    at = HEADER_BYTES + TABLE_BYTES
    for name, size in (("expect", gemm_queue.region_bytes(len(layers))),
                       ("x", max_tokens * widest_in * elem), ("act", 2 * max_tokens * widest_in * elem),
                       ("meta", META_BYTES), ("bias", widest_out * elem), ("y", max_tokens * widest_out * elem)):
        table[name] = (at, size)
        at += up(size)
    entries = []
    for layer in layers:
        w = layer.weight
        entries.append({"offset": at, "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."),
                        "pieces": [list(p) for p in layer.pieces], "split": getattr(layer, "split_rows", 0),
                        "split_pieces": [list(p) for p in getattr(layer, "split_pieces", ())],
                        "wide": getattr(layer, "wide_rows", 0),
                        "wide_pieces": [list(p) for p in getattr(layer, "wide_pieces", ())],
                        "low": getattr(layer, "low_rows", 0),
                        "low_pieces": [list(p) for p in getattr(layer, "low_pieces", ())]})
        at += up(w.numel() * w.element_size())
    table["layers"] = entries
    table["max_tokens"] = max_tokens
    table["wide_tokens"] = wide_tokens
    return table, at


class GemmClient:
    """The CPU rank's side: the segment with its weights; :meth:`linear` asks the server."""

    def __init__(self, layers: list, max_tokens: int, rank: int, sends: int = 0, wide_tokens: int = 0) -> None:
        """``layers``: objects with ``weight`` (a CPU tensor) and ``pieces`` (and, where small steps
        split, ``split_rows``, ``split_pieces``, ``wide_rows``, ``wide_pieces``); each ``weight`` is
        replaced by its copy in the segment. ``sends``: this rank's pipeline sends so far;
        ``wide_tokens``: from how many tokens a split takes the wide rows (0: never)."""
        table, size = _layout(layers, max_tokens, wide_tokens)
        fd = os.memfd_create("hetero_shim_gemm")
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            raise RuntimeError(f"could not reserve {size / (1 << 30):.2f} GiB of shared memory for the weights "
                               f"({exc})") from None
        self.fd, self.size, self.rank = fd, size, rank
        seg = self.seg = Segment(mm, table)
        for layer, entry in zip(layers, table["layers"]):
            w = layer.weight
            view = seg.bytes[entry["offset"]:entry["offset"] + w.numel() * w.element_size()].view(w.dtype)
            layer.weight = view.view(w.shape).copy_(w)
        text = json.dumps(table).encode()
        if len(text) > TABLE_BYTES:
            raise RuntimeError(f"the layer table takes {len(text)} bytes, more than {TABLE_BYTES}")
        mm[HEADER_BYTES:HEADER_BYTES + len(text)] = text
        w = seg.words
        w[SENDS], w[STATE], w[CLIENT_PID], w[REQUEST], w[ANSWER] = sends, OPEN, os.getpid(), 0, 0
        w[MAGIC] = MAGIC_VALUE
        self.path = path_for(rank)
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {fd} {size} {len(text)}")
        os.replace(tmp, self.path)
        self.requests = 0
        self.sends = sends  # pipeline sends published: the step being computed is the next
        self.queued = False  # the last request went through GO (queued by the server), not REQUEST
        self.kind = None  # the last request's split_kind (None: the whole layer)
        self.failed: str | None = None
        # per layer (n, k, dtype, entry), and the region views of small steps, made once: a decode
        # step makes 4 requests per layer, and each torch view costs microseconds of Python
        self.layer_info: dict[int, tuple] = {}
        self.views: dict[tuple, object] = {}

    def wait_taken(self, step: int) -> None:
        """Until the server copied out the activations of pipeline step ``step`` (stage_handover.py);
        as long as a gloo send may wait for its receiver (HETERO_SHIM_GLOO_TIMEOUT_S) at most."""
        w = self.seg.words
        waiter = Waiter()
        start, limit = time.monotonic(), settings.gloo_timeout_seconds()
        while w[TAKEN] < step:
            waiter.pause()
            if waiter.due():
                if not alive(w[SERVER_PID]):
                    raise RuntimeError("the next stage's rank is gone")
                if time.monotonic() - start > limit:
                    raise RuntimeError(f"the next stage's rank took no step's activations within {limit} s "
                                       f"({settings.GLOO_TIMEOUT})")

    def linear(self, x, index: int, bias):
        """``x @ weight[index].T + bias`` computed by the server; raises RuntimeError when it cannot
        (the caller then computes on the CPU from now on)."""
        self.start(x, index, bias)
        return self.finish(x, index)

    def start(self, x, index: int, bias, split: bool = False, kind: str | None = None) -> str | None:
        """Ask for layer ``index`` without waiting; :meth:`finish` waits for the answer. ``split``:
        its leading rows only (and ``bias``'s), of ``kind`` (one of ``KINDS``, the same for every
        request of a step) or, without it, as :func:`split_kind` says; returns that kind (None
        without ``split``), which :meth:`finish` uses too."""
        w = self.seg.words
        if w[STATE] != OPEN:
            raise RuntimeError("the next stage's rank stopped computing for this rank")
        n, k, dtype, entry = self.layer(index)
        elem = dtype.itemsize
        flat = x if x.dim() == 2 and x.shape[1] == k else x.reshape(-1, k)
        m = flat.shape[0]
        self.kind = (kind or split_kind(self.seg.table, index, m)) if split else None
        rows = entry[self.kind] if split else 0
        kind_id = KINDS.index(self.kind) if split else 0
        self.queued = split and gemm_queue.matches(self.seg.expect, index, self.requests + 1, self.sends + 1, m,
                                                   bias is not None, kind_id)
        if split:
            key = ("x", m, k, dtype)
            dest = self.views.get(key)
            if dest is None:
                dest = self.views[key] = self.seg.region("x", m * k * elem, dtype).view(m, k)
        else:  # a large step: its size varies too much to keep a view per size
            dest = self.seg.region("x", m * k * elem, dtype).view(m, k)
        dest.copy_(flat)
        if bias is not None:
            self.seg.region("bias", (rows or n) * elem, dtype).copy_(bias[:rows] if rows else bias)
        self.requests += 1
        if self.queued:  # the server's stream waits for this word; its host is not woken
            w[GO] = self.requests
            return self.kind
        w[LAYER], w[TOKENS], w[BIAS], w[ROWS], w[KIND] = index, m, int(bias is not None), rows, kind_id
        w[REQUEST] = self.requests
        self.seg.bell.ring()
        return self.kind

    def finish(self, x, index: int, tail=None):
        """The answer to the last :meth:`start` (the rows of the kind it chose): ``[*x.shape[:-1], rows]``,
        a new tensor. ``tail`` (a split's other rows, computed here: a tensor, or a tuple of them in
        column order) is joined after the answer in the same copy out of shared memory:
        ``[*x.shape[:-1], rows + tail's]``."""
        import torch

        self._wait(self.requests, DONE if self.queued else ANSWER)
        n, k, dtype, entry = self.layer(index)
        m = x.numel() // k
        if self.kind is not None:  # a small step: its answer's views made once per size
            key = ("y", index, self.kind, m)
            answer = self.views.get(key)
            if answer is None:
                answer = self.views[key] = self.answer_views(entry[self.kind], entry[self.kind + "_pieces"], m, dtype)
            n, parts = answer[0], list(answer[1])
        else:
            n, parts = self.answer_views(n, entry["pieces"], m, dtype)
        for part in () if tail is None else tail if isinstance(tail, tuple) else (tail,):
            parts.append(part if part.dim() == 2 and part.shape[0] == m else part.reshape(m, -1))
            n += parts[-1].shape[1]
        out = parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=1)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], n)

    def layer(self, index: int) -> tuple:
        """(n, k, dtype, table entry) of layer ``index``."""
        got = self.layer_info.get(index)
        if got is None:
            import torch

            entry = self.seg.table["layers"][index]
            n, k = entry["shape"]
            got = self.layer_info[index] = (n, k, getattr(torch, entry["dtype"]), entry)
        return got

    def answer_views(self, n: int, pieces: list, m: int, dtype) -> tuple[int, list]:
        """(n, views of the y region): an answer of ``n`` output columns for ``m`` tokens, piece by piece."""
        y = self.seg.region("y", m * n * dtype.itemsize, dtype)
        return n, [piece(y, m, first, end) for first, end in pieces]

    def _wait(self, request: int, word: int = ANSWER) -> None:
        """Until ``word`` (ANSWER, or DONE for a queued request) reaches ``request``; STATE is read
        after it (a server that stopped releases its queued requests after setting it)."""
        w = self.seg.words
        if w[word] >= request and w[STATE] == OPEN:  # answered already: no clock, no setting read
            return
        start = time.monotonic()
        limit = answer_timeout()
        waiter = Waiter()
        while w[word] < request or w[STATE] != OPEN:
            if w[STATE] != OPEN:
                raise RuntimeError("the next stage's rank failed to compute a linear layer (its log says why)")
            waiter.pause()
            if waiter.due():
                now = time.monotonic()
                server = w[SERVER_PID]
                if server and not alive(server):
                    self.fail("the next stage's rank is gone")
                    raise RuntimeError("the next stage's rank is gone")
                if not server and not os.path.exists(self.path) and not w[SERVER_PID]:  # took the file, never came
                    self.fail("the next stage's rank could not open this rank's weights")
                    raise RuntimeError("the next stage's rank could not open this rank's weights (its log says why)")
                if now - start > limit:
                    self.fail(f"no answer within {limit:.0f} s")
                    raise RuntimeError(f"the next stage's rank did not answer within {limit:.0f} s "
                                       f"({settings.CPU_GEMM_SERVED_TIMEOUT})")

    def fail(self, why: str) -> None:
        self.failed = why
        self.seg.words[STATE] = FAILED
        self.seg.bell.ring()

    def publish_sends(self, k: int) -> None:
        """This rank's k-th pipeline send is published (its mode and activations written before)."""
        self.sends = k
        self.seg.words[SENDS] = k
        self.seg.bell.ring()

    def close(self) -> None:
        remove_file(self.path)
