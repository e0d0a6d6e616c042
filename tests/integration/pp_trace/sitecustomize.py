"""Test helper: record when each vLLM worker runs ``Worker.execute_model`` (put this folder on
PYTHONPATH with PP_TRACE_DIR set; the shim's bootstrap sitecustomize chains to this one).

Each worker process appends ``{"rank", "start", "end", "tokens"}`` lines to PP_TRACE_DIR/<pid>.jsonl,
so a test can see whether pipeline stages worked on different micro-batches at the same time.
"""

import json
import os
import time

import wrapt


def _trace(module):
    path = os.path.join(os.environ["PP_TRACE_DIR"], f"{os.getpid()}.jsonl")

    def execute_model(wrapped, instance, args, kwargs):
        start = time.monotonic()
        try:
            return wrapped(*args, **kwargs)
        finally:
            scheduler_output = args[0] if args else kwargs.get("scheduler_output")
            tokens = getattr(scheduler_output, "total_num_scheduled_tokens", 0)
            with open(path, "a") as f:
                f.write(json.dumps({"rank": instance.rank, "start": start, "end": time.monotonic(),
                                    "tokens": tokens}) + "\n")

    wrapt.wrap_function_wrapper(module, "Worker.execute_model", execute_model)


if os.environ.get("PP_TRACE_DIR"):
    wrapt.register_post_import_hook(_trace, "vllm.v1.worker.gpu_worker")


def _one_batch_at_a_time(module):
    """Negative control (PP_TRACE_ONE_BATCH=1): the engine core keeps one batch in flight."""
    module.VllmConfig.max_concurrent_batches = property(lambda self: 1)


if os.environ.get("PP_TRACE_ONE_BATCH") == "1":
    wrapt.register_post_import_hook(_one_batch_at_a_time, "vllm.config.vllm")
