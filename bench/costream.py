"""The CPU and PCIe together: how fast a CPU rank could stream its weights if each linear layer's
output rows were split between its CPU kernel and the node's GPU (the GPU's rows copied over PCIe
from page-locked memory at every step, the next layer's rows queued behind the current result).

    python bench/costream.py --out FILE.json [--kernels DIR] [--layer-shapes 6144x4096,...]
        [--copies 3] [--fractions 0,0.2,0.3,0.4,0.5,1] [--threads 13] [--ahead 1,3 [--chunk-mib 32]]

One subprocess on the cores the shim's rank plan gives one CPU rank beside one GPU rank (as
``bench/bound.py`` measures the CPU alone). For each fraction f of each weight's rows given to the
GPU and batch 1 and 16: the median time of one pass through ``--copies`` decoder layers of the
given shapes, in GB/s of all weight bytes (f = 0: the CPU alone; f = 1: the GPU alone, PCIe-bound,
as stock UVA offload). Each split's output is checked against the CPU-only result. The CPU part
uses vLLM's packed AMX kernel where available (else oneDNN, else ``F.linear``), on its own rows.
Both sides read the same DRAM, so the sum of the two rates alone is not the bound: this measures it.
``--together``: first, whether the two slow each other on this host: pinned host-to-GPU copies of
512 MiB alone, the CPU kernel's pass over every weight alone, then both at once (the copies from a
thread), each rate over the same window.
``--ahead``: each fraction again with the GPU rows streamed as the engine streams them
(``collectives/weight_stream.py``: pieces of ``--chunk-mib``, that many pieces copied ahead, one
ring in call order); its output must equal the first way's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import bound  # noqa: E402

#: the 8B Llama shapes' decoder layer (qkv, o, gate_up, down)
DEFAULT_SHAPES = "6144x4096,4096x4096,28672x4096,4096x14336"
ROW_ALIGN = 64  # the GPU's share is a multiple of this many rows (packed kernels want blocks of 32)


def cpu_kernel(weight):
    """The best of vLLM's CPU kernels for ``weight`` and its name."""
    fns, _, _ = bound.kernel_fns(weight)
    for name in ("packed", "oneDNN", "F.linear"):
        if name in fns:
            return fns[name], name
    raise AssertionError("F.linear is always there")


class Split:
    """One weight, rows [0, k) on the GPU (streamed from a page-locked copy), [k, n) on the CPU."""

    def __init__(self, weight, fraction: float, pin: bool) -> None:
        import torch

        n = weight.shape[0]
        self.k = min(n, int(round(n * fraction / ROW_ALIGN)) * ROW_ALIGN)
        self.in_features = weight.shape[1]
        self.gpu_rows = torch.empty((self.k, weight.shape[1]), dtype=weight.dtype, pin_memory=pin)
        self.gpu_rows.copy_(weight[: self.k])
        self.cpu, self.kernel = cpu_kernel(weight[self.k:].contiguous()) if self.k < n else (None, "-")
        self.layer = None  # as weight_stream streams the GPU rows (streamer_for)


def streamer_for(splits, dev, ahead: int, chunk_bytes: int | None):
    """A weight_stream.WeightStreamer over the GPU rows of ``splits``, in their order."""
    from types import SimpleNamespace

    from hetero_shim.collectives import weight_stream

    layers = []
    for s in splits:
        s.layer = SimpleNamespace(weight=s.gpu_rows, index=len(layers)) if s.k else None
        layers += [s.layer] if s.k else []
    slot = weight_stream.cut_into_pieces(layers, chunk_bytes)
    return weight_stream.WeightStreamer(dev, layers, slot, None, ahead)


def run_pass(splits, xs, dev, ahead: dict, streamer=None):
    """One pass: each weight's GPU rows launched first, its CPU rows computed meanwhile, then joined;
    the next weight's GPU rows queued behind the current result, or with ``streamer`` (streamer_for,
    its stream current) as it queues them. ``dev`` "cpu": a dry run of the same logic without a GPU
    (the tests)."""
    import torch
    from torch.cuda import streams

    gpu = dev.type == "cuda"
    outs = []
    for i, s in enumerate(splits):
        x, done = xs[s.in_features], None
        if s.k and streamer is not None:
            y = torch.empty((x.shape[0], s.k), dtype=x.dtype, device=dev)
            streamer.multiply(x.to(dev, non_blocking=True), s.layer, None,
                              lambda first, end, part, y=y: y[:, first:end].copy_(part))
        elif s.k:
            w = ahead.pop(i, None)
            if w is None:
                w = s.gpu_rows.to(dev, non_blocking=True)
            y = torch.nn.functional.linear(x.to(dev, non_blocking=True), w)
        if s.k:
            host = torch.empty(y.shape, dtype=y.dtype, pin_memory=gpu)
            host.copy_(y, non_blocking=True)
            done = streams.Event() if gpu else None
            if gpu:
                done.record(torch.cuda.current_stream())
            following = (i + 1) % len(splits)
            if splits[following].k and streamer is None:
                ahead[following] = splits[following].gpu_rows.to(dev, non_blocking=True)
        rest = s.cpu(x) if s.cpu is not None else None
        if done is not None:
            done.synchronize()
        if not s.k:
            outs.append(rest)
        else:
            outs.append(host if rest is None else torch.cat((host, rest), dim=1))
    return outs


def together(weights, dev, min_time: float) -> dict:
    """GB/s of pinned host-to-GPU copies and of the CPU kernel's pass over ``weights`` (batch 1), each
    alone and both at once."""
    import threading
    import time

    import torch
    from torch.cuda import streams

    host = torch.empty(512 << 20, dtype=torch.uint8, pin_memory=True)
    target, side = torch.empty_like(host, device=dev), streams.Stream(device=dev)
    kernels = [cpu_kernel(w)[0] for w in weights]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]).to(w.dtype) for w in weights}
    total = sum(w.numel() * w.element_size() for w in weights)

    def copy_once() -> None:
        with torch.cuda.stream(side):
            target.copy_(host, non_blocking=True)
        side.synchronize()

    def cpu_pass() -> None:
        for fn, w in zip(kernels, weights):
            fn(xs[w.shape[1]])

    copy_s, _ = bound._median_time(copy_once, min_time)
    cpu_s, _ = bound._median_time(cpu_pass, min_time)
    copies, stop, failed, ended = [0], threading.Event(), [], []

    def copy_loop() -> None:
        try:
            with torch.inference_mode():  # thread-local: the copies' target was made under it
                while not stop.is_set():  # four copies queued per wait: the DMA stays busy while this
                    with torch.cuda.stream(side):  # thread waits for the interpreter's lock
                        for _ in range(4):
                            target.copy_(host, non_blocking=True)
                    side.synchronize()
                    copies[0] += 4
                ended.append(time.perf_counter())
        except Exception as exc:  # noqa: BLE001 - reported below: a dead copier must not read as 0 GB/s
            failed.append(exc)

    thread = threading.Thread(target=copy_loop)
    passes, start = 0, time.perf_counter()
    thread.start()
    # at least 2 s: the copier's last batch (2 GiB, ~40 ms) runs past the window alone
    while time.perf_counter() - start < max(2 * min_time, 2.0, 2 * cpu_s):
        cpu_pass()
        passes += 1
    stop.set()
    thread.join()
    window = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"the copies beside the CPU kernel failed: {failed[0]!r}")
    h2d, cpu = copies[0] * host.numel() / (ended[0] - start) / 1e9, passes * total / window / 1e9
    return {"h2d_alone_GBps": round(host.numel() / copy_s / 1e9, 2), "cpu_alone_GBps": round(total / cpu_s / 1e9, 2),
            "h2d_together_GBps": round(h2d, 2), "cpu_together_GBps": round(cpu, 2),
            "sum_together_GBps": round(h2d + cpu, 2), "window_s": round(window, 3)}


def worker(opts) -> dict:
    cores = [int(c) for c in opts.cores.split(",")]
    os.sched_setaffinity(0, cores)
    source = bound.load_kernels(opts.kernels)
    import torch
    from torch.cuda import streams

    torch.set_num_threads(opts.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    shapes = [tuple(int(v) for v in part.split("x")) for part in opts.layer_shapes.split(",")]
    weights = [(torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
               for _ in range(opts.copies) for n, k in shapes]
    total = sum(w.numel() * w.element_size() for w in weights)
    dev = torch.device(opts.device)
    if dev.type == "cuda":
        torch.cuda.set_stream(streams.Stream(device=dev))
    out = {"threads": opts.threads, "cores": cores, "kernels_from": source, "shapes": [list(s) for s in shapes],
           "copies": opts.copies, "bytes": total, "by_fraction": {}}
    reference = {}
    if opts.together:
        with torch.inference_mode():
            out["together"] = together(weights, dev, opts.min_time)
        print(f"costream together: {json.dumps(out['together'])}", file=sys.stderr, flush=True)
    with torch.inference_mode():
        for fraction in opts.fractions:
            splits = [Split(w, fraction, pin=dev.type == "cuda") for w in weights]
            rows = {"kernel": sorted({s.kernel for s in splits}),
                    "gpu_share": round(sum(s.k * s.in_features * 2 for s in splits) / total, 3)}
            for m in (1, 16):
                xs = {k: (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 0.5).to(torch.bfloat16)
                      for _, k in shapes}
                ahead: dict = {}
                got = run_pass(splits, xs, dev, ahead)
                if m not in reference:
                    reference[m] = [g.float() for g in got]
                err = max(((g.float() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, reference[m]))
                t, reps = bound._median_time(lambda: run_pass(splits, xs, dev, ahead), opts.min_time)
                rows[str(m)] = {"ms": round(t * 1e3, 3), "GBps": round(total / t / 1e9, 2), "reps": reps,
                                "max_rel_err_vs_first": round(err, 4)}
                first = None
                for a in opts.ahead if fraction > 0 else ():
                    row, out_a = streamed_rows(splits, xs, dev, a, opts.chunk_mib << 20, got, first, total, opts.min_time)
                    rows.setdefault("ahead", {})[f"{a}/{m}"] = row
                    first = out_a if first is None else first
            out["by_fraction"][str(fraction)] = rows
            print(f"costream f={fraction}: {json.dumps(rows)}", file=sys.stderr, flush=True)
            del splits
            if dev.type == "cuda":
                torch.cuda.synchronize()
    return out


def streamed_rows(splits, xs, dev, ahead: int, chunk_bytes: int, plain, first, total: int, min_time: float):
    """The pass with the GPU rows streamed by weight_stream (``ahead`` pieces ahead): its time, its
    largest difference from ``plain`` (the plain pass: other GEMM shapes, so rounding may differ),
    and whether its output equals ``first`` (the first ``--ahead`` value's: the same GEMMs) bit for
    bit. Returns (row, output)."""
    import torch

    streamer = streamer_for(splits, dev, ahead, chunk_bytes)
    before = torch.cuda.current_stream()
    torch.cuda.set_stream(streamer.stream)
    try:
        got = run_pass(splits, xs, dev, {}, streamer)
        t, reps = bound._median_time(lambda: run_pass(splits, xs, dev, {}, streamer), min_time)
    finally:
        torch.cuda.synchronize()
        torch.cuda.set_stream(before)
    err = max(((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, plain))
    same = first is None or all(torch.equal(g, e) for g, e in zip(got, first))
    return {"ms": round(t * 1e3, 3), "GBps": round(total / t / 1e9, 2), "reps": reps,
            "max_rel_err_vs_plain": round(err, 4), "equal_to_first_ahead": same,
            "buffers": len(streamer.slots), "pieces": sum(len(layer.pieces) for layer in streamer.layers)}, got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernels", default=os.environ.get("HETERO_SHIM_CPU_KERNELS"))
    ap.add_argument("--layer-shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--fractions", default="0,0.2,0.3,0.4,0.5,1")
    ap.add_argument("--threads", type=int, default=None, help="default: the plan's cores for one CPU rank")
    ap.add_argument("--min-time", type=float, default=1.5)
    ap.add_argument("--device", default="cuda:0", help="cpu: a dry run without a GPU (tests)")
    ap.add_argument("--ahead", default="", help="e.g. 1,3: also stream the GPU rows as the engine does, "
                    "that many pieces ahead (GPU only)")
    ap.add_argument("--chunk-mib", type=int, default=32, help="with --ahead: MiB per piece")
    ap.add_argument("--together", action="store_true", help="first: copies and the CPU kernel alone and at once (GPU only)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cores", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    opts.fractions = [float(f) for f in str(opts.fractions).split(",")]
    opts.ahead = [int(a) for a in str(opts.ahead).split(",") if a.strip()]
    if (opts.ahead or opts.together) and opts.device == "cpu":
        ap.error("--ahead and --together copy to a GPU: leave them out with --device cpu")
    if opts.worker:
        result = worker(opts)
        Path(opts.out).write_text(json.dumps(result, indent=1))
        return 0
    plan, every = bound.plan_cores(1)
    threads = opts.threads or len(plan)
    cores = bound.cores_for(threads, plan, every)
    import subprocess

    cmd = [sys.executable, __file__, "--worker", "--out", opts.out, "--layer-shapes", opts.layer_shapes,
           "--copies", str(opts.copies), "--fractions", ",".join(map(str, opts.fractions)),
           "--threads", str(threads), "--cores", ",".join(map(str, cores)), "--min-time", str(opts.min_time),
           "--device", opts.device, "--ahead", ",".join(map(str, opts.ahead)), "--chunk-mib", str(opts.chunk_mib)]
    cmd += ["--together"] if opts.together else []
    if opts.kernels:
        cmd += ["--kernels", opts.kernels]
    done = subprocess.run(cmd, check=False)
    if done.returncode:
        return done.returncode
    result = json.loads(Path(opts.out).read_text())
    if "together" in result:
        t = result["together"]
        print(f"alone: host->GPU {t['h2d_alone_GBps']} GB/s, CPU kernel {t['cpu_alone_GBps']} GB/s; at once: "
              f"{t['h2d_together_GBps']} + {t['cpu_together_GBps']} = {t['sum_together_GBps']} GB/s")
    print(f"{'GPU share':>10} {'kernel':>10} {'b1 ms':>8} {'b1 GB/s':>8} {'b16 ms':>8} {'b16 GB/s':>9}")
    for f, row in result["by_fraction"].items():
        print(f"{row['gpu_share']:>10} {','.join(row['kernel']):>10} {row['1']['ms']:>8} {row['1']['GBps']:>8} "
              f"{row['16']['ms']:>8} {row['16']['GBps']:>9}")
        for a in opts.ahead:
            b1, b16 = row.get("ahead", {}).get(f"{a}/1"), row.get("ahead", {}).get(f"{a}/16")
            if b1 and b16:
                print(f"{'':>10} {f'ahead {a}':>10} {b1['ms']:>8} {b1['GBps']:>8} {b16['ms']:>8} {b16['GBps']:>9}"
                      f"  same as ahead {opts.ahead[0]}: {b1['equal_to_first_ahead'] and b16['equal_to_first_ahead']}; "
                      f"vs plain {max(b1['max_rel_err_vs_plain'], b16['max_rel_err_vs_plain'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
