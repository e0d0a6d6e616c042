"""Heterogeneous TP (1 GPU + N CPU ranks) gives the tokens of GPU-only vLLM on the same weights:
``LLM(..., device="heterogeneous", tensor_parallel_size=N)`` after ``hetero_shim.enable()`` against
stock vLLM at --gpu-ref-tp (default TP=1), 8 prompts x 32 tokens greedy, then in the same engine
8 prompts x 32 tokens with temperature 0.8 and seed 1234; per model (--gpu-models), dtype
(--gpu-dtypes) and TP size (--gpu-tp). With HETERO_SHIM_VERIFY_TOKENS=1 every run also shows that
every rank continued from rank 0's sampled tokens.

KV cache budgets (tiny Llama fp32): VLLM_CPU_KVCACHE_SPACE=1 with TP=2, and the default sizing
with TP=4 (three CPU ranks sharing the node's memory); every rank's budget is read from the
shim's log, the agreed block count must be what the smallest budget holds, with the greedy
tokens of GPU-only TP=1. A KV request beyond the host must fail the engine with an error that
names it and leave nothing behind.
"""

from __future__ import annotations

import os
import sys

import pytest

from hetero_shim.testing import kv_report, tiny_models

GIB = 1 << 30


def test_hetero_tp_gives_gpu_only_tokens(gpu, evidence, generation_case):
    name, dtype, tp = generation_case
    model = tiny_models.get(tiny_models.NAMED[name])
    ref_tp = gpu.opts.ref_tp
    ref = gpu.reference(model, dtype, tp=ref_tp)
    got = gpu.generate(model, tp, True, dtype, evidence.dir)
    evidence.save("result", {"reference": ref, "hetero": got})
    evidence.compare(f"{name} {dtype} greedy: hetero TP={tp} == GPU TP={ref_tp}", ref, got)
    if not gpu.opts.skip_sampled:
        evidence.compare(f"{name} {dtype} seeded T=0.8: hetero TP={tp} == GPU TP={ref_tp}", ref, got, "sampled_tokens")
        if os.environ.get("HETERO_SHIM_VERIFY_TOKENS") == "1":
            seen = (got or {}).get("verified")
            evidence.row(f"{name} {dtype} TP={tp}: every rank continued from rank 0's tokens", bool(seen),
                         seen or "no verification line in the log")
    evidence.check()


KV_CASES = [  # (tp, environment, what the budgets must show)
    pytest.param(2, {"VLLM_CPU_KVCACHE_SPACE": "1"}, "the CPU rank's budget is exactly 1 GiB", id="tp2-space1"),
    pytest.param(4, {}, "each CPU rank's budget is at most 0.5 x host memory / 3", id="tp4-default"),
]


@pytest.mark.parametrize("tp,extra_env,rule", KV_CASES)
def test_kv_budgets_agree_across_gpu_and_cpu_ranks(gpu, evidence, tp, extra_env, rule):
    model = tiny_models.get(tiny_models.NAMED["llama"])
    ref = gpu.reference(model, "float32", tp=1)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    got = gpu.generate(model, tp, True, "float32", evidence.dir, extra_env=extra_env,
                       **{"kv-cache-bytes": 0, "gpu-memory-utilization": 0.5})
    name = f"KV tp={tp} {' '.join(f'{k}={v}' for k, v in extra_env.items()) or 'default sizing'}"
    evidence.compare(f"{name}: greedy == GPU TP=1", ref, got)
    report = (got or {}).get("kv")
    evidence.save("kv", {"report": report, "plan": (got or {}).get("plan")})
    if not report:
        evidence.row(f"{name}: budgets", False, "no KV agreement line in the log")
    else:
        cpu = [b for r, b in report["budgets"].items() if report["kinds"][r] == "cpu"]
        gpu_budgets = [b for r, b in report["budgets"].items() if report["kinds"][r] == "gpu"]
        rule_ok = all(b == GIB for b in cpu) if extra_env else all(0 < b <= 0.5 * host / 3 for b in cpu)
        detail = (f"GPU {[round(b / GIB, 2) for b in gpu_budgets]} GiB, CPU {[round(b / GIB, 2) for b in cpu]} GiB, "
                  f"{report['per_block']} B/block, agreed {report['blocks']} blocks")
        evidence.row(f"{name}: {rule}", rule_ok and len(cpu) == tp - 1, detail)
        evidence.row(f"{name}: agreed blocks = smallest budget / block size", kv_report.smallest_budget_wins(report),
                     detail)
    evidence.check()


def test_kv_request_beyond_the_host_fails_the_engine(gpu, evidence):
    """VLLM_CPU_KVCACHE_SPACE=100000 (GiB) with TP=2: the engine fails in bounded time with an error that
    names the request, and leaves no process behind. The shim plans the CPU ranks' budgets before any
    worker starts, so it refuses there (naming the numbers); vLLM's own check in the CPU rank
    ("less than requested memory for kv") is the other accepted error. A CPU rank that dies during
    start-up is tests/gpu/test_faults.py's."""
    model = tiny_models.get(tiny_models.NAMED["llama"])
    args = [sys.executable, gpu.GENERATE, str(model), "--tp", "2", "--device", "heterogeneous", "--enable",
            "--kv-cache-bytes", "0"]
    done = gpu.run(args, evidence.dir / "startup-failure-kv-request.log", gpu.opts.timeout,
                   {"VLLM_CPU_KVCACHE_SPACE": "100000"})
    by_rank = "less than requested memory for kv" in done.text
    by_plan = "VLLM_CPU_KVCACHE_SPACE=100000 asks" in done.text
    named = "the CPU rank's check" if by_rank else "the rank plan" if by_plan else "nothing"
    left = done.left if done.left is not None else ["timed out"]
    evidence.excerpt("excerpt", done.text, "less than requested memory for kv", "KVCACHE_SPACE=100000")
    evidence.row("KV request beyond the host: engine fails with the error naming it, nothing left",
                 done.rc not in (0, 124) and (by_rank or by_plan) and not left,
                 f"rc={done.rc} after {done.seconds:.0f}s; named by {named}; left: {left or 'none'}")
    evidence.check()

