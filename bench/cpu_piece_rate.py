"""How fast a CPU rank does its part of a large 2-rank all-reduce, by the number of cores it has.

    python bench/cpu_piece_rate.py [--cores 8,13] [--bytes 16M] [--piece 4M] [--iters 30] [--out OUT.json]

Why: between one GPU rank and one CPU rank a 16 MiB all-reduce is bound by the CPU rank's work
(bench/README.md, "fourth session"): per slot-sized piece it copies its input into the segment
and adds the GPU rank's piece to its own (``ShmCollectives._all_reduce_piece``, 2 ranks). This
times exactly those two torch calls on fp32 pieces, alone, with the process pinned to the first
N allowed cores and N torch threads, for each N of ``--cores``; plus a plain read of 256 MiB (the
streaming rate). ``--segment`` says where the pieces go: private memory, a mapped /dev/shm file
as the real segment is, the same with huge pages advised, or (GPU) with PCIe copies running against
it as in the real all-reduce. One fresh process per case (torch's thread pool is sized once).
Prints a table, writes JSON.
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

from bench.allreduce import parse_size, timed  # noqa: E402


def median_s(fn, iters: int) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, iters, lambda: None))


def segment_of(kind: str, elements: int):
    """(the area the CPU rank copies into, its /dev/shm path or None): private memory (torch), or a
    mapped /dev/shm file as the real segment is (``shm``), optionally advised to use huge pages
    (``shm-huge``). The caller unlinks the path."""
    import mmap

    import torch

    if kind == "private":
        return torch.empty(elements), None
    path = f"/dev/shm/hetero_shim_rate_{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, elements * 4)
        mm = mmap.mmap(fd, elements * 4)
    finally:
        os.close(fd)
    if kind == "shm-huge":
        mm.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mm, dtype=torch.float32), path


DMA_LOOP = """
import mmap, os, sys, torch
path, k, parent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
mm = mmap.mmap(fd, os.fstat(fd).st_size)
seg = torch.frombuffer(mm, dtype=torch.float32)
cudart = torch.cuda.cudart()
assert cudart.cudaHostRegister(seg.data_ptr(), seg.numel() * 4, 0) == cudart.cudaError.success
dev, streams = torch.rand(k, device="cuda"), (torch.cuda.Stream(), torch.cuda.Stream())
print("dma running", flush=True)
while os.getppid() == parent:  # ends with its parent, however that ends
    with torch.cuda.stream(streams[0]):
        seg[k:2 * k].copy_(dev, non_blocking=True)
    with torch.cuda.stream(streams[1]):
        dev.copy_(seg[:k], non_blocking=True)
    torch.cuda.synchronize()
"""


def start_dma(path: str, k: int, cpus: list[int]):
    """``shm+dma``: another process (on ``cpus``) registers the segment with CUDA, as the GPU rank
    does, and copies pieces into the peer's area and out of this rank's over PCIe without pause,
    as a GPU rank does during the all-reduce. Returns the process (kill it when done)."""
    proc = subprocess.Popen([sys.executable, "-c", DMA_LOOP, path, str(k), str(os.getpid())], stdout=subprocess.PIPE,
                            text=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    assert proc.stdout.readline().strip() == "dma running", "the DMA process did not start"
    return proc


def time_pieces(src, segment, k: int, iters: int, gap_s: float) -> dict:
    """Median seconds of the CPU rank's copies of ``src`` into the segment in pieces of ``k``
    elements, of its adds of the peer's pieces, and of both in its order (copy, wait, add)."""
    import torch

    pieces = [(i, p0, min(k, src.numel() - p0)) for i, p0 in enumerate(range(0, src.numel(), k))]

    def put(i, p0, m):  # into this rank's area of buffer i % 2
        segment[2 * (i % 2) * k:][:m].copy_(src[p0:p0 + m])

    def add(i, p0, m):  # the peer's piece, read from its area of buffer i % 2, into this rank's tensor
        torch.add(src[p0:p0 + m], segment[(2 * (i % 2) + 1) * k:][:m], out=src[p0:p0 + m])

    def pause():  # the real rank spins on a flag between its copy and its add: its OpenMP threads idle
        until = time.perf_counter() + gap_s
        while time.perf_counter() < until:
            pass

    def both():
        for piece in pieces:
            put(*piece)
            if gap_s:
                pause()
            add(*piece)

    return {"copy": median_s(lambda: [put(*piece) for piece in pieces], iters),
            "add": median_s(lambda: [add(*piece) for piece in pieces], iters),
            "copy+add": median_s(both, iters) - gap_s * len(pieces)}  # less the pauses it spun


def measure(cores: int, nbytes: int, piece: int, iters: int, kind: str = "private", gap_s: float = 0.0) -> dict:
    """In this process: pin to ``cores`` cores and time the CPU rank's per-piece work."""
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:cores])
    import torch

    torch.set_num_threads(cores)
    n, k = nbytes // 4, piece // 4
    src = torch.rand(n)
    segment, path = segment_of(kind.removesuffix("+dma"), 4 * k)  # two buffers of (this rank's piece, the peer's)
    dma = None
    try:
        segment.uniform_()  # (this also touches every page)
        if kind.endswith("+dma"):
            dma = start_dma(path, k, allowed[cores:] or allowed[-1:])
        t = time_pieces(src, segment, k, iters, gap_s)
        big = torch.rand(64 << 20)  # 256 MiB, read while the DMA (if any) still runs
        t["read 256 MiB"] = median_s(big.sum, max(3, iters // 5))
    finally:
        if dma is not None:
            dma.kill()
            dma.wait()
        if path:
            os.unlink(path)
    return {"cores": cores, "segment": kind, "bytes": nbytes, "piece": piece, "median_s": t,
            "GBps": {"copy": 2 * nbytes / t["copy"] / 1e9, "add": 3 * nbytes / t["add"] / 1e9,
                     "copy+add": 5 * nbytes / t["copy+add"] / 1e9, "read": big.numel() * 4 / t["read 256 MiB"] / 1e9,
                     "all-reduce bound": nbytes / t["copy+add"] / 1e9}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", default="8,13")
    parser.add_argument("--bytes", default="16M")
    parser.add_argument("--piece", default="4M")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--segment", default="private,shm,shm-huge",
                        help="where the pieces are copied to and the peer's are read from: private (torch memory), "
                             "shm (a mapped /dev/shm file, as the real segment), shm-huge (the same, MADV_HUGEPAGE), "
                             "shm+dma (needs a GPU: shm registered with CUDA, PCIe copies to and from it meanwhile)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "cpu_piece_rate.json"))
    parser.add_argument("--gap-us", type=float, default=0.0,
                        help="spin this long between each piece's copy and add (as the rank waits for its peer); "
                             "the spin is not counted in 'both'")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "CORES,KIND", measure in this process
    opts = parser.parse_args()
    nbytes, piece = parse_size(opts.bytes), parse_size(opts.piece)
    if opts.one:
        cores, kind = opts.one.split(",")
        print(json.dumps(measure(int(cores), nbytes, piece, opts.iters, kind, opts.gap_us * 1e-6)))
        return 0
    available = len(os.sched_getaffinity(0))
    rows = []
    for kind in opts.segment.split(","):
        for cores in (int(c) for c in opts.cores.split(",")):
            if cores > available:
                print(f"skipping {cores} cores: only {available} allowed")
                continue
            args = ["--one", f"{cores},{kind}", "--bytes", opts.bytes, "--piece", opts.piece, "--iters",
                    str(opts.iters), "--gap-us", str(opts.gap_us)]
            out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))
    print(f"\nCPU rank's work per {opts.bytes} all-reduce in {opts.piece} pieces, fp32 (median of {opts.iters}; "
          f"{opts.gap_us:g} us spun between copy and add); "
          "GB/s of memory traffic (copy 2x, add 3x, both 5x the bytes)")
    print(f"{'segment':<9} {'cores':>5} {'copy us':>9} {'add us':>9} {'both us':>9} {'both GB/s':>10} "
          f"{'read GB/s':>10} {'bound GB/s':>11}")
    for r in rows:
        t, g = r["median_s"], r["GBps"]
        print(f"{r['segment']:<9} {r['cores']:>5} {t['copy'] * 1e6:>9.1f} {t['add'] * 1e6:>9.1f} "
              f"{t['copy+add'] * 1e6:>9.1f} {g['copy+add']:>10.1f} {g['read']:>10.1f} {g['all-reduce bound']:>11.1f}")
    print("(bound: the all-reduce's payload over the CPU rank's time alone, before any handshake or PCIe copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
