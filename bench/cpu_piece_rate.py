"""How fast a CPU rank does its part of a large 2-rank all-reduce, by the number of cores it has.

    python bench/cpu_piece_rate.py [--cores 8,13] [--bytes 16M] [--piece 4M] [--iters 30] [--out OUT.json]

Why: between one GPU rank and one CPU rank a 16 MiB all-reduce is bound by the CPU rank's work
(bench/README.md, "fourth session"): per slot-sized piece it copies its input into the segment
and adds the GPU rank's piece to its own (``ShmCollectives._all_reduce_piece``, 2 ranks). This
times exactly those two torch calls on fp32 pieces, alone, with the process pinned to the first
N allowed cores and N torch threads, for each N of ``--cores``; plus a plain read of 256 MiB (the
streaming rate). One fresh process per N (torch's thread pool is sized once). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.allreduce import parse_size  # noqa: E402


def median_s(fn, iters: int) -> float:
    fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(cores: int, nbytes: int, piece: int, iters: int) -> dict:
    """In this process: pin to ``cores`` cores and time the CPU rank's per-piece work."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    import torch

    torch.set_num_threads(cores)
    n, k = nbytes // 4, piece // 4
    src, peer = torch.rand(n), torch.rand(n)
    segment = torch.empty(2 * k)  # two buffers, as the segment's double buffering uses them
    big = torch.rand(64 << 20)  # 256 MiB

    def copy_in():
        for i, p0 in enumerate(range(0, n, k)):
            segment[(i % 2) * k:(i % 2) * k + min(k, n - p0)].copy_(src[p0:p0 + k])

    def add():
        for p0 in range(0, n, k):
            torch.add(src[p0:p0 + k], peer[p0:p0 + k], out=src[p0:p0 + k])

    def both():  # the CPU rank's order: copy piece i in, then add into it
        for i, p0 in enumerate(range(0, n, k)):
            segment[(i % 2) * k:(i % 2) * k + min(k, n - p0)].copy_(src[p0:p0 + k])
            torch.add(src[p0:p0 + k], peer[p0:p0 + k], out=src[p0:p0 + k])

    t = {name: median_s(fn, iters) for name, fn in (("copy", copy_in), ("add", add), ("copy+add", both))}
    t["read 256 MiB"] = median_s(big.sum, max(3, iters // 5))
    return {"cores": cores, "bytes": nbytes, "piece": piece, "median_s": t,
            "GBps": {"copy": 2 * nbytes / t["copy"] / 1e9, "add": 3 * nbytes / t["add"] / 1e9,
                     "copy+add": 5 * nbytes / t["copy+add"] / 1e9, "read": big.numel() * 4 / t["read 256 MiB"] / 1e9,
                     "all-reduce bound": nbytes / t["copy+add"] / 1e9}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", default="8,13")
    parser.add_argument("--bytes", default="16M")
    parser.add_argument("--piece", default="4M")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "cpu_piece_rate.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure in this process
    opts = parser.parse_args()
    nbytes, piece = parse_size(opts.bytes), parse_size(opts.piece)
    if opts.one:
        print(json.dumps(measure(opts.one, nbytes, piece, opts.iters)))
        return 0
    available = len(os.sched_getaffinity(0))
    rows = []
    for cores in (int(c) for c in opts.cores.split(",")):
        if cores > available:
            print(f"skipping {cores} cores: only {available} allowed")
            continue
        out = subprocess.run([sys.executable, __file__, "--one", str(cores), "--bytes", opts.bytes, "--piece",
                              opts.piece, "--iters", str(opts.iters)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))
    print(f"\nCPU rank's work per {opts.bytes} all-reduce in {opts.piece} pieces, fp32 (median of {opts.iters}); "
          "GB/s of memory traffic (copy 2x, add 3x, both 5x the bytes)")
    print(f"{'cores':>5} {'copy us':>9} {'add us':>9} {'both us':>9} {'both GB/s':>10} {'read GB/s':>10} "
          f"{'bound GB/s':>11}")
    for r in rows:
        t, g = r["median_s"], r["GBps"]
        print(f"{r['cores']:>5} {t['copy'] * 1e6:>9.1f} {t['add'] * 1e6:>9.1f} {t['copy+add'] * 1e6:>9.1f} "
              f"{g['copy+add']:>10.1f} {g['read']:>10.1f} {g['all-reduce bound']:>11.1f}")
    print("(bound: the all-reduce's payload over the CPU rank's time alone, before any handshake or PCIe copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
