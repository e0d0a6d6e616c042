"""The bound's model: what the rates that ``bench/bound.py`` measured allow a decode step at batch 1.

Pure arithmetic over bound.py's JSON (no torch, no subprocesses; unit-tested with made-up rates).
``bound_for(model, budget, rates)`` turns the rates into the ideal decode step at batch 1 for
stock UVA offload and for heterogeneous TP and pipeline mode (bytes each device must read per
token / its rate; collectives, attention and launch overheads ignored); ``best_cpu_rate`` picks the rate it
uses and ``best_split_pass`` the pass it reports beside it, ``bound_of_config`` the entry a harness configuration
is held against, ``plan_stage_layers`` / ``plan_gpu_layers`` read a run's rank plan; ``table``
prints the measured rates, ``bounds_table`` a model's bounds.
"""

from __future__ import annotations

import math

GIB = 1 << 30
#: the kernels bound.py measures, by the names its JSON gives them (the table lists them in this order)
KERNELS = ("F.linear", "oneDNN", "packed")
#: what the bound calls "the CPU streams weights at": the best of these at batch 1
STREAMING_KERNELS = KERNELS


# --------------------------------------------------------------------------------------------
# the bound

def best_cpu_rate(rates: dict, threads: int | None = None, batch: int = 1) -> tuple[float, str, int] | None:
    """(bytes/s, kernel, threads) of the fastest weight-streaming kernel at ``batch`` tokens, at
    ``threads`` (default: the plan's thread count, else the most measured)."""
    cpu = rates.get("cpu") or {}
    if not cpu:
        return None
    if threads is None:
        threads = rates.get("plan_threads")
    key = str(threads) if str(threads) in cpu else max(cpu, key=int)
    best = None
    layer = (cpu[key].get("layer") or {}).get("by_kernel") or {}
    if layer:  # the engine's own matrix sizes, read in turn as a decode step reads them: the rate that applies
        for name, rows in layer.items():
            row = rows.get(str(batch))
            if name in STREAMING_KERNELS and row and (best is None or row["GBps"] > best[0]):
                best = (row["GBps"], f"{name}, layer shapes of {rates.get('layer_shapes_of') or 'the 3B default'}")
        if best:
            return best[0] * 1e9, best[1], int(key)
    for name, entry in (cpu[key].get("gemm") or {}).items():
        row = entry.get("by_batch", {}).get(str(batch))
        if name in STREAMING_KERNELS and row and (best is None or row["GBps"] > best[0]):
            best = (row["GBps"], name)
    return (best[0] * 1e9, best[1], int(key)) if best else None


def model_bytes(model) -> dict:
    """Bytes of the parts of a Llama-style checkpoint that a decode step reads (``model``: a
    bench.configs.ModelInfo). An embedding lookup reads one row (counted as 0); the LM head reads
    its whole matrix (with tied embeddings the embedding matrix itself)."""
    layers = list(model.layer_bytes)
    embed = getattr(model, "embed_bytes", 0)
    head_own = getattr(model, "lm_head_bytes", 0)
    head = head_own or (embed if getattr(model, "tied", False) else 0)
    other = max(0, model.weights_bytes - sum(layers) - embed - head_own)  # final norm
    return {"layers": layers, "embed": embed, "lm_head": head, "lm_head_stored": head_own, "other": other,
            "total": model.weights_bytes}


def _entry(cpu_bytes: float, gpu_bytes: float, pcie_bytes: float, seconds: float, how: str) -> dict:
    return {"cpu_read_gib": round(cpu_bytes / GIB, 4), "gpu_read_gib": round(gpu_bytes / GIB, 4),
            "pcie_gib": round(pcie_bytes / GIB, 4), "step_ms": round(seconds * 1e3, 3),
            "tok_s": round(1.0 / seconds, 2) if seconds > 0 else None, "how": how}


def pipeline_split(parts: dict, weights_budget_bytes: float, cpu_first: bool = False) -> int:
    """Decoder layers the GPU stage can hold within ``weights_budget_bytes``: with the GPU stage
    first, beside the embedding (the CPU stage holds the rest, the final norm and the LM head);
    with the CPU stage first (the shim's default), beside the final norm and the LM head (the CPU
    stage holds the embedding, read one row per token, and the leading layers)."""
    used = parts["lm_head"] + parts["other"] if cpu_first else parts["embed"]
    fit = 0
    for layer in parts["layers"]:
        if used + layer > weights_budget_bytes:
            break
        used += layer
        fit += 1
    return fit


def cpu_stage_layers(model, budget) -> int | None:
    """Decoder layers the CPU stage of the shim's default pipeline (CPU stage first) holds for
    ``model`` at ``budget`` in this bound's reckoning, or None without a weight budget."""
    parts = model_bytes(model)
    weights = getattr(budget, "weights_gib", None)
    if weights is None:
        return None
    return len(parts["layers"]) - pipeline_split(parts, weights * GIB, cpu_first=True)


def best_split_pass(rates: dict) -> tuple[float, str] | None:
    """(bytes/s, share) of the fastest batch-1 pass of ``bench/costream.py`` that ``bench/run.py``'s
    bound step ran over the CPU stage's layers (``rates['split_pass']``), GPU shares above 0 only;
    None when it did not run."""
    passes = ((rates.get("split_pass") or {}).get("by_fraction") or {}).items()
    best = max(((row["1"]["GBps"], share) for share, row in passes
                if float(share) > 0 and (row.get("1") or {}).get("GBps")), default=None)
    return (best[0] * 1e9, best[1]) if best else None


def bound_for(model, budget, rates: dict, tp_sizes=(2, 4), prefetch_layers: int | None = None) -> dict:
    """Ideal decode step time at batch 1 (tok/s = 1 / step) for ``model`` at ``budget`` (bench.
    configs.ModelInfo and Budget) with the measured ``rates`` (bench/bound.py's JSON). Each device
    reads the bytes it holds once per token at its measured rate:
    - ``offload-uva``: the offloaded bytes (``cpu_offload_gb`` = model - W, rounded up as the
      harness does; decoder layers only) over PCIe at the pinned host->GPU rate, plus what stays
      on the GPU (the rest of the layers, the LM head, the final norm) at the HBM read rate.
    - ``offload-prefetch`` (when ``prefetch_layers`` is given): the same bytes, but the copies
      overlap the compute of other layers: the larger of the two times.
    - ``hetero-pp2`` (the CPU stage first, the shim's default): the GPU stage holds the final norm,
      the LM head and the trailing layers that fit W, the CPU stage the embedding (one row read per
      token) and the rest; ``hetero-pp2-gpufirst``: the GPU stage holds the embedding and the
      leading layers that fit W, the CPU stage the rest + final norm + LM head. The stages run one
      after the other for one token: CPU bytes / best CPU kernel rate + GPU bytes / HBM. Where the
      CPU stage comes first, the GPU rank computes part of each of its layers in small steps
      (``HETERO_SHIM_CPU_GEMM_SPLIT``), streaming those rows over PCIe at once: the CPU stage's bytes
      at the CPU rate plus the pinned host->GPU rate (the best split, the two assumed not to slow
      each other). The split's pass measured outside the engine (``rates['split_pass']``,
      bench/costream.py) is reported beside it, not used: the engine's own pass ran faster than it
      on two machines, so it is no ceiling; ``hetero-pp2-nosplit``: at the CPU rate alone.
    - ``hetero-tpN``: every matrix split N ways, 1/N on the GPU rank, (N-1)/N on the CPU ranks
      (which share the plan's cores: the rate at the plan's thread count); ranks run at once:
      the larger of the two times.
    Collectives, attention over the KV cache and launch overheads are left out (all small at
    batch 1 beside the weights), so measured / bound <= 1 is the share of the hardware reached.
    Without a GPU (``rates['gpu']`` without CUDA or no budget): the heterogeneous rows are
    all-CPU (every byte at the best CPU rate over all cores) and offload has no bound."""
    parts = model_bytes(model)
    layers = parts["layers"]
    matrices = sum(layers) + parts["lm_head"] + parts["other"]  # read per token (the embedding: one row)
    gpu = rates.get("gpu") or {}
    cpu_best = best_cpu_rate(rates)
    out: dict = {"model_gib": round(parts["total"] / GIB, 4), "read_per_token_gib": round(matrices / GIB, 4),
                 "lm_head_gib": round(parts["lm_head"] / GIB, 4), "rates": {}}
    if cpu_best:
        out["rates"]["cpu_GBps"] = round(cpu_best[0] / 1e9, 2)
        out["rates"]["cpu_kernel"] = cpu_best[1]
        out["rates"]["cpu_threads"] = cpu_best[2]
        gemm = (rates["cpu"].get(str(cpu_best[2])) or {}).get("gemm") or {}
        out["rates"]["cpu_GBps_by_kernel"] = {k: v["by_batch"]["1"]["GBps"] for k, v in gemm.items()
                                              if "1" in v.get("by_batch", {})}
    if not gpu.get("cuda") or budget is None or getattr(budget, "weights_gib", None) is None:
        all_cpu = best_cpu_rate(rates, threads=rates.get("all_threads"))
        if all_cpu:
            seconds = matrices / all_cpu[0]
            row = _entry(matrices, 0, 0, seconds, f"no GPU: all {matrices / GIB:.3f} GiB at {all_cpu[0] / 1e9:.1f} "
                         f"GB/s ({all_cpu[1]}, {all_cpu[2]} threads)")
            for tp in tp_sizes:
                out[f"hetero-tp{tp}"] = row
            out["hetero-pp2"] = row
        return out
    h2d = gpu["h2d_pinned_GBps"] * 1e9
    hbm = gpu["hbm_read_GBps"] * 1e9
    out["rates"] |= {"h2d_GBps": gpu["h2d_pinned_GBps"], "hbm_GBps": gpu["hbm_read_GBps"]}
    w = budget.weights_gib * GIB
    excess = parts["total"] - w
    if excess > 0:
        offloaded = min(math.ceil(excess / GIB * 100) / 100 * GIB, sum(layers))
        resident = matrices - offloaded
        out["offload-uva"] = _entry(0, resident, offloaded, offloaded / h2d + resident / hbm,
                                    f"{offloaded / GIB:.2f} GiB over PCIe at {h2d / 1e9:.1f} GB/s + "
                                    f"{resident / GIB:.2f} GiB from HBM")
        if prefetch_layers:
            moved = min(prefetch_layers * max(layers), sum(layers))
            resident_p = matrices - moved
            out["offload-prefetch"] = _entry(0, resident_p, moved, max(moved / h2d, resident_p / hbm),
                                             f"{prefetch_layers} layers copied ahead, overlapping the compute")
    if cpu_best:
        rate = cpu_best[0]
        measured = best_split_pass(rates)
        together = rate + h2d
        if measured:
            out["rates"]["split_pass_GBps"] = round(measured[0] / 1e9, 2)
            out["rates"]["split_pass_share"] = measured[1]

        def pipeline(gpu_layers: int, cpu_first: bool, split: bool = True) -> dict:
            tail = parts["lm_head"] + parts["other"]
            split = split and cpu_first
            stream = together if split else rate
            if cpu_first:  # CPU: embedding lookup + leading layers; GPU: the rest + final norm + LM head
                gpu_bytes = sum(layers[len(layers) - gpu_layers:]) + tail
                cpu_bytes = sum(layers[:len(layers) - gpu_layers])
            else:
                gpu_bytes = sum(layers[:gpu_layers])
                cpu_bytes = sum(layers[gpu_layers:]) + tail
            how = f"{rate / 1e9:.1f} GB/s ({cpu_best[1]})"
            if split:
                how += f" + PCIe {h2d / 1e9:.1f} GB/s, split"
                if measured:
                    how += f" (the split's pass outside the engine: {measured[0] / 1e9:.1f} GB/s at GPU share {measured[1]})"
            entry = _entry(cpu_bytes, gpu_bytes, 0, cpu_bytes / stream + gpu_bytes / hbm,
                           f"{'CPU stage first' if cpu_first else 'GPU stage first'}: {gpu_layers} of {len(layers)} "
                           f"layers on the GPU; CPU stage {cpu_bytes / GIB:.2f} GiB at {how}")
            return entry | {"gpu_layers": gpu_layers}

        for key, cpu_first, split in (("hetero-pp2", True, True), ("hetero-pp2-nosplit", True, False),
                                      ("hetero-pp2-gpufirst", False, False)):
            out[key] = pipeline(pipeline_split(parts, w, cpu_first), cpu_first, split)
            # the bound of every other split too: the shim's automatic split need not be this one
            out[key]["tok_s_by_gpu_layers"] = {str(g): pipeline(g, cpu_first, split)["tok_s"]
                                               for g in range(len(layers) + 1)}
        for tp in tp_sizes:
            g, c = matrices / tp, matrices * (tp - 1) / tp
            out[f"hetero-tp{tp}"] = _entry(c, g, 0, max(c / rate, g / hbm),
                                           f"CPU ranks {c / GIB:.2f} GiB at {rate / 1e9:.1f} GB/s, GPU "
                                           f"{g / GIB:.2f} GiB from HBM, at once")
    if "offload-uva" in out and "hetero-pp2" in out:
        out["hetero_pp2_over_offload"] = round(out["hetero-pp2"]["tok_s"] / out["offload-uva"]["tok_s"], 3)
        out["hetero_tp2_over_offload"] = round(out["hetero-tp2"]["tok_s"] / out["offload-uva"]["tok_s"], 3)
    return out


def bound_of_config(bounds: dict, config: str) -> dict | None:
    """The bound entry that applies to a harness configuration (variants share their base's)."""
    from bench.configs import split_variants

    base, env = split_variants(config)
    if base == "hetero-pp2" and env.get("HETERO_SHIM_STAGE_ORDER") == "gpu-first":
        return bounds.get("hetero-pp2-gpufirst")
    if base == "hetero-pp2" and (env.get("HETERO_SHIM_CPU_GEMM_SPLIT") == "0"
                                 or env.get("HETERO_SHIM_CPU_GEMM_ON_GPU") == "0"
                                 or env.get("HETERO_SHIM_CPU_GEMM_VIA") == "own"):
        return bounds.get("hetero-pp2-nosplit")
    return bounds.get(base)


def plan_stage_layers(plan_text: str | None, kind: str) -> dict[int, int]:
    """{stage: layers} of the ``kind`` ("GPU" or "CPU") stages in a pipeline run's rank plan
    (hetero_shim's ``describe()``: "rank 1: GPU  cuda:0  stage 1: layers 13-27 (15)")."""
    import re

    return {int(m.group(1)): int(m.group(2)) for m in re.finditer(
        rf"rank \d+: {kind} .*?stage (\d+): layers \d+-\d+ \((\d+)\)", plan_text or "")}


def plan_gpu_layers(plan_text: str | None) -> int | None:
    """Layers of the GPU stage(s) in a pipeline run's rank plan, or None."""
    stages = plan_stage_layers(plan_text, "GPU")
    return sum(stages.values()) if stages else None


# --------------------------------------------------------------------------------------------
# the tables

def table(result: dict) -> str:
    lines = []
    meta = result.get("meta", {})
    lines.append(f"bound (bench/bound.py), weights {meta.get('shape')} bf16 "
                 f"({meta.get('weight_mib')} MiB); kernels: {meta.get('kernels_from', '?')}")
    rows = sorted((result.get("cpu") or {}).items(), key=lambda kv: int(kv[0]))
    rows += [(f"{t} (THP_MEM_ALLOC_ENABLE=1)", r) for t, r in (result.get("cpu_thp") or {}).items()]
    for threads, row in rows:
        if "error" in row:
            lines.append(f"  {threads:>3} threads: {row['error']}")
            continue
        plan = " (plan: 1 CPU rank)" if str(threads).split()[0] == str(result.get("plan_threads")) else ""
        lines.append(f"  {threads:>3} threads{plan}, cores {row.get('cores_text', '')}: read fp32 "
                     f"{row['read']['float32']['GBps']:.1f} GB/s, bf16 {row['read']['bfloat16']['GBps']:.1f} GB/s")
        for name in KERNELS:
            entry = row["gemm"].get(name)
            if entry is None:
                lines.append(f"      {name:<9} {row['unavailable'].get(name, 'not measured')}")
                continue
            cells = []
            for m, r in entry["by_batch"].items():
                cells.append(f"M={m}: {r['GBps']:.1f} GB/s" + (f" {r['TFLOPs']:.2f} TFLOP/s" if int(m) >= 512 else ""))
            lines.append(f"      {name:<9} " + ", ".join(cells) + f"  (err {entry['max_rel_err']:.1e})")
        by_copies = row.get("layer_by_copies") or ({"": row["layer"]} if row.get("layer") else {})
        for layer in by_copies.values():
            if not layer.get("by_kernel"):
                continue
            shapes = " ".join("x".join(map(str, s)) for s in layer["shapes"])
            lines.append(f"      layer shapes {shapes}, {layer['copies']} layers in turn "
                         f"({layer['bytes'] / 1e9:.2f} GB):")
            for name, rows in layer["by_kernel"].items():
                lines.append(f"        {name:<9} " + ", ".join(
                    f"M={m}: {r['GBps']:.1f} GB/s ({r['us_per_call']:.0f} us per call)" for m, r in rows.items()))
        host = row.get("host") or {}
        if host:
            lines.append(f"      host: transparent huge pages {host.get('thp')}; AMX tiles granted to this process: "
                         f"{host.get('amx_permission')}")
    gpu = result.get("gpu")
    if gpu and gpu.get("cuda"):
        lines.append(f"  GPU {gpu['name']}: pinned host->GPU {gpu['h2d_pinned_GBps']:.1f} GB/s, GPU->host "
                     f"{gpu['d2h_pinned_GBps']:.1f}, HBM read {gpu['hbm_read_GBps']:.0f} GB/s")
    elif gpu is not None:
        lines.append("  GPU: " + (gpu.get("error") or "no CUDA here"))
    return "\n".join(lines)


def bounds_table(name: str, bounds: dict) -> list[str]:
    lines = [f"  {name}: reads {bounds['read_per_token_gib']:.2f} GiB per token (LM head {bounds['lm_head_gib']:.2f})"]
    for key in ("offload-uva", "offload-prefetch", "hetero-pp2", "hetero-tp2", "hetero-tp4"):
        b = bounds.get(key)
        if b:
            lines.append(f"    {key:<17} {b['tok_s']:>8.1f} tok/s ({b['step_ms']:.2f} ms): {b['how']}")
    if "hetero_pp2_over_offload" in bounds:
        lines.append(f"    bound hetero PP=2 / offload {bounds['hetero_pp2_over_offload']:.2f}x, "
                     f"TP=2 / offload {bounds['hetero_tp2_over_offload']:.2f}x")
    return lines
