"""The GPU check: heterogeneous mode (1 GPU + N CPU ranks) against GPU-only TP=1 on the same
weights, on a node with a GPU. Prints a pass/fail table last and writes JSON.

    python scripts/gpu_check.py --out DIR [--models llama,opt-125m-shape] [--dtypes float32,bfloat16]
                                [--tp 2,4] [--skip-sampled] [--kv-only]

--kv adds the KV cache budget checks (tiny Llama fp32): VLLM_CPU_KVCACHE_SPACE=1 with TP=2,
and vLLM's default sizing with TP=4 (three CPU ranks sharing the node's memory); in both
every rank's budget is read from the shim's log and the agreed block count must be what the
smallest budget holds, with the greedy tokens of GPU-only TP=1.

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

from hetero_shim.testing import kv_report, proctree, tiny_models  # noqa: E402

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


LEFT: dict[str, list[int]] = {}  # log name -> processes of the run still alive 30 s after it exited


def run(args: list[str], log: Path, timeout: float, extra_env: dict[str, str] | None = None) -> tuple[int, str]:
    with open(log, "w") as f:
        proc = subprocess.Popen(args, env=env() | (extra_env or {}), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            LEFT[log.name] = proctree.wait_session_gone(proc.pid, 30)
        except subprocess.TimeoutExpired:
            rc = 124
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the run may outlive it
        except ProcessLookupError:
            pass
    return rc, log.read_text()


def generate(model: Path, tp: int, hetero: bool, dtype: str, out: Path, timeout: float,
             extra_env: dict[str, str] | None = None, **extra) -> dict | None:
    tag = f"{model.name}-{dtype}-tp{tp}{'-het' if hetero else ''}{'-' + '-'.join(f'{k}{v}' for k, v in extra.items()) if extra else ''}"
    tag += "".join(f"-{k}{v}" for k, v in (extra_env or {}).items())
    args = [sys.executable, GENERATE, str(model), "--tp", str(tp), "--dtype", dtype, "--max-tokens", "32",
            "--max-num-batched-tokens", "2048", "--also-sampled"]
    if hetero:
        args += ["--device", "heterogeneous", "--enable"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    start = time.monotonic()
    rc, text = run(args, out / f"{tag}.log", timeout, extra_env)
    result = None
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    print(f"-- {tag}: rc={rc} {time.monotonic() - start:.0f}s", flush=True)
    verified = [line for line in text.splitlines() if "verified sampled ids equal" in line and "rank 0 " not in line]
    if result is not None and verified:
        result["verified"] = verified[-1].split("hetero_shim: ", 1)[-1]
    if result is not None:
        result["kv"] = kv_report.parse(text)
    if result is None:
        print("\n".join(text.splitlines()[-25:]), flush=True)
    return result


FAIL_FAST = False


class Stop(Exception):
    pass


PARTIAL: Path | None = None  # rows so far, rewritten after every check (a cut-off run keeps them)


def record(check: str, ok: bool, detail: str) -> None:
    rows.append({"check": check, "ok": ok, "detail": detail})
    print(f"-- {'PASS' if ok else 'FAIL'}: {check}: {detail}", flush=True)
    if PARTIAL is not None:
        PARTIAL.write_text(json.dumps(rows, indent=1))
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
    parser.add_argument("--ref-tp", type=int, default=1, help="tensor-parallel size of the GPU-only reference")
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--skip-sampled", action="store_true")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed check")
    parser.add_argument("--kv", action="store_true", help="add the KV cache budget checks")
    parser.add_argument("--kv-only", action="store_true", help="only the KV cache budget checks")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    global FAIL_FAST, PARTIAL
    FAIL_FAST = opts.fail_fast
    PARTIAL = out / "gpu_check.partial.json"
    try:
        checks(opts, out)
    except Stop:
        print("-- stopped at the first failure (--fail-fast)")
    return finish("GPU check", started, out / "gpu_check.json")


def finish(title: str, started: str, json_path: Path) -> int:
    """Print the pass/fail table of the rows recorded, write them as JSON; exit status 0 iff all passed."""
    width = max(len(r["check"]) for r in rows) if rows else 10
    print(f"\n{title}, {started}, {sys.argv}")
    print(f"{'check':<{width}}  result  detail")
    for r in rows:
        print(f"{r['check']:<{width}}  {'PASS' if r['ok'] else 'FAIL':<6}  {r['detail']}")
    json_path.write_text(json.dumps({"started": started, "argv": sys.argv, "rows": rows}, indent=1))
    return 0 if rows and all(r["ok"] for r in rows) else 1


def checks(opts, out: Path) -> None:
    if opts.kv or opts.kv_only:
        kv_checks(opts, out)
    if opts.kv_only:
        return
    for name in opts.models.split(","):
        model = tiny_models.get(tiny_models.NAMED[name])
        for dtype in opts.dtypes.split(","):
            ref = generate(model, opts.ref_tp, False, dtype, out, opts.timeout)
            ref_name = f"GPU TP={opts.ref_tp}"
            for tp in map(int, opts.tp.split(",")):
                got = generate(model, tp, True, dtype, out, opts.timeout)
                if got and got.get("plan"):
                    print(got["plan"], "\n  kernels:", got.get("kernels"), flush=True)
                compare(f"{name} {dtype} greedy: hetero TP={tp} == {ref_name}", ref, got)
                if not opts.skip_sampled:
                    compare(f"{name} {dtype} seeded T=0.8: hetero TP={tp} == {ref_name}", ref, got, "sampled_tokens")
                    if os.environ.get("HETERO_SHIM_VERIFY_TOKENS") == "1":
                        seen = (got or {}).get("verified")
                        record(f"{name} {dtype} TP={tp}: every rank continued from rank 0's tokens", bool(seen),
                               seen or "no verification line in the log")


GIB = 1 << 30


def kv_checks(opts, out: Path) -> None:
    model = tiny_models.get(tiny_models.NAMED["llama"])
    ref = generate(model, 1, False, "float32", out, opts.timeout)
    cpu_rank_start_failure(model, out, opts.timeout)
    cases = [  # (tp, environment, what the budgets must show)
        (2, {"VLLM_CPU_KVCACHE_SPACE": "1"}, "the CPU rank's budget is exactly 1 GiB"),
        (4, {}, "each CPU rank's budget is at most 0.5 x host memory / 3"),
    ]
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for tp, extra_env, rule in cases:
        got = generate(model, tp, True, "float32", out, opts.timeout, extra_env=extra_env,
                       **{"kv-cache-bytes": 0, "gpu-memory-utilization": 0.5})
        name = f"KV tp={tp} {' '.join(f'{k}={v}' for k, v in extra_env.items()) or 'default sizing'}"
        compare(f"{name}: greedy == GPU TP=1", ref, got)
        report = (got or {}).get("kv")
        if not report:
            record(f"{name}: budgets", False, "no KV agreement line in the log")
            continue
        cpu = [b for r, b in report["budgets"].items() if report["kinds"][r] == "cpu"]
        gpu = [b for r, b in report["budgets"].items() if report["kinds"][r] == "gpu"]
        rule_ok = all(b == GIB for b in cpu) if extra_env else all(0 < b <= 0.5 * host / 3 for b in cpu)
        detail = (f"GPU {[round(b / GIB, 2) for b in gpu]} GiB, CPU {[round(b / GIB, 2) for b in cpu]} GiB, "
                  f"{report['per_block']} B/block, agreed {report['blocks']} blocks")
        record(f"{name}: {rule}", rule_ok and len(cpu) == tp - 1, detail)
        record(f"{name}: agreed blocks = smallest budget / block size", kv_report.smallest_budget_wins(report), detail)


def cpu_rank_start_failure(model: Path, out: Path, timeout: float) -> None:
    """A CPU rank that fails during start-up (asks for 100000 GiB of KV cache): the engine must
    fail with that rank's error in bounded time and leave no process behind."""
    args = [sys.executable, GENERATE, str(model), "--tp", "2", "--device", "heterogeneous", "--enable",
            "--kv-cache-bytes", "0"]
    start = time.monotonic()
    log = out / "startup-failure-cpu-rank.log"
    rc, text = run(args, log, timeout, {"VLLM_CPU_KVCACHE_SPACE": "100000"})
    took = time.monotonic() - start
    named = "less than requested memory for kv" in text
    left = LEFT.get(log.name, ["timed out"])
    record("CPU rank fails at start-up: engine fails with its error, nothing left", rc not in (0, 124) and named
           and not left, f"rc={rc} after {took:.0f}s; CPU rank's message in the log: {named}; left: {left or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
