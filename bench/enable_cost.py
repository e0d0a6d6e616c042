"""What ``import hetero_shim; hetero_shim.enable()`` costs a process that has not imported vLLM.

    python bench/enable_cost.py [-n 30] [--out bench/out/enable_cost.json] [--python PATH]

Runs ``-n`` fresh interpreters for each statement below, round-robin (so that a busy spell of
the machine hits every statement alike). Each child times its statement itself
(``time.perf_counter`` around it) and reports the modules the statement imported; the parent
also times the whole child (interpreter start to exit). The children get this checkout first
on PYTHONPATH and no HETERO_SHIM_* variables. Prints median and 90th percentile per statement
and whether the target holds: enable() (with the package import) under 20 ms, without
importing vLLM. Exit status 1 only when a child failed.

Modules the interpreter imports before the statement (``site``, ``.pth`` files such as an
editable install's finder) cost the statement nothing; the JSON records how many there were.
``--no-site`` runs the children with ``python -S`` and the site-packages folders on PYTHONPATH
instead: no ``.pth`` file runs, as in an interpreter that imports little at start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TARGET_MS = 20.0
ENABLE = "enable"
CASES = {
    "baseline": "pass",
    "import": "import hetero_shim",
    ENABLE: "import hetero_shim; hetero_shim.enable()",
    "wrapt": "import wrapt",
}
#: Modules the enable() statement must not import (vLLM itself, and what only patching needs).
HEAVY = ("vllm", "torch", "wrapt", "asyncio", "importlib.metadata", "hetero_shim.patches.tables")

CHILD = """\
import sys, time
_before = set(sys.modules)
_t0 = time.perf_counter()
{statement}
_t1 = time.perf_counter()
_new = sorted(set(sys.modules) - _before)
import json
print("ENABLE_COST " + json.dumps({{"ms": (_t1 - _t0) * 1e3, "startup_modules": len(_before), "new_modules": _new}}))
"""


def site_packages(python: str) -> list[str]:
    code = "import json, site; print(json.dumps(site.getsitepackages()))"
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def child_env(extra_path: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HETERO_SHIM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", ""), *extra_path) if p)
    return env


def run_once(python: list[str], statement: str, env: dict[str, str], timeout: float) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([*python, "-c", CHILD.format(statement=statement)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    wall_ms = (time.perf_counter() - start) * 1e3
    line = next((l for l in proc.stdout.splitlines() if l.startswith("ENABLE_COST ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{statement!r} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    result = json.loads(line[len("ENABLE_COST "):])
    result["process_ms"] = wall_ms
    return result


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]


def summarize(statement: str, runs: list[dict]) -> dict:
    ms = [r["ms"] for r in runs]
    process = [r["process_ms"] for r in runs]
    imported = sorted({m for r in runs for m in r["new_modules"]})
    return {
        "statement": statement,
        "median_ms": statistics.median(ms),
        "p90_ms": p90(ms),
        "process_median_ms": statistics.median(process),
        "process_p90_ms": p90(process),
        "startup_modules": statistics.median(r["startup_modules"] for r in runs),
        "modules_imported": len(imported),
        "heavy_imported": [m for m in HEAVY if m in imported],
        "runs_ms": ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=30, help="fresh interpreters per statement (default 30)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure (default: this one)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one child may take")
    parser.add_argument("--no-site", action="store_true", help="children run with -S, site-packages on PYTHONPATH")
    opts = parser.parse_args(argv)
    if opts.n < 1:
        parser.error(f"-n {opts.n}: need at least one run per statement")
    python = [opts.python, "-S"] if opts.no_site else [opts.python]
    env = child_env(site_packages(opts.python) if opts.no_site else [])
    runs: dict[str, list[dict]] = {name: [] for name in CASES}
    try:
        for _ in range(opts.n):
            for name, statement in CASES.items():
                runs[name].append(run_once(python, statement, env, opts.timeout))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"enable_cost: {exc}", file=sys.stderr)
        return 1
    cases = {name: summarize(CASES[name], runs[name]) for name in CASES}
    enable = cases[ENABLE]
    met = enable["median_ms"] < TARGET_MS and not {"vllm", "torch"} & set(enable["heavy_imported"])
    result = {
        "n": opts.n,
        "python": opts.python,
        "no_site": opts.no_site,
        "python_version": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "target_ms": TARGET_MS,
        "target_met": met,
        "cases": cases,
    }
    print(f"{'statement':44s} {'median ms':>9s} {'p90 ms':>8s} {'process ms':>10s} {'modules':>7s}  heavy imports")
    for case in cases.values():
        print(f"{case['statement']:44s} {case['median_ms']:9.2f} {case['p90_ms']:8.2f} "
              f"{case['process_median_ms']:10.1f} {case['modules_imported']:7d}  "
              f"{', '.join(case['heavy_imported']) or '-'}")
    print(f"n={opts.n} per statement{' (python -S)' if opts.no_site else ''}, {os.cpu_count()} CPUs, "
          f"load {result['load_avg_1m']:.1f}, "
          f"{cases['baseline']['startup_modules']:.0f} modules imported at interpreter start")
    print(f"target: enable() with the import under {TARGET_MS:.0f} ms (median) and no vLLM/torch import: "
          f"{'MET' if met else 'NOT MET'} ({enable['median_ms']:.1f} ms)")
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
