"""Where a large all-reduce between one GPU rank and one CPU rank spends its time (needs a GPU; no vLLM).

    python bench/allreduce_pieces.py [--bytes 16M] [--iters 50] [--out OUT.json]

Rank 0 on cuda:0 and rank 1 on the CPU, cores split as heterogeneous mode splits them
(``bench/allreduce.py --cores plan``), meeting through ``shm_collectives.for_group``. Measured:
- PCIe alone (rank 0, before the group meets): one slot-sized copy into pinned host memory (as
  the registered segment is), one out of it, and both at once on two streams (medians of host
  time around each copy and a synchronize);
- the all-reduce of ``--bytes`` fp32 (slot: HETERO_SHIM_SHM_SLOT_MB, else the 2-rank default),
  each rank's host time per call split by method: CPU rank ``_put`` (its copy into the segment),
  ``_wait`` (for the GPU rank's flag) and the rest of ``_all_reduce_piece`` (its add); GPU rank
  ``_settle_conditions`` (waiting on the host for the CPU rank's flag) and the rest (queuing, and
  the final synchronize). Totals are per call, averaged over ``--iters``. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.allreduce import cores_for, parse_size, run_groups, timed  # noqa: E402


def clocked(cls, name: str, bucket: dict) -> None:
    """Add the host time spent in ``cls.name`` to ``bucket[name]``."""
    inner = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            bucket[name] += time.perf_counter() - start

    setattr(cls, name, wrapper)


def pcie(slot: int, iters: int) -> dict:
    import torch

    host = torch.empty(slot // 4, pin_memory=True)
    dev_a, dev_b = torch.rand(slot // 4, device="cuda"), torch.empty(slot // 4, device="cuda")
    host_b = torch.empty(slot // 4, pin_memory=True)
    side = torch.cuda.Stream()

    def median_us(fn) -> float:
        return statistics.median(timed(fn, iters, torch.cuda.synchronize)) * 1e6

    def both():
        with torch.cuda.stream(side):
            host.copy_(dev_a, non_blocking=True)
        dev_b.copy_(host_b, non_blocking=True)

    return {"to host us": median_us(lambda: host.copy_(dev_a, non_blocking=True)),
            "to device us": median_us(lambda: dev_b.copy_(host_b, non_blocking=True)),
            "both at once us": median_us(both)}


def worker(rank: int, world: int, init: str, opts, results: str) -> None:
    every = [cores_for(q, world, "plan") for q in range(world)]
    os.sched_setaffinity(0, every[rank])
    import torch
    import torch.distributed as dist

    torch.set_num_threads(len(every[rank]))
    from hetero_shim import shm_collectives as shm
    from hetero_shim.shm_gpu_stream import StreamOrderedShm

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)), backend="gloo")
    gpu = rank == 0
    device = torch.device("cuda:0" if gpu else "cpu")
    row: dict = {"rank": rank, "cores": every[rank]}
    if gpu:
        torch.cuda.set_device(device)
        row["pcie"] = pcie(shm.configured_slot(world, rank), opts.iters)
    bucket: dict = defaultdict(float)
    if gpu:
        clocked(StreamOrderedShm, "_settle_conditions", bucket)
    else:
        for name in ("_put", "_wait", "_all_reduce_piece"):
            clocked(shm.ShmCollectives, name, bucket)
    x = torch.zeros(opts.bytes // 4, device=device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    comm = shm.for_group(group, list(range(world)), rank, world, device, mode="shm", timeout_s=60)
    for _ in range(5):
        comm.all_reduce(x)
    sync()
    dist.barrier(group=group)
    bucket.clear()
    start = time.perf_counter()
    for _ in range(opts.iters):
        comm.all_reduce(x)
        sync()
    total = time.perf_counter() - start
    row["slot"] = comm.slot
    row["times"] = {"call us": total / opts.iters * 1e6, **{k: v / opts.iters * 1e6 for k, v in bucket.items()}}
    dist.barrier(group=group)
    comm.close()
    rows: list = [None] * world
    dist.all_gather_object(rows, row, group=group)
    if rank == 0:
        Path(results).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", default="16M")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "allreduce_pieces.json"))
    opts = parser.parse_args()
    opts.bytes, opts.cpu_ranks = parse_size(opts.bytes), "1"
    [(_, rows)] = run_groups(worker, opts)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))
    gpu, cpu = rows
    print(f"PCIe, one slot (rank 0): {json.dumps({k: round(v, 1) for k, v in gpu['pcie'].items()})}")
    print(f"\nall-reduce of {opts.bytes} bytes fp32, host time per call in us (GPU rank cores {gpu['cores']}, "
          f"CPU rank cores {cpu['cores']}, slot {gpu['slot']} bytes)")
    g, c = gpu["times"], cpu["times"]
    add = c.get("_all_reduce_piece", 0) - c.get("_put", 0) - c.get("_wait", 0)
    print(f"GPU call {g['call us']:.1f} (host waits for the CPU {g.get('_settle_conditions', 0):.1f}) | "
          f"CPU call {c['call us']:.1f}: put {c.get('_put', 0):.1f}, wait {c.get('_wait', 0):.1f}, "
          f"add and the rest {add:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
