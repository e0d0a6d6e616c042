"""PNG plots from a results JSON (needs matplotlib: ``pip install -e '.[bench]'``).

    python bench/plot.py results.json [--out-dir DIR]     # default: beside the JSON

Per model: one figure with four panels (decode tokens/s at batch 1 and 16, prefill tokens/s,
time to first token), one with peak GPU and host memory, one bar per configuration that ran, and
``<model>_step.png``: the batch-1 decode step of each configuration beside its bound (rows run with
``--breakdown`` and two pipeline stages: the first stage split by category in the shares of its
profiled steps, the second stage's work, the rest of the period); plus the all-reduce latency per
size when the JSON has it. Prints the files written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.breakdown import ORDER as CATEGORIES  # noqa: E402  the step breakdown's categories, in its order

PANELS = (("decode_b1_tok_s", "decode tokens/s, batch 1"), ("decode_b16_tok_s", "decode tokens/s, batch 16"),
          ("prefill_tok_s", "prefill tokens/s"), ("ttft_ms", "time to first token, ms (lower is better)"))
MEMORY = (("peak_gpu_gib", "peak GPU GiB"), ("peak_host_rss_gib", "peak host RSS GiB"),
          ("peak_host_anon_gib", "peak host anon GiB"))


def _bars(ax, names: list[str], values: list[float], title: str) -> None:
    bars = ax.bar(range(len(names)), values, color=[_colour(n) for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)


def _colour(name: str) -> str:
    if name.startswith("hetero"):
        return "tab:orange"
    if name.startswith("offload"):
        return "tab:blue"
    return "tab:gray"


def step_segments(run: dict) -> tuple[str, list[tuple[str, float]]]:
    """(stages, pieces) of a row's batch-1 decode step, each piece (label, ms): from its breakdown when
    it has two pipeline stages (the first stage's ms split in the category shares of its profiled
    1-token steps, the second stage's work, the rest of the period; ``stages`` e.g. "cpu -> gpu"),
    else the measured step as one piece."""
    for entry in (run.get("breakdown") or {}).get("runs", []):
        stages = (entry.get("pipeline") or {}).get("1")
        if not stages:
            continue
        ranks = [r for r in entry["ranks"] if r.get("pp_stage") is not None]
        first = min(ranks, key=lambda r: r["pp_stage"])
        last = max(ranks, key=lambda r: r["pp_stage"])
        ms = ((first.get("profile") or {}).get("1") or {}).get("ms") or {}
        total = sum(ms.values())
        pieces = ([(c, stages["stage0_ms"] * ms[c] / total) for c in CATEGORIES if ms.get(c)] if total
                  else [("first stage", stages["stage0_ms"])])
        pieces.append(("second stage works", stages["stage1_work_ms"]))
        rest = stages["period_ms"] - stages["stage0_ms"] - stages["stage1_work_ms"]
        if rest > 0:
            pieces.append(("between stages, engine", rest))
        return f"{first['kind']} -> {last['kind']}", pieces
    step = run["figures"].get("decode_b1_step_ms")
    return "", [("step (no breakdown)", step)] if step else []


def _step_figure(results: dict, model: str, runs: list[dict], out_dir: Path, plt) -> Path | None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [(r, *step_segments(r)) for r in runs]
    rows = [row for row in rows if row[2]]
    if not rows:
        return None
    bounds = {b["config"]: b for b in results.get("bound_fractions", []) if b.get("model") == model}
    labels = [c for c in (*CATEGORIES, "first stage") if any(c == p[0] for row in rows for p in row[2])]
    cmap = plt.get_cmap("tab10")
    colour = {label: cmap(i % 10) for i, label in enumerate(labels)}
    colour.update({"second stage works": "tab:olive", "between stages, engine": "lightgray",
                   "step (no breakdown)": "darkgray"})
    labels += [c for c in ("second stage works", "between stages, engine", "step (no breakdown)")
               if any(c == p[0] for row in rows for p in row[2])]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.8 * len(rows)))
    for y, (run, stages, pieces) in enumerate(rows):
        left = 0.0
        for label, ms in pieces:
            ax.barh(y, ms, left=left, color=colour[label], edgecolor="white", linewidth=0.5)
            left += ms
        ax.annotate(f"{left:.1f} ms", (left, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        bound = bounds.get(run["config"]) or {}
        tok_s = bound.get("bound_at_split_tok_s") or bound.get("bound_tok_s")
        if tok_s:
            ax.plot([1000 / tok_s] * 2, [y - 0.42, y + 0.42], color="black", linewidth=2)
    handles = [Line2D([], [], color="black", linewidth=2, label="bound (bench/bound.py)")]
    handles += [Patch(color=colour[label], label=label) for label in labels]
    ax.set_yticks(range(len(rows)), [f"{r['config']}\n{stages}" if stages else r["config"] for r, stages, _ in rows],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step, batch 1")
    ax.set_title(f"{model}: where a batch-1 decode step goes  {results.get('meta', {}).get('date', '')}", fontsize=10)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out_dir / f"{model}_step.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    date = results.get("meta", {}).get("date", "")
    for model in dict.fromkeys(r["model"] for r in results.get("runs", [])):
        runs = [r for r in results["runs"] if r["model"] == model and r["status"] == "ok"]
        if not runs:
            continue
        budget = (results.get("models", {}).get(model, {}).get("budget") or {}).get("budget_gib")
        for kind, panels in (("speed", PANELS), ("memory", MEMORY)):
            panels = [p for p in panels if any(r["figures"].get(p[0]) is not None for r in runs)]
            if not panels:
                continue
            fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
            for ax, (key, title) in zip(axes[0], panels):
                have = [r for r in runs if r["figures"].get(key) is not None]
                _bars(ax, [r["config"] for r in have], [r["figures"][key] for r in have], title)
                if key == "peak_gpu_gib" and budget:
                    ax.axhline(budget, color="tab:red", linestyle="--", linewidth=1)
            fig.suptitle(f"{model}: {kind}" + (f" (GPU budget {budget:.2f} GiB)" if budget else "") + f"  {date}",
                         fontsize=10)
            fig.tight_layout()
            path = out_dir / f"{model}_{kind}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        step = _step_figure(results, model, runs, out_dir, plt)
        if step:
            written.append(step)
    ar = results.get("allreduce") or {}
    if ar.get("rows"):
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for world, name in dict.fromkeys((r.get("world"), r["path"]) for r in ar["rows"]):
            rows = [r for r in ar["rows"] if r["path"] == name and r.get("world") == world]
            label = f"{name}, {world} ranks" if world else name
            ax.plot([r["bytes"] for r in rows], [r["median_us"] for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes")
        ax.set_ylabel("median us")
        ax.set_title("one all-reduce, rank 0 on the GPU, others CPU" if ar.get("meta", {}).get("gpu_rank") else
                     "one all-reduce, CPU ranks only", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "allreduce.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--out-dir", type=Path, default=None)
    opts = parser.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: pip install -e '.[bench]' (or pip install matplotlib)", file=sys.stderr)
        return 2
    for path in plot(json.loads(opts.results.read_text()), opts.out_dir or opts.results.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
