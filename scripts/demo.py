"""Demo: the same tiny model, stock vLLM TP=1 versus hetero_shim heterogeneous TP=N.

    scripts/demo.sh [--tp 2] [--model llama|opt|PATH] [--max-tokens 24]

Prints the rank plan (which rank is a GPU or CPU rank, which cores each CPU rank got), the
generated text of both runs, and whether the greedy tokens are identical. On a machine
without a GPU every rank is a CPU rank; with one GPU, rank 0 runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hetero_shim.testing import tiny_models  # noqa: E402

GENERATE = str(REPO / "hetero_shim" / "testing" / "generate.py")


def run(model: Path, tp: int, heterogeneous: bool, max_tokens: int) -> dict:
    args = [sys.executable, GENERATE, str(model), "--tp", str(tp), "--max-tokens", str(max_tokens)]
    if heterogeneous:
        args += ["--device", "heterogeneous", "--enable"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HETERO_SHIM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    what = f"heterogeneous TP={tp}" if heterogeneous else "stock vLLM TP=1"
    print(f"== {what}: starting vLLM (about 20-40 s) ...", flush=True)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.exit(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--model", default="llama", help="llama, opt, or a model directory")
    parser.add_argument("--max-tokens", type=int, default=24)
    opts = parser.parse_args()
    model = Path(opts.model) if os.path.isdir(opts.model) else tiny_models.get(tiny_models.NAMED[opts.model])
    print(f"model: {model} (random weights, locally trained tokenizer)")
    reference = run(model, 1, False, opts.max_tokens)
    hetero = run(model, opts.tp, True, opts.max_tokens)
    print()
    print(hetero["plan"])
    print()
    for prompt, ref, het in zip(tiny_models.PROMPTS, reference["text"], hetero["text"]):
        print(f"prompt: {prompt!r}\n  stock TP=1        : {ref!r}\n  heterogeneous TP={opts.tp}: {het!r}")
    same = reference["tokens"] == hetero["tokens"]
    print(f"\ngreedy tokens identical to stock TP=1: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
