"""Benchmark hook, part of bench/breakdown/ (not shim code): a CPU stage's requests to the next
stage's GPU rank (``hetero_shim/collectives/gemm_channel.py``, ``gemm_server.py``), timed on both sides without the
profiler, whose own cost per op would hide what is measured.

Steps are chosen as the profile windows are (``BENCH_BREAKDOWN_CHANNEL``, same syntax; default
"34:8,16@16:8": in the harness's full workload, batch-1 then batch-16 decode steps of
bench/engine.py's unmeasured passes, after the profiled ones). In those steps every call below is
one record ``[what, request, step, tokens, t0, t1]`` (``time.monotonic``: one clock for every
process of the host):
- the CPU rank: "start" (its exit: the request published), "wait" (for the answer), "finish"
  (its exit: the rows joined);
- the GPU rank: "serve" (the request picked up .. answered), "queue" (``WeightStreamer.multiply``:
  queuing the piece copies and GEMMs, no request number), and with ``HETERO_SHIM_CPU_GEMM_QUEUE_STEP``
  "ahead" (``StepQueue.queue``, inside a "serve" after its answer: the step's later requests queued;
  the first one's number).
Written to DIR/<pid>.channel.json when each window closes; bench/channel.py reads them.
"""

from __future__ import annotations

import json
import os
import time

ENV_WINDOWS = "BENCH_BREAKDOWN_CHANNEL"
DEFAULT_WINDOWS = "34:8,16@16:8"


class ChannelTimer:
    """Which steps are timed, and the records; ``counter``: sitecustomize.WindowCounter over the
    windows (this module imports nothing of the hook's)."""

    def __init__(self, counter, path: str) -> None:
        self.counter, self.path = counter, path
        self.active = False  # the current step is timed
        self.closes = False  # ... and is its window's last
        self.step: int | None = None
        self.tokens = 0
        self.records: list[list] = []
        self.meta: dict = {}

    def begin_step(self, step: int | None, tokens: int) -> None:
        self.active, self.closes, self.step, self.tokens = False, False, step, tokens
        index = None if step is None else self.counter.count(tokens)
        if index is None:
            return
        _, first, count = self.counter.current()
        self.active, self.closes = first <= index < first + count, index == first + count - 1

    def end_step(self) -> None:
        """After the step: write the records when it closed the window."""
        closes, self.active, self.closes = self.closes, False, False
        if not closes:
            return
        self.counter.advance()
        if self.records:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump({**self.meta, "windows": [list(w) for w in self.counter.windows[:self.counter.window]],
                           "records": self.records}, f)
            os.replace(tmp, self.path)

    def wrapper(self, what: str, request_of):
        """A wrapt wrapper that records ``what`` (``request_of(instance, args)``: its request number)
        while a step is timed, and costs one attribute check otherwise."""

        def timed(wrapped, instance, args, kwargs):
            if not self.active:
                return wrapped(*args, **kwargs)
            t0 = time.monotonic()
            try:
                return wrapped(*args, **kwargs)
            finally:
                t1 = time.monotonic()
                self.records.append([what, request_of(instance, args), self.step, self.tokens, t0, t1])

        return timed


def install(timer: ChannelTimer, register, guarded) -> None:
    """Wrap the channel's calls once their modules are imported (``register``: wrapt's post-import
    hook; ``guarded``: the hook's error guard)."""
    import wrapt

    def channel(module) -> None:
        client = module.GemmClient
        wrapt.wrap_function_wrapper(client, "start", timer.wrapper("start", lambda c, a: c.requests))
        wrapt.wrap_function_wrapper(client, "_wait", timer.wrapper("wait", lambda c, a: a[0]))
        wrapt.wrap_function_wrapper(client, "finish", timer.wrapper("finish", lambda c, a: c.requests))

    def server(module) -> None:
        wrapt.wrap_function_wrapper(module.GemmServer, "_serve", timer.wrapper("serve", lambda s, a: a[0]))

    def stream(module) -> None:
        wrapt.wrap_function_wrapper(module.WeightStreamer, "multiply", timer.wrapper("queue", lambda s, a: None))

    def ahead(module) -> None:
        wrapt.wrap_function_wrapper(module.StepQueue, "queue",
                                    timer.wrapper("ahead", lambda s, a: a[0][0][1] if a[0] else None))

    register(guarded(channel, "GemmClient"), "hetero_shim.collectives.gemm_channel")
    register(guarded(server, "GemmServer"), "hetero_shim.collectives.gemm_server")
    register(guarded(ahead, "StepQueue"), "hetero_shim.collectives.gemm_queue")
    register(guarded(stream, "WeightStreamer"), "hetero_shim.collectives.weight_stream")
