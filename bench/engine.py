"""One configuration, one engine start: time to first token, prefill and decode throughput.

    python bench/engine.py SPEC.json       (run by bench/run.py in its own session, time-limited)

SPEC: {"engine": LLM kwargs, "enable_shim": bool, "workload": configs.Workload fields}.
Every figure is printed as soon as it is measured, one line ``BENCH {"key": value}``, so a run
cut off by its time limit still reports what it measured. Prompts are random token ids of
exact lengths; generation is greedy with ``ignore_eos`` and no detokenization, so every request
produces exactly max_tokens tokens (checked). Prefix caching is off in the spec.
- time to first token: one prompt of ttft_prompt tokens, max_tokens=1; median of ttft_reps.
- prefill tokens/s: prefill_batch prompts of prefill_prompt tokens, max_tokens=1: tokens / wall time.
- decode tokens/s at batch B: B prompts of decode_prompt tokens, wall time with max_tokens=N+1
  minus wall time with max_tokens=1 (the prefill and first token cancel) = N decode steps;
  tokens/s = B / median step time (repeated up to 3 times while a repetition is cheap; a sample
  where the N+1-token run was not slower than the 1-token run is measured again, up to 5 times,
  and counted in decode_bB_discarded). Each batch size first runs one unmeasured N+1-token pass:
  it warms that batch's shapes and holds the steps that bench/breakdown/'s default windows profile
  (whose profiler start and write-out would otherwise slow one of the measured samples).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path


def emit(**values) -> None:
    print("BENCH " + json.dumps(values), flush=True)


def one_line(exc: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:600]}"


def measure(w: dict, prompts, timed) -> None:
    batches = w["decode_batches"]
    timed(prompts(max(batches), 16), 4)  # warm-up: first requests pay one-off costs
    timed(prompts(1, w["ttft_prompt"]), 2)
    emit(warmup_done=True)
    ttft = [timed(prompts(1, w["ttft_prompt"]), 1) for _ in range(w["ttft_reps"])]
    emit(ttft_ms=statistics.median(ttft) * 1e3, ttft_all_ms=[t * 1e3 for t in ttft])
    t = timed(prompts(w["prefill_batch"], w["prefill_prompt"]), 1)
    emit(prefill_tok_s=w["prefill_batch"] * w["prefill_prompt"] / t)
    n = w["decode_tokens"]
    for batch in batches:
        timed(prompts(batch, w["decode_prompt"]), n + 1)  # unmeasured: warm-up and profiled steps
        steps = []  # seconds per decode step: 3 samples unless they take over 15 s (one run to run
        spent, discarded = 0.0, 0  # spread of 10-20 % was seen on the H100 with one sample of the slow configurations)
        while len(steps) < 3 and (not steps or spent < 15.0):
            p = prompts(batch, w["decode_prompt"])
            first = timed(p, 1)
            full = timed(p, n + 1)
            spent += first + full
            if full <= first:  # the noise exceeded N decode steps (seen at toy size on 2 busy cores): again
                discarded += 1
                if discarded > 5:
                    raise RuntimeError(f"batch {batch}: {n + 1} tokens took {full:.4f} s, 1 token {first:.4f} s "
                                       f"({discarded} times): too noisy to measure a decode step")
                continue
            steps.append((full - first) / n)
        step = statistics.median(steps)
        emit(**{f"decode_b{batch}_tok_s": batch / step, f"decode_b{batch}_step_ms": step * 1e3,
                f"decode_b{batch}_all_step_ms": [x * 1e3 for x in steps], f"decode_b{batch}_discarded": discarded})


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    w = spec["workload"]
    emit(env_seen={k: os.environ.get(k) for k in spec.get("env", {})})
    if spec["enable_shim"]:
        import hetero_shim

        hetero_shim.enable()
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    try:
        llm = LLM(**spec["engine"])
    except Exception as exc:  # the engine refused or failed to start: say why, in one line
        traceback.print_exc()
        emit(phase="start", error=one_line(exc))
        return 3
    emit(start_s=time.perf_counter() - t0)
    if spec["enable_shim"]:
        status = sys.modules["hetero_shim"].status()
        emit(plan=status.get("plan"), cpu_kernels=status.get("cpu_kernels"))

    tokenizer = llm.get_tokenizer()
    rng = random.Random(1234)
    high = len(tokenizer)
    try:
        high = min(high, llm.llm_engine.model_config.get_vocab_size())
    except AttributeError:  # another engine layout: the tokenizer's ids are the model's in the test models
        pass
    low = min(3, high - 1)  # skip the special tokens <s> </s> <pad> of the test tokenizers

    def prompts(batch: int, length: int) -> list[dict]:
        return [{"prompt_token_ids": [rng.randrange(low, high) for _ in range(length)]} for _ in range(batch)]

    def timed(batch_prompts: list[dict], max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        outs = llm.generate(batch_prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        got = sorted({len(o.outputs[0].token_ids) for o in outs})
        if got != [max_tokens] or len(outs) != len(batch_prompts):
            raise RuntimeError(f"asked {len(batch_prompts)} x {max_tokens} tokens, got lengths {got}")
        return elapsed

    try:
        measure(w, prompts, timed)
    except Exception as exc:
        traceback.print_exc()
        emit(phase="measure", error=one_line(exc))
        return 4
    emit(done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
