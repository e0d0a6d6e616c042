"""Pipeline mode: how many micro-batches the engine core keeps in flight (``HETERO_SHIM_PIPELINE_BATCHES``).

Targets ``EngineCore.__init__`` (``vllm.v1.engine.core``), which sizes its batch queue from
``VllmConfig.max_concurrent_batches``: ``pipeline_parallel_size`` batches, so that each stage can
work on another micro-batch. With a CPU stage far slower than the GPU stage, that overlap saves at
most the GPU stage's time (1.3 ms of a 30 ms 3B step on the H200), while a batch that vLLM's
scheduler happens to split into two micro-batches costs the CPU stage one weight stream per
micro-batch: on the H200 16 sequences in micro-batches of 2 + 14 and 3 + 13 tokens took 50-56 ms
per round of 16 tokens, one 16-token micro-batch 24.7 ms (3B, 2ff2247). The rank plan says how
many batches to keep (``planning.build.batches_in_flight``: by default one per CPU stage when GPU and
CPU stages mix, else vLLM's own; ``HETERO_SHIM_PIPELINE_BATCHES=N`` at most N); this patch cuts the
queue to it. vLLM's own ``step_with_batch_queue`` still runs every step (a queue of one: schedule,
then wait for it).
Why: vLLM sizes the queue for stages of equal speed.
Remove when: vLLM lets the user size the pipeline's batch queue (not as of 0.33.0).
"""

from __future__ import annotations

from hetero_shim import run_state
from hetero_shim.logs import log
from hetero_shim.registry import Fact, Patch

WHY = "vLLM keeps pipeline_parallel_size micro-batches in flight, sized for stages of equal speed"
REMOVE_WHEN = "vLLM lets the user size the pipeline's batch queue"
UPSTREAM = "the batch queue holds VllmConfig.max_concurrent_batches (pipeline_parallel_size) batches, not configurable"
CORE = "vllm.v1.engine.core"
TRIPWIRES = (
    Fact(CORE, "EngineCore.__init__", r"self\.batch_queue_size = vllm_config\.max_concurrent_batches",
         "the engine core sizes its batch queue from max_concurrent_batches"),
    Fact(CORE, "EngineCore.__init__", r"self\.batch_queue = deque\(maxlen=self\.batch_queue_size\)",
         "the batch queue is a deque bounded by batch_queue_size"),
)


def rows(release: str) -> tuple[Patch, ...]:
    return (
        Patch("pipeline micro-batches", CORE, "EngineCore.__init__", limit_batches_in_flight, why=WHY,
              remove_when=REMOVE_WHEN, upstream=UPSTREAM, tripwires=TRIPWIRES),
    )


def limit_batches_in_flight(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    state = run_state.current()
    wanted = state.plan.batches if state.heterogeneous and state.plan is not None else 0
    queue = getattr(instance, "batch_queue", None)
    if not wanted or queue is None or instance.batch_queue_size <= wanted:
        return result
    from collections import deque

    log.info("hetero_shim: the engine keeps at most %d micro-batch(es) in flight instead of %d (%s)", wanted,
             instance.batch_queue_size, state.plan.batches_source)
    instance.batch_queue_size = wanted
    instance.batch_queue = deque(maxlen=wanted)
    return result
