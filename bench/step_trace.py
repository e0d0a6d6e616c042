"""Where a pipeline step's time goes, from the per-worker step trace.

    PYTHONPATH=tests/integration/pp_trace:$PYTHONPATH PP_TRACE_DIR=DIR python3 bench/run.py ...
    python3 bench/step_trace.py DIR [--json OUT]

tests/integration/pp_trace/sitecustomize.py makes every vLLM worker append one line per
``Worker.execute_model`` call to DIR/<pid>.jsonl: rank, start, end, scheduled tokens. This
groups the processes into engine runs (processes whose traces overlap in time), pairs stage 0's
and stage 1's calls in order (both stages run the same steps in the same order), and for steps
of a given token count reports medians of:
- ``stage0_ms``: stage 0's call (the first stage: its layers, sending the activations);
- ``stage1_wait_ms``: stage 1 inside its call before stage 0 finished (waiting for activations);
- ``stage1_work_ms``: stage 1 after stage 0 finished (its layers, the LM head, sampling; the receive's tail);
- ``gap_ms``: from stage 1's end to stage 0's next start of a step with tokens (sampling, the engine core, scheduling;
  negative when stage 0 already works on the next micro-batch);
- ``period_ms``: from one stage-0 start to the next (the step rate); also ``period_p90_ms``, its 90th
  percentile: a decode rate follows the periods' mean, which a slow tail moves and the median does not.
For pipeline runs (two stages); a TP run's two ranks run each step at the same time. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(trace_dir: Path) -> list[list[dict]]:
    """Runs, each a list of per-process traces sorted by rank."""
    procs = []
    for path in sorted(trace_dir.glob("*.jsonl")):
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if steps:
            procs.append(sorted(steps, key=lambda s: s["start"]))
    procs.sort(key=lambda p: p[0]["start"])
    runs: list[list[list[dict]]] = []
    for p in procs:
        if runs and p[0]["start"] <= max(q[-1]["end"] for q in runs[-1]):
            runs[-1].append(p)
        else:
            runs.append([p])
    return [sorted(run, key=lambda p: p[0]["rank"]) for run in runs]


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def pipeline_breakdown(first: list[dict], last: list[dict]) -> dict[int, dict]:
    """Per token count: median stage times (ms) over the steps both stages ran."""
    by_tokens: dict[int, dict[str, list[float]]] = {}
    # vLLM's batch queue dispatches an empty step (0 tokens) to every worker while a request is in
    # flight; both stages see the same sequence, so dropping those keeps the pairs aligned
    first, last = [s for s in first if s["tokens"]], [s for s in last if s["tokens"]]
    n = min(len(first), len(last))
    for i in range(n):
        a, b = first[i], last[i]
        if a["tokens"] != b["tokens"]:
            continue
        row = by_tokens.setdefault(a["tokens"], {"stage0_ms": [], "stage1_wait_ms": [], "stage1_work_ms": [],
                                                 "gap_ms": [], "period_ms": []})
        row["stage0_ms"].append((a["end"] - a["start"]) * 1e3)
        row["stage1_wait_ms"].append(max(0.0, a["end"] - b["start"]) * 1e3)
        row["stage1_work_ms"].append((b["end"] - max(b["start"], a["end"])) * 1e3)
        if i + 1 < len(first):
            row["gap_ms"].append((first[i + 1]["start"] - b["end"]) * 1e3)
            row["period_ms"].append((first[i + 1]["start"] - a["start"]) * 1e3)
    return {tokens: {"steps": len(v["stage0_ms"]), **{k: _median(x) for k, x in v.items()},
                     "period_p90_ms": None if not v["period_ms"] else round(p90(v["period_ms"]), 2)}
            for tokens, v in sorted(by_tokens.items())}


def p90(values: list[float]) -> float:
    """The 90th percentile of ``values`` (not empty) as the bench's tools take it: the sorted value at
    index int(0.9 * (n - 1))."""
    ordered = sorted(values)
    return ordered[int(0.9 * (len(ordered) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tokens", default="1,16", help="token counts to print (all go to the JSON)")
    opts = parser.parse_args()
    wanted = {int(t) for t in opts.tokens.split(",") if t}
    out = []
    for index, run in enumerate(load(opts.trace_dir)):
        ranks = [p[0]["rank"] for p in run]
        entry = {"run": index, "ranks": ranks, "steps": [len(p) for p in run]}
        if len(run) == 2:
            entry["by_tokens"] = pipeline_breakdown(run[0], run[1])
        out.append(entry)
        print(f"run {index}: ranks {ranks}, steps {entry['steps']}")
        for tokens, row in entry.get("by_tokens", {}).items():
            if tokens in wanted:
                print(f"  {tokens:>5} tokens x {row['steps']:>3} steps: stage0 {row['stage0_ms']} ms, stage1 waits "
                      f"{row['stage1_wait_ms']} ms, works {row['stage1_work_ms']} ms, gap {row['gap_ms']} ms, "
                      f"period {row['period_ms']} ms (p90 {row['period_p90_ms']})")
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
