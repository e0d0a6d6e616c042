"""Micro-benchmark: one all-reduce between two ranks, as heterogeneous mode runs it.

    python bench/allreduce.py [--gpu-rank] [--sizes 8K,64K,2M,16M] [--iters 50] [--out bench/out/allreduce.json]

Rank 0 holds its tensor on the GPU with ``--gpu-rank`` (the GPU machine), else on the CPU;
rank 1 is a CPU rank. Measured in the same run, on the same process group:
- ``gloo .cpu()``: the naive path (unpinned device-to-host copy, gloo, copy back) = baseline;
- ``HeteroCommunicator``: what the shim uses (pinned staging buffers, gloo on the CPU group).
Prints a table (median microseconds and effective GB/s of the payload) and writes JSON.
Issue 4's targets: 8 KiB <= 50 us, 16 MiB >= 20 GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def timed(fn, iters: int, sync) -> list[float]:
    samples = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return samples


def worker(rank: int, init_file: str, opts, results_path: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from hetero_shim.comm import HeteroCommunicator

    group = dist.new_group([0, 1], backend="gloo")
    use_gpu = opts.gpu_rank and rank == 0
    device = torch.device("cuda:0") if use_gpu else torch.device("cpu")
    sync = torch.cuda.synchronize if use_gpu else (lambda: None)
    comm = HeteroCommunicator(cpu_group=group, device=device, device_group=group)
    rows = []
    for size in opts.sizes:
        x = torch.ones(size // 4, dtype=torch.float32, device=device)

        def naive():
            host = x.cpu()
            dist.all_reduce(host, group=group)
            x.copy_(host)

        def hetero():
            comm.all_reduce(x)

        for name, fn in (("gloo .cpu()", naive), ("HeteroCommunicator", hetero)):
            timed(fn, 3, sync)  # warm-up
            dist.barrier(group=group)
            median = statistics.median(timed(fn, opts.iters, sync))
            rows.append({"path": name, "bytes": size, "median_us": median * 1e6, "GBps": size / median / 1e9})
    if rank == 0:
        Path(results_path).write_text(json.dumps(rows))
    dist.barrier(group=group)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-rank", action="store_true", help="rank 0's tensors live on cuda:0")
    parser.add_argument("--sizes", default="8K,64K,2M,16M")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "allreduce.json"))
    opts = parser.parse_args()
    opts.sizes = [parse_size(s) for s in opts.sizes.split(",")]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        results_path = os.path.join(tmp, "rows.json")
        mp.spawn(worker, args=(os.path.join(tmp, "init"), opts, results_path), nprocs=2)
        rows = json.loads(Path(results_path).read_text())
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv,
            "gpu_rank": opts.gpu_rank, "iters": opts.iters}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nall-reduce, 2 ranks ({'GPU + CPU' if opts.gpu_rank else 'CPU + CPU'}), median of {opts.iters}")
    print(f"{'bytes':>10}  {'path':<20} {'median us':>10} {'GB/s':>8}  {'vs baseline':>11}")
    base = {r["bytes"]: r["median_us"] for r in rows if r["path"] == "gloo .cpu()"}
    for r in rows:
        print(f"{r['bytes']:>10}  {r['path']:<20} {r['median_us']:>10.1f} {r['GBps']:>8.2f}  "
              f"{base[r['bytes']] / r['median_us']:>10.2f}x")
    print(f"(JSON: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
