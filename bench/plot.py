"""PNG plots from a results JSON (needs matplotlib: ``pip install -e '.[bench]'``).

    python bench/plot.py results.json [--out-dir DIR]     # default: beside the JSON

Per model: one figure with four panels (decode tokens/s at batch 1 and 16, prefill tokens/s,
time to first token) and one with peak GPU and host memory, one bar per configuration that
ran; plus the all-reduce latency per size when the JSON has it. Prints the files written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
