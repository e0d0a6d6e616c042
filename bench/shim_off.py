"""The shim's cost when heterogeneous mode is off, measured inside ONE engine: decode steps
with the shim's wrappers installed and with them removed, in alternating blocks.

    python bench/shim_off.py [--model 1b|toy|DIR] [--pairs 12] [--tokens 64] [--batches 1,16] [--out DIR]

Why one engine: between two engine starts of the same stock configuration the H100's decode
step differed by up to 1.7x (1B, batch 1: 1.5-2.5 ms), far more than the 1 % the target allows, so
engine-against-engine comparisons cannot resolve it. Here vLLM runs its engine core
and its worker in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, TP=1), so every wrapper
the shim puts on vLLM's per-step path is in this process, where ``hetero_shim.disable()``
removes them and ``hetero_shim.enable()`` puts them back. The shim is enabled before vLLM is
imported, as in a user's process, so the engine also starts through the wrappers.

Blocks alternate in ABBA order (on off, off on, on off, ...) so a slow drift of the machine
counts against both states alike. One sample: a batch of random prompts, wall time for N+1
tokens minus wall time for 1 token, divided by N (greedy, ``ignore_eos``, exact lengths checked).
Before each block the state is checked: on, the start-up patches are applied and the per-step
ones (``hetero_only``: Sampler.forward, the pipeline sends) wait for heterogeneous mode, so
``Sampler.forward`` is vLLM's own function; off, no patch is applied. ``--control`` runs both
arms off, to show the method's own bias.

Result per batch size: ``ratio`` = median step time off / median step time on, i.e. decode
throughput with the shim relative to without it (target >= 0.99), with a 95 % bootstrap
interval, and the median of the ratios of adjacent on/off blocks (``paired``) with its own
bootstrap interval, which decides the verdict. On a machine whose speed drifts, use
``--samples 1`` and many pairs: the pairs are then a second apart. Prints a table, writes
``shim_off.json`` in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET = 0.99
CLEARED = ("HETERO_SHIM_ENABLE", "HETERO_SHIM_DEVICE", "HETERO_SHIM_VERIFY_TOKENS")


def block_order(pairs: int) -> list[str]:
    """ABBA: on off, off on, on off, ... (``pairs`` pairs)."""
    return [state for i in range(pairs) for state in (("on", "off") if i % 2 == 0 else ("off", "on"))]


def bootstrap_ratio(off: list[float], on: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of median(off) / median(on), resampling each state's samples."""
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(off, k=len(off))) / statistics.median(rng.choices(on, k=len(on)))
                    for _ in range(rounds))
    return ratios[int(0.025 * rounds)], ratios[int(0.975 * rounds) - 1]


def bootstrap_median(values: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the median of ``values``."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds) - 1]


def summarize(samples: dict[str, list[float]], paired: list[float], control: bool = False) -> dict:
    """Step times (seconds) of both states -> the figures of one batch size. The verdict uses the
    paired ratios (adjacent blocks): on the H100 the step time moved between 1.5 and 2.7 ms in
    phases lasting several blocks, which widens the unpaired interval but cancels within a pair."""
    off, on = samples["off"], samples["on"]
    ratio = statistics.median(off) / statistics.median(on)
    unpaired = bootstrap_ratio(off, on)
    low, high = bootstrap_median(paired) if len(paired) > 1 else unpaired
    if control:  # both arms ran the same code
        verdict = "control: no bias shown" if low <= 1.0 <= high else "control: the method is biased"
    elif low >= TARGET:
        verdict = "met"
    elif high < TARGET:
        verdict = "not met"
    else:
        verdict = "not resolved (the interval contains 0.99)"
    return {"step_ms_on": round(statistics.median(on) * 1e3, 4), "step_ms_off": round(statistics.median(off) * 1e3, 4),
            "ratio": round(ratio, 4), "ratio_95": [round(x, 4) for x in unpaired],
            "paired_ratio_median": round(statistics.median(paired), 4) if paired else None,
            "paired_ratio_95": [round(low, 4), round(high, 4)],
            "samples": len(on), "verdict": verdict,
            "all_step_ms": {k: [round(x * 1e3, 4) for x in v] for k, v in samples.items()}}


def shim_state() -> dict:
    """How many patches are applied, and whether vLLM's per-step Sampler.forward is wrapped."""
    import wrapt
    from vllm.v1.sample import sampler

    import hetero_shim

    rows = hetero_shim.status()["patches"]
    return {"patches_applied": sum(len(p["applied_in"]) for p in rows),
            "waiting_for_mode": sorted(p["target"] for p in rows if p.get("waiting_for_mode")),
            "sampler_wrapped": isinstance(vars(sampler.Sampler)["forward"], wrapt.FunctionWrapper)}


def set_state(state: str, control: bool = False) -> dict:
    """``on``: enabled (heterogeneous mode off, as a user's stock run); ``off``: disabled."""
    import hetero_shim

    if control:
        state = "off"
    if state == "on":
        hetero_shim.enable(propagate=False)
    else:
        hetero_shim.disable()
    seen = shim_state()
    if (seen["patches_applied"] > 0) != (state == "on") or seen["sampler_wrapped"]:
        raise RuntimeError(f"shim {state}: found {seen}; expected patches applied only when on, and "
                           "Sampler.forward never wrapped outside heterogeneous mode")
    return seen


def kv_cache_bytes(config: dict, tokens: int) -> int:
    """Room for ``tokens`` tokens of this model's KV cache (all layers, TP=1), rounded up to 64 MiB."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * 4
    return -(-per_token * tokens * 2 // (64 << 20)) * (64 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="1b, toy, ... (bench/models.py) or a model dir; "
                        "default 1b with a GPU, toy without")
    parser.add_argument("--pairs", type=int, default=12, help="on/off block pairs (default 12)")
    parser.add_argument("--samples", type=int, default=2, help="samples per batch size per block (default 2)")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per sample (default 64)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled, CUDA graphs on a GPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--control", action="store_true", help="both arms with the shim off (the blocks keep their "
                        "on/off labels): the ratio then measures the method's own bias, expected 1.0 within its interval")
    parser.add_argument("--model-cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    opts = parser.parse_args(argv)
    batches = [int(b) for b in opts.batches.split(",") if b.strip()]
    if opts.pairs < 1 or opts.samples < 1 or opts.tokens < 1 or not batches or min(batches) < 1:
        parser.error("--pairs, --samples, --tokens and every batch size must be at least 1")

    for key in CLEARED:  # this measures the shim when heterogeneous mode is off
        os.environ.pop(key, None)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # as bench/run.py: the runner all other figures use
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

    import hetero_shim

    hetero_shim.enable(propagate=False)  # before vLLM's import, like a user's process
    import torch
    from vllm import LLM, SamplingParams

    from bench import models

    gpu = torch.cuda.is_available()
    model_dir = models.get(opts.model or ("1b" if gpu else "toy"), opts.model_cache)
    config = json.loads((model_dir / "config.json").read_text())
    max_model_len = opts.prompt + opts.tokens + 64
    engine = dict(model=str(model_dir), dtype=config.get("torch_dtype", "auto"), max_model_len=max_model_len,
                  enable_prefix_caching=False, seed=0, enforce_eager=opts.eager,
                  # an explicit size: vLLM's CPU start-up check of gpu_memory_utilization x the node's memory
                  # then never depends on what other processes happen to use
                  kv_cache_memory_bytes=kv_cache_bytes(config, max(batches) * max_model_len))
    if gpu:
        engine["gpu_memory_utilization"] = opts.gpu_memory_utilization
        if not opts.eager:
            engine["compilation_config"] = {"cudagraph_capture_sizes": sorted({1, 2, 4, 8, *batches})}
    start = time.perf_counter()
    llm = LLM(**engine)
    start_s = time.perf_counter() - start
    rng = random.Random(1234)
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def timed(batch: int, max_tokens: int, prompts: list[dict]) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        if len(outs) != batch or {len(o.outputs[0].token_ids) for o in outs} != {max_tokens}:
            raise RuntimeError(f"asked {batch} x {max_tokens} tokens, got other lengths")
        return elapsed

    def step(batch: int) -> float:
        prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(opts.prompt)]} for _ in range(batch)]
        for _ in range(6):
            first = timed(batch, 1, prompts)
            full = timed(batch, opts.tokens + 1, prompts)
            if full > first:
                return (full - first) / opts.tokens
        raise RuntimeError(f"batch {batch}: {opts.tokens + 1} tokens were never slower than 1 token: too noisy")

    states = {}
    for state in ("off", "on"):  # warm-up in both states: first calls pay one-off costs
        states[state] = set_state(state, opts.control)
        for batch in batches:
            step(batch)
    samples = {b: {"on": [], "off": []} for b in batches}
    paired: dict[int, list[float]] = {b: [] for b in batches}
    order = block_order(opts.pairs)
    for i, state in enumerate(order):
        set_state(state, opts.control)
        for batch in batches:
            block = [step(batch) for _ in range(opts.samples)]
            samples[batch][state] += block
            if i % 2 == 1:  # the pair is complete: its blocks' medians, off over on
                prev = samples[batch][order[i - 1]][-opts.samples:]
                on, off = (prev, block) if state == "off" else (block, prev)
                paired[batch].append(statistics.median(off) / statistics.median(on))
    hetero_shim.disable()

    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv, "gpu": gpu,
                       "device": torch.cuda.get_device_name(0) if gpu else "cpu", "engine": engine,
                       "engine_start_s": round(start_s, 1), "order": order, "control": opts.control, "states": states, "target": TARGET},
              "batches": {str(b): summarize(samples[b], paired[b], opts.control) for b in batches}}
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "shim_off.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'CONTROL (both arms off): ' if opts.control else ''}shim on vs off, one engine ({result['meta']['device']}, {Path(engine['model']).name}, "
          f"{opts.pairs} pairs x {opts.samples} samples x {opts.tokens} steps)")
    print("| batch | step ms off | step ms on | ratio of medians (tok/s on / off) | its 95 % interval "
          "| paired ratio (median) | its 95 % interval | verdict (paired) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for b, r in result["batches"].items():
        print(f"| {b} | {r['step_ms_off']:.3f} | {r['step_ms_on']:.3f} | {r['ratio']:.4f} | "
              f"{r['ratio_95'][0]:.4f}-{r['ratio_95'][1]:.4f} | {r['paired_ratio_median']:.4f} | "
              f"{r['paired_ratio_95'][0]:.4f}-{r['paired_ratio_95'][1]:.4f} | {r['verdict']} |")
    print(f"wrote {opts.out / 'shim_off.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
