"""The GPU check: heterogeneous mode (1 GPU + N CPU ranks) against GPU-only TP=1 on the same
weights, on a node with a GPU. Prints a pass/fail table last and writes JSON.

    python scripts/gpu_check.py --out DIR [--models llama,opt-125m-shape] [--dtypes float32,bfloat16]
                                [--tp 2,4] [--skip-sampled] [--skip-server]

Every vLLM run is a subprocess with a time limit whose whole session is killed on overrun.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hetero_shim.testing import tiny_models  # noqa: E402

GENERATE = str(REPO / "hetero_shim" / "testing" / "generate.py")
rows: list[dict] = []


def env() -> dict[str, str]:
    keep = ("HETERO_SHIM_CPU_KERNELS", "HETERO_SHIM_HANG_DUMP", "HETERO_SHIM_VERIFY_TOKENS")
    e = {k: v for k, v in os.environ.items() if not k.startswith("HETERO_SHIM_") or k in keep}
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    e.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    e["PYTHONUNBUFFERED"] = "1"
    # heterogeneous mode runs vLLM's V1 model runner; the reference uses it too, so that seeded
    # sampling draws from the same random stream on the GPU
    e["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return e


def run(args: list[str], log: Path, timeout: float) -> tuple[int, str]:
    with open(log, "w") as f:
        proc = subprocess.Popen(args, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = 124
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the run may outlive it
        except ProcessLookupError:
            pass
    return rc, log.read_text()


def generate(model: Path, tp: int, hetero: bool, dtype: str, out: Path, timeout: float, **extra) -> dict | None:
    tag = f"{model.name}-{dtype}-tp{tp}{'-het' if hetero else ''}{'-' + '-'.join(f'{k}{v}' for k, v in extra.items()) if extra else ''}"
    args = [sys.executable, GENERATE, str(model), "--tp", str(tp), "--dtype", dtype, "--max-tokens", "32",
            "--max-num-batched-tokens", "2048", "--also-sampled"]
    if hetero:
        args += ["--device", "heterogeneous", "--enable"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    start = time.monotonic()
    rc, text = run(args, out / f"{tag}.log", timeout)
    result = None
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    print(f"-- {tag}: rc={rc} {time.monotonic() - start:.0f}s", flush=True)
    verified = [line for line in text.splitlines() if "verified sampled ids equal" in line and "rank 0 " not in line]
    if result is not None and verified:
        result["verified"] = verified[-1].split("hetero_shim: ", 1)[-1]
    if result is None:
        print("\n".join(text.splitlines()[-25:]), flush=True)
    return result


FAIL_FAST = False


class Stop(Exception):
    pass


def record(check: str, ok: bool, detail: str) -> None:
    rows.append({"check": check, "ok": ok, "detail": detail})
    if FAIL_FAST and not ok:
        raise Stop


def compare(name: str, ref: dict | None, got: dict | None, key: str = "tokens") -> None:
    if ref is None or got is None:
        record(name, False, "run failed (see log)")
        return
    pairs = list(zip(ref[key], got[key]))
    same = sum(a == b for a, b in pairs)
    detail = f"{same}/{len(pairs)} prompts identical"
    diverged = []
    for i, (a, b) in enumerate(pairs):
        if a != b:
            diverged.append(f"p{i}@{next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))}")
    if diverged:
        detail += "; first differing token per prompt: " + " ".join(diverged)
    record(name, same == len(pairs), detail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--models", default="llama")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--tp", default="2")
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--skip-sampled", action="store_true")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed check")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    global FAIL_FAST
    FAIL_FAST = opts.fail_fast
    try:
        checks(opts, out)
    except Stop:
        print("-- stopped at the first failure (--fail-fast)")
    width = max(len(r["check"]) for r in rows) if rows else 10
    print(f"\nGPU check, {started}, {sys.argv}")
    print(f"{'check':<{width}}  result  detail")
    for r in rows:
        print(f"{r['check']:<{width}}  {'PASS' if r['ok'] else 'FAIL':<6}  {r['detail']}")
    (out / "gpu_check.json").write_text(json.dumps({"started": started, "argv": sys.argv, "rows": rows}, indent=1))
    return 0 if rows and all(r["ok"] for r in rows) else 1


def checks(opts, out: Path) -> None:
    for name in opts.models.split(","):
        model = tiny_models.get(tiny_models.NAMED[name])
        for dtype in opts.dtypes.split(","):
            ref = generate(model, 1, False, dtype, out, opts.timeout)
            for tp in map(int, opts.tp.split(",")):
                got = generate(model, tp, True, dtype, out, opts.timeout)
                if got and got.get("plan"):
                    print(got["plan"], "\n  kernels:", got.get("kernels"), flush=True)
                compare(f"{name} {dtype} greedy: hetero TP={tp} == GPU TP=1", ref, got)
                if not opts.skip_sampled:
                    compare(f"{name} {dtype} seeded T=0.8: hetero TP={tp} == GPU TP=1", ref, got, "sampled_tokens")
                    if os.environ.get("HETERO_SHIM_VERIFY_TOKENS") == "1":
                        seen = (got or {}).get("verified")
                        record(f"{name} {dtype} TP={tp}: every rank continued from rank 0's tokens", bool(seen),
                               seen or "no verification line in the log")


if __name__ == "__main__":
    sys.exit(main())
