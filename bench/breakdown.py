"""Where a step's time goes, per engine run and per rank/stage, from bench/breakdown/'s hook.

    BENCH_BREAKDOWN_DIR=DIR PYTHONPATH=bench/breakdown:$PYTHONPATH python3 bench/run.py ...   (or run.py --breakdown)
    python3 bench/breakdown.py DIR [--json OUT]

DIR holds what bench/breakdown/sitecustomize.py wrote in every vLLM process: per worker the
wall time of every ``execute_model`` / ``sample_tokens`` call and, for the profiled steps, ms per
category (GEMM, attention, norms, activations, rotary, communication, GPU hand-off, sampling, other ops) and
``python/overhead`` = step wall - every op's self time; per engine core the time inside each
``step`` call and between calls. Processes are grouped into engine runs by the engine core's pid
(workers are its children; a TP=1 stock engine runs its worker inside the engine core). For
two-stage pipeline runs the stage trace of bench/step_trace.py is added (``stage1_wait_ms``:
the CPU stage waiting for the GPU stage's activations), and where a CPU stage's requests to the
next stage's GPU rank were timed, what its wait for them is made of (bench/channel.py). Stdlib only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench import channel, step_trace  # noqa: E402


def _hook_module():
    """bench/breakdown/sitecustomize.py as a plain module (its categories; nothing is installed)."""
    spec = importlib.util.spec_from_file_location("bench_breakdown_hook", HERE / "breakdown" / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hook = _hook_module()
categorize = hook.categorize
ORDER = hook.ORDER


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a killed process
            continue
    return out


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def load(trace_dir: Path) -> list[dict]:
    """Engine runs: {"core_pid", "core": [...], "workers": [{"meta", "profile", "steps", "samples"}]}."""
    trace_dir = Path(trace_dir)
    workers: dict[int, dict] = {}
    for path in trace_dir.glob("*.worker.json"):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        pid = int(path.name.split(".")[0])
        workers[pid] = {"meta": {k: v for k, v in data.items() if k not in ("profile", "error")},
                        "profile": data.get("profile"), "error": data.get("error")}
    for path in trace_dir.glob("*.jsonl"):
        pid = int(path.name.split(".")[0])
        workers.setdefault(pid, {"meta": {"pid": pid}, "profile": None, "error": None})["steps"] = _lines(path)
    for pid, w in workers.items():
        w.setdefault("steps", [])
        w["samples"] = _lines(trace_dir / f"{pid}.sample.ndjson")
    cores = {int(p.name.split(".")[0]): _lines(p) for p in trace_dir.glob("*.core.ndjson")}
    runs: dict[int, dict] = {pid: {"core_pid": pid, "core": calls, "workers": []} for pid, calls in cores.items()}
    for pid, w in sorted(workers.items()):
        ppid = w["meta"].get("ppid")
        key = pid if pid in runs else ppid if ppid in runs else (ppid or pid)
        runs.setdefault(key, {"core_pid": None, "core": [], "workers": []})["workers"].append(w)

    def first(run: dict) -> float:
        times = [c["start"] for c in run["core"]] + [s["start"] for w in run["workers"] for s in w["steps"]]
        return min(times) if times else 0.0

    out = sorted(runs.values(), key=first)
    for run in out:
        run["workers"].sort(key=lambda w: (w["meta"].get("rank") is None, w["meta"].get("rank") or 0))
    return out


def profile_by_tokens(profile: dict | None) -> dict[int, dict]:
    """Per token count: mean ms per step of each category over the profiled steps, and its share."""
    if not profile:
        return {}
    groups: dict[int, list[dict]] = {}
    for step in profile.get("steps", []):
        groups.setdefault(step["tokens"], []).append(step)
    out = {}
    for tokens, steps in sorted(groups.items()):
        n = len(steps)
        wall = sum(s["wall_ms"] for s in steps) / n
        cats: dict[str, float] = {}
        dev: dict[str, float] = {}
        for s in steps:
            for k, v in s["cpu_ms"].items():
                cats[k] = cats.get(k, 0.0) + v / n
            for k, v in s.get("device_ms", {}).items():
                dev[k] = dev.get(k, 0.0) + v / n
        cats["python/overhead"] = max(0.0, wall - sum(s["ops_ms"] for s in steps) / n)
        ordered = {k: cats[k] for k in ORDER if k in cats} | {k: v for k, v in cats.items() if k not in ORDER}
        out[tokens] = {"steps": n, "wall_ms": round(wall, 3),
                       "execute_ms": round(sum(s["execute_ms"] for s in steps) / n, 3),
                       "sample_ms": round(sum(s.get("sample_ms", 0.0) for s in steps) / n, 3),
                       "ms": {k: round(v, 3) for k, v in ordered.items()},
                       "share": {k: round(v / wall, 4) if wall else None for k, v in ordered.items()}}
        if dev:
            out[tokens]["device_ms"] = {k: round(v, 3) for k, v in sorted(dev.items(), key=lambda kv: -kv[1])}
    return out


def step_walls(worker: dict) -> dict[int, dict]:
    """Every step (execute_model + its sample_tokens), not only the profiled ones: median ms per token count."""
    samples = {s["step"]: s for s in worker["samples"] if s.get("step") is not None}
    by: dict[int, list[float]] = {}
    index = 0
    for s in worker["steps"]:
        if not s["tokens"]:
            continue
        ms = (s["end"] - s["start"]) * 1e3
        if index in samples:
            ms += (samples[index]["end"] - samples[index]["start"]) * 1e3
        by.setdefault(s["tokens"], []).append(ms)
        index += 1
    return {t: {"steps": len(v), "median_ms": _median(v)} for t, v in sorted(by.items())}


def core_summary(calls: list[dict]) -> dict | None:
    """The engine core's loop: time inside each step call and between calls (scheduling, output
    processing, the input queue). With the batch queue (pipeline mode) a call that schedules a batch
    returns without waiting for it and a later call waits for the result, so "inside" there is
    not a step's time; ``inside_executed`` counts the calls that started a model step."""
    if not calls:
        return None
    calls = sorted(calls, key=lambda c: c["start"])
    inside = [(c["end"] - c["start"]) * 1e3 for c in calls]
    executed = [(c["end"] - c["start"]) * 1e3 for c in calls if c.get("executed")]
    gaps = sorted((b["start"] - a["end"]) * 1e3 for a, b in zip(calls, calls[1:]))
    out = {"fn": calls[0].get("fn"), "calls": len(calls), "executed": len(executed),
           "inside_median_ms": _median(inside), "inside_executed_median_ms": _median(executed),
           "between_median_ms": _median(gaps)}
    if gaps:
        out["between_p90_ms"] = round(step_trace.p90(gaps), 3)
    return out


def summarize(trace_dir: Path) -> dict:
    runs = []
    timings = channel.load(trace_dir)
    for index, run in enumerate(load(trace_dir)):
        entry = {"run": index, "core_pid": run["core_pid"], "core": core_summary(run["core"]), "ranks": []}
        for w in run["workers"]:
            meta = w["meta"]
            entry["ranks"].append({
                **{k: meta.get(k) for k in ("pid", "rank", "kind", "device", "tp_rank", "pp_stage", "torch_threads",
                                            "activities")},
                "error": w.get("error"),
                "steps": step_walls(w), "profile": profile_by_tokens(w["profile"]),
                "top_ops": (w["profile"] or {}).get("top_ops", [])[:12],
                "analysis_s": (w["profile"] or {}).get("analysis_s")})
        stages = sorted({w["meta"].get("pp_stage") for w in run["workers"] if w["meta"].get("pp_stage") is not None})
        if len(stages) == 2:
            first = [s for w in run["workers"] if w["meta"].get("pp_stage") == stages[0] and
                     w["meta"].get("tp_rank", 0) == 0 for s in w["steps"]]
            last = [s for w in run["workers"] if w["meta"].get("pp_stage") == stages[1] and
                    w["meta"].get("tp_rank", 0) == 0 for s in w["steps"]]
            entry["pipeline"] = {str(k): v for k, v in step_trace.pipeline_breakdown(
                sorted(first, key=lambda s: s["start"]), sorted(last, key=lambda s: s["start"])).items()}
        pids = {w["meta"].get("pid") for w in run["workers"]}
        mine = [t for t in timings if t.get("pid") in pids]
        entry["channel"] = [{"tp_rank": c.get("tp_rank"),
                             "tokens": {str(k): v for k, v in channel.summarize(c["records"], s["records"]).items()}}
                            for c, s in channel.pairs(mine)]
        runs.append(entry)
    return {"dir": str(trace_dir), "runs": runs}


def text(summary: dict, tokens: set[int] | None = None) -> str:
    lines = []
    for run in summary.get("runs", []):
        core = run.get("core")
        head = f"run {run['run']}"
        if core:
            head += (f": engine core {core['fn']} {core['inside_median_ms']} ms inside (median of {core['calls']} "
                     f"calls; {core['inside_executed_median_ms']} ms those that ran a step), "
                     f"{core['between_median_ms']} ms between calls (p90 {core.get('between_p90_ms')})")
        lines.append(head)
        for r in run["ranks"]:
            where = (f"rank {r['rank']} {r['kind'] or '?'}"
                     + (f" TP {r['tp_rank']}" if r.get("tp_rank") is not None else "")
                     + (f" stage {r['pp_stage']}" if r.get("pp_stage") is not None else "")
                     + (f", {r['torch_threads']} threads" if r.get("torch_threads") else ""))
            if r.get("error"):
                lines.append(f"  {where}: hook error: {r['error']}")
            steps = ", ".join(f"{t} tok {v['median_ms']} ms x{v['steps']}" for t, v in r["steps"].items()
                              if (tokens is None and v["steps"] >= 3) or (tokens and t in tokens))
            lines.append(f"  {where}: step medians (token counts seen 3+ times) {steps or '-'}")
            for t, p in r["profile"].items():
                if tokens is not None and t not in tokens:
                    continue
                cells = " | ".join(f"{k} {v:.2f} ({100 * (p['share'][k] or 0):.0f}%)" for k, v in p["ms"].items()
                                   if v >= 0.005)
                lines.append(f"    profiled {p['steps']} x {t} tok, {p['wall_ms']:.2f} ms/step: {cells}")
                if p.get("device_ms"):
                    lines.append("      GPU time: " + " | ".join(f"{k} {v:.2f}" for k, v in p["device_ms"].items()))
        for t, row in (run.get("pipeline") or {}).items():
            if (tokens is None and row["steps"] < 3) or (tokens is not None and int(t) not in tokens):
                continue
            lines.append(f"  pipeline {t} tok x {row['steps']}: stage0 {row['stage0_ms']} ms, stage1 waits "
                         f"{row['stage1_wait_ms']} ms, works {row['stage1_work_ms']} ms, period {row['period_ms']} ms"
                         f" (p90 {row.get('period_p90_ms')})")
        for pair in run.get("channel") or []:
            rows = {int(t): v for t, v in pair["tokens"].items() if tokens is None or int(t) in tokens}
            lines += channel.text(rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tokens", default=None, help="token counts to print (default all; all go to the JSON)")
    opts = parser.parse_args(argv)
    summary = summarize(opts.trace_dir)
    wanted = {int(t) for t in opts.tokens.split(",") if t} if opts.tokens else None
    print(text(summary, wanted))
    if opts.json:
        opts.json.write_text(json.dumps(summary, indent=1))
    return 0 if summary["runs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
