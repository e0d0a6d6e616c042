"""A small step's split requests queued by the next stage's rank before they come
(``HETERO_SHIM_CPU_GEMM_QUEUE_STEP``, default 1; used by ``gemm_server`` and ``gemm_channel``'s client).

Why: in a small (decode) step the CPU rank asks the next stage's GPU rank for the leading rows of
each split layer, computes the other rows meanwhile, and waits for the answer. Measured on the H200
(3B, profiled 1-token steps): with the GPU's weight pieces copied ahead, the GPU rank's stream waited
0.5 ms a step, but its host took 11.5-16 ms a step to pick each of 56 requests up, queue its copies
and GEMMs, synchronise and answer; a request whose CPU rows take less (``qkv_proj``, ``o_proj``)
waits for that. The order of a step's requests is the model's layer order, the same every step, so
once the step's first split request came (its token count known), the server queues all the others
on its stream, each behind a wait for the CPU rank's go: its host work overlaps the CPU's.

Protocol (words of ``gemm_channel``'s header; ``EXPECT``: the segment's ``expect`` region, four int64
words per layer of the table: request number, step, tokens, and bias + 2 x the kind: which rows, an
index into ``gemm_channel.KINDS``, the same for all the requests of a step):
- the server answers a split request ``n`` of step ``k`` as before, but first publishes, for each
  split layer that follows in load order (and whose bias it has seen), ``EXPECT[layer] = (q, k,
  tokens, bias + 2 kind)`` with ``q = n + 1, n + 2, ...``; only then it answers ``n``, and queues for each
  ``q``: a stream wait until ``GO >= q``, the layer's copies and GEMMs (as for any request), and a
  stream write ``DONE = q`` after the result's copy to host memory;
- the client, for a split request numbered ``q`` of its step ``k``, takes that path only if
  ``EXPECT[layer]`` is exactly ``(q, k, its tokens, its bias + 2 kind)``: it writes its input and then
  ``GO = q``, and waits for ``DONE >= q``; anything else goes as a plain request (``REQUEST``);
- the entries of a request are published before the answer that lets the client make it (x86-64
  stores are seen in program order, and the answer of ``n`` is stored after them), so the client
  never decides "plain" for a request that the server has queued, except where its request is not
  the predicted one: a plain request while queued ones are pending, or the step ending before they
  came, makes the server release them (``GO`` set to ``RELEASED``: they run on whatever input is in
  the segment, and nobody reads their results), wait until they ran, and from then on serve each
  request as it comes (logged once). A server that stops serving (a failure, the client gone or
  idle) sets ``STATE`` FAILED before releasing, and the client checks ``STATE`` after ``DONE``, so a
  released request's result is never taken for an answer; while it waits for the released requests
  it stores ``RELEASED`` again between looks, since a client that matched an entry just before the
  release may store its ``GO`` after it.

On a GPU the waits and writes are CUDA stream memory operations (``stream_ops``) on the weight
streamer's stream; the stand-in server (a CPU rank, tests without a GPU) runs the same sequence on a
thread of its own. Remove when: never while the split exists (vLLM has no such channel).
"""

from __future__ import annotations

import atexit
import queue
import threading
import time

from hetero_shim.collectives.stream_ops import RELEASED  # GO after a release: every queued wait passes
from hetero_shim.logs import log

ENTRY = 4  # int64 words per layer in the expect region
NAP_S = 20e-6


def region_bytes(layers: int) -> int:
    return ENTRY * 8 * max(1, layers)


def matches(expect, index: int, request: int, step: int, tokens: int, bias: bool, kind: int = 0) -> bool:
    """Whether the server queued request ``request`` for layer ``index`` as the client would make it."""
    at = ENTRY * index
    return (expect[at] == request and expect[at + 1] == step and expect[at + 2] == tokens
            and expect[at + 3] == int(bias) + 2 * kind)


class StreamQueue:
    """The sequence on a CUDA stream: waits and writes are stream memory operations on the
    segment's words (registered with CUDA: ``base`` is its device address); ``run`` queues the
    GPU work at once, on that stream."""

    def __init__(self, ops, stream, base: int) -> None:
        self.ops, self.stream, self.base = ops, stream, base

    def wait_at_least(self, word: int, value: int) -> None:
        self.ops.wait_at_least(self.stream.cuda_stream, self.base + 8 * word, value)

    def run(self, fn) -> None:
        fn()

    def write(self, word: int, value: int) -> None:
        self.ops.write(self.stream.cuda_stream, self.base + 8 * word, value)

    def drain(self, meanwhile) -> None:
        """Until everything queued ran, calling ``meanwhile`` between looks."""
        while not self.stream.query():
            meanwhile()
            time.sleep(NAP_S)


class ThreadQueue:
    """The same sequence run by a thread of this process (the stand-in server on a CPU rank)."""

    def __init__(self, words, on_error) -> None:
        self.words, self.on_error = words, on_error
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="hetero_shim-gemm-queue", daemon=True).start()

    def wait_at_least(self, word: int, value: int) -> None:
        self.jobs.put(("wait", word, value))

    def run(self, fn) -> None:
        self.jobs.put(("run", fn, None))

    def write(self, word: int, value: int) -> None:
        self.jobs.put(("write", word, value))

    def drain(self, meanwhile) -> None:
        done = threading.Event()
        self.jobs.put(("mark", done, None))
        while not done.wait(0.001):
            meanwhile()

    def _loop(self) -> None:
        words = self.words
        while True:
            kind, a, b = self.jobs.get()
            if kind == "wait":
                while words[a] < b:
                    time.sleep(NAP_S)
            elif kind == "write":
                words[a] = b
            elif kind == "mark":
                a.set()
            else:
                try:
                    a()
                except Exception as exc:  # noqa: BLE001 - as a failed request: the client computes it
                    self.on_error(exc)


class StepQueue:
    """The server's side: which split requests of a step it queued, and their release.

    ``heads``: the table indices of the split layers, in load (= call) order; ``compute(index,
    tokens, bias, kind)``: queue (or, on the stand-in, run) one request's work on ``sequence``'s stream;
    ``words``, ``expect``: the segment's header words and expect entries; ``go``, ``done``,
    ``state``, ``failed``: the words and value of the protocol."""

    def __init__(self, sequence, heads, compute, words, expect, go: int, done: int, state: int,
                 failed: int) -> None:
        self.sequence, self.compute, self.words, self.expect = sequence, compute, words, expect
        self.following = {index: list(heads[i + 1:]) for i, index in enumerate(heads)}
        self.go, self.done, self.state, self.failed = go, done, state, failed
        self.bias: dict[int, bool] = {}  # each split layer's bias, as its requests came
        self.last = 0  # the last request number queued
        self.queued = 0  # requests queued so far (the log's)
        self.on = True
        atexit.register(self.release_at_exit)

    def pending(self) -> bool:
        return self.last > self.words[self.done]

    def publish(self, index: int, request: int, step: int, tokens: int, bias: bool,
                kind: int = 0) -> list[tuple[int, int]]:
        """A split request ``request`` of ``index`` (of ``kind``'s rows) came: publish the step's
        following requests (before the caller answers this one), of the same kind, and return them
        as (layer index, request number)."""
        self.bias[index] = bias
        if not self.on:
            return []
        chain = []
        for nxt in self.following[index]:
            if nxt not in self.bias:
                break
            q = request + 1 + len(chain)
            at = ENTRY * nxt
            self.expect[at + 1], self.expect[at + 2], self.expect[at + 3] = step, tokens, int(self.bias[nxt]) + 2 * kind
            self.expect[at] = q
            chain.append((nxt, q))
        return chain

    def queue(self, chain: list[tuple[int, int]], tokens: int, kind: int = 0) -> None:
        """Queue each published request behind its go (after the caller answered the one before)."""
        seq = self.sequence
        for index, q in chain:
            seq.wait_at_least(self.go, q)
            seq.run(lambda index=index, bias=self.bias[index]: self.compute(index, tokens, bias, kind))
            seq.write(self.done, q)
            self.last = q
        if chain and not self.queued:
            log.info("hetero_shim: small steps' split requests are queued before they come (%d after a step's first)",
                     len(chain))
        self.queued += len(chain)

    def release(self, why: str | None) -> None:
        """Let every queued request run (on whatever input is there; their results are not read), wait
        until they ran, and queue nothing from now on. ``why``: logged (None: a failure, said elsewhere)."""
        if not self.on:
            return
        self.on = False
        for at in range(0, len(self.expect), ENTRY):
            self.expect[at] = 0
        if self.pending():
            # stored again while draining: a client that matched an entry just before it was cleared
            # (possible only when this server failed: STATE says so) may store its GO after this one
            self.words[self.go] = RELEASED
            self.sequence.drain(self._keep_released)
        if why:
            log.warning("hetero_shim: %s; the next stage's rank serves each request as it comes from now on", why)

    def _keep_released(self) -> None:
        self.words[self.go] = RELEASED

    def release_at_exit(self) -> None:
        """At exit: no stream may still wait for a go that will not come."""
        if self.on and self.pending():
            self.words[self.state] = self.failed
            self.words[self.go] = RELEASED
