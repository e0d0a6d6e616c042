"""What vLLM's CPU forward pass costs beyond its arithmetic, per layer, eager against compiled.

A CPU stage next to a GPU stage runs eager (``hetero_shim/patches/startup/worker_selection.py``);
vLLM's CPU build compiles its own workers with inductor. On the H200 the eager CPU stage spent
10.1 ms of python and 4.2 ms of small ops per 13-layer step (``docs/performance.md``). This
measures, with stock vLLM's CPU build (no shim), what compiling saves per layer at batch 1 on a
model so narrow that arithmetic is negligible: two Llamas that differ only in their layer count,
decoded eager and compiled; the step-time difference divided by the layer difference is the
per-layer cost of each mode.

    python bench/cpu_overhead.py [--layers 2,18] [--hidden 256] [--tokens 96] [--out FILE.json]

Each engine runs in its own process (``VLLM_CPU_OMP_THREADS_BIND`` as the environment gives it).
Prints one line per engine and the per-layer figures; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hetero_shim.testing import tiny_models  # noqa: E402
from hetero_shim.testing.proctree import SessionTimeout, run_session  # noqa: E402

CHILD = r"""
import json, sys, time
from vllm import LLM, SamplingParams
model, eager, tokens = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
llm = LLM(model=model, enforce_eager=eager, dtype="bfloat16", max_model_len=512, max_num_seqs=1,
          kv_cache_memory_bytes=64 << 20)
params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
prompt = "def add(a, b):"
llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm up
steps = []
for _ in range(5):
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)
    steps.append((time.perf_counter() - start) * 1e3 / len(out[0].outputs[0].token_ids))
steps.sort()
print("RESULT " + json.dumps({"step_ms": steps[len(steps) // 2], "all_ms": steps}))
"""


def model_dir(layers: int, hidden: int) -> Path:
    config = dict(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True)
    return tiny_models.get_llama(config, dtype="bfloat16", seed=0)


def run(model: Path, eager: bool, tokens: int, timeout: float) -> dict:
    try:
        result, _ = run_session([sys.executable, "-c", CHILD, str(model), "1" if eager else "0", str(tokens)],
                                timeout, grace=5)
    except SessionTimeout:
        raise SystemExit(f"cpu_overhead: the engine did not finish within {timeout:.0f} s") from None
    out = result.stdout
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"cpu_overhead: the engine failed (exit {result.returncode}):\n{out[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="2,18", help="the two layer counts (default 2,18)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens decoded per repetition (default 96)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per engine (default 600)")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    few, many = (int(n) for n in opts.layers.split(","))
    if many <= few:
        raise SystemExit("cpu_overhead: --layers takes two counts, the second larger (e.g. 2,18)")
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hidden": opts.hidden,
               "layers": [few, many], "cores": len(os.sched_getaffinity(0)), "runs": {}}
    for mode, eager in (("eager", True), ("compiled", False)):
        for layers in (few, many):
            got = run(model_dir(layers, opts.hidden), eager, opts.tokens, opts.timeout)
            results["runs"][f"{mode}-{layers}"] = got
            print(f"{mode:9} {layers:3} layers: {got['step_ms']:.3f} ms per token "
                  f"(repetitions {', '.join(f'{v:.3f}' for v in got['all_ms'])})", flush=True)
        per_layer = (results["runs"][f"{mode}-{many}"]["step_ms"] - results["runs"][f"{mode}-{few}"]["step_ms"]) / (
            many - few)
        results[f"{mode}_ms_per_layer"] = round(per_layer, 4)
    print(f"per layer at batch 1: eager {results['eager_ms_per_layer']:.3f} ms, "
          f"compiled {results['compiled_ms_per_layer']:.3f} ms", flush=True)
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
