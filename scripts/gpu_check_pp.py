"""The GPU check for pipeline mode: heterogeneous PP (stage 0 on the GPU, later stages on CPU
ranks) against GPU-only TP=1 on the same weights, fp32, 8 prompts x 32 tokens greedy. Prints a
pass/fail table last and writes JSON (same runner and row format as scripts/gpu_check.py).

    python3 scripts/gpu_check_pp.py --out DIR [--models llama,opt-125m-shape] [--pp 2]

Per model: the GPU TP=1 reference; heterogeneous PP with the automatic split (everything but one
layer per CPU stage fits on an 80 GB GPU, so the plan must say so); for models with more layers
than stages, also an explicit --hetero-gpu-layers (a third of the layers, rounded up). Seeded
sampling is not compared: in pipeline mode the last stage samples, here on a CPU rank, whose
random stream differs from the GPU's (the sampled tokens are printed as information).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check as gc  # noqa: E402
from gpu_check import tiny_models  # noqa: E402


def plan_row(name: str, got: dict | None, split: str) -> None:
    plan = (got or {}).get("plan") or ""
    ok = f"layer split {split} " in plan and "rank 0: GPU" in plan and "stage 1" in plan
    gc.record(f"{name}: plan puts stage 0 on the GPU with split {split}", ok,
              plan.splitlines()[0] if plan else "no plan (run failed)")


def checks(opts, out: Path) -> None:
    pp = opts.pp
    for name in opts.models.split(","):
        spec = tiny_models.NAMED[name]
        model = tiny_models.get(spec)
        layers = spec.num_layers
        ref = gc.generate(model, 1, False, "float32", out, opts.timeout)
        runs = [("auto", None, ",".join(map(str, [layers - (pp - 1)] + [1] * (pp - 1))))]
        if layers > pp:
            gpu_layers = -(-layers // 3)
            rest = layers - gpu_layers
            cpu = [rest // (pp - 1) + (1 if i < rest % (pp - 1) else 0) for i in range(pp - 1)]
            runs.append((f"hetero_gpu_layers={gpu_layers}", gpu_layers, ",".join(map(str, [gpu_layers, *cpu]))))
        for label, gpu_layers, split in runs:
            extra = {"pp": pp} if gpu_layers is None else {"pp": pp, "hetero-gpu-layers": gpu_layers}
            got = gc.generate(model, 1, True, "float32", out, opts.timeout, **extra)
            if got and got.get("plan"):
                print(got["plan"], flush=True)
            plan_row(f"{name} PP={pp} {label}", got, split)
            gc.compare(f"{name} float32 greedy: hetero PP={pp} {label} == GPU TP=1", ref, got)
            if ref and got:
                same = sum(a == b for a, b in zip(ref["sampled_tokens"], got["sampled_tokens"]))
                print(f"-- info: seeded T=0.8 (CPU stage samples) {same}/{len(ref['sampled_tokens'])} "
                      "prompts identical to GPU TP=1 (not required)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_pp_out")
    parser.add_argument("--models", default="llama,opt-125m-shape")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240)
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    gc.PARTIAL = out / "gpu_check_pp.partial.json"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    checks(opts, out)
    return gc.finish("GPU check (pipeline mode)", started, out / "gpu_check_pp.json")


if __name__ == "__main__":
    sys.exit(main())
