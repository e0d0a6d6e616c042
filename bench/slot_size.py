"""Which shared-memory slot size makes large all-reduces fastest, by group size (no vLLM needed).

    python bench/slot_size.py [--gpu-rank] [--cpu-ranks 1,3] [--slots 4,8,16] [--sizes 2M,16M,64M]
                              [--dtype fp32] [--rounds 3] [--iters 20] [--out OUT.json]

Why: the slot (``HETERO_SHIM_SHM_SLOT_MB``) is how much of a tensor one operation of
``hetero_shim.shm_collectives`` moves; larger tensors go in slot-sized pieces. Run 17 measured
8 MiB faster than the default 4 MiB at 16 MiB between one GPU and one CPU rank, in separate
processes of one noisy machine, and never with more CPU ranks. Here every slot size is its own
shared-memory group *in the same processes* (``shm_collectives.for_group(slot=...)``, what
``HeteroCommunicator`` builds), each first checked for exact fp32 sums (also at a size that is not
a multiple of the slot) and for 200 back-to-back dependent all-reduces; then the sizes are timed in
``--rounds`` rounds, the slot order rotated every round, so drift of the machine hits every slot
alike (``--dtype``: the timed tensors' type; the checks are fp32). Cores as heterogeneous mode
splits them with ``--gpu-rank`` (``bench/allreduce.py --cores plan``), equal blocks otherwise.
Times are rank 0's, median of all rounds' calls; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.allreduce import (add_group_options, back_to_back, cores_for, human, parse_size,  # noqa: E402
                             ranks_label, run_groups, timed)

MIB = 1 << 20
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # names of torch types (torch is imported in the ranks only)


def worker(rank: int, world: int, init: str, opts, results: str) -> None:
    every = [cores_for(q, world, "plan" if opts.gpu_rank else "even") for q in range(world)]
    os.sched_setaffinity(0, every[rank])
    import torch
    import torch.distributed as dist

    torch.set_num_threads(len(every[rank]))
    dtype = getattr(torch, DTYPES[opts.dtype])
    from hetero_shim import shm_collectives as shm

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)), backend="gloo")
    gpu = opts.gpu_rank and rank == 0
    device = torch.device("cuda:0" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    comms = {s: shm.for_group(group, list(range(world)), rank, world, device, mode="shm", slot=s * MIB,
                              timeout_s=60) for s in opts.slots}
    for slot, comm in comms.items():
        for n in sorted({s // 4 for s in opts.sizes} | {slot * MIB // 4 + 1}):
            got = comm.all_reduce(torch.arange(n, dtype=torch.float32, device=device) % 1000 + rank)
            want = (torch.arange(n, dtype=torch.float32) % 1000) * world + sum(range(world))
            assert torch.equal(got.cpu(), want), f"slot {slot} MiB: wrong sum of {n} fp32"
        back_to_back(comm.all_reduce, rank, world, min(max(opts.sizes) // 4, 3 * slot * MIB // 4), device)
    samples: dict = {}
    for size in opts.sizes:
        x = torch.zeros(size // dtype.itemsize, dtype=dtype, device=device)
        for r in range(opts.rounds):
            for k in range(len(opts.slots)):
                slot = opts.slots[(k + r) % len(opts.slots)]
                comm = comms[slot]
                timed(lambda: comm.all_reduce(x), 2, sync)  # warm-up
                dist.barrier(group=group)
                got = timed(lambda: comm.all_reduce(x), opts.iters, sync)
                samples.setdefault(f"{size}/{slot}", []).append(got)
    if rank == 0:
        Path(results).write_text(json.dumps({"samples": samples, "cores": every[0], "peer_cores": every[1],
                                             "registered": [c.registered for c in comms.values()]}))
    dist.barrier(group=group)
    for comm in comms.values():
        comm.close()
    dist.destroy_process_group()


def summarize(world: int, samples: dict) -> list[dict]:
    rows = []
    for key, rounds in samples.items():
        size, slot = (int(v) for v in key.split("/"))
        every = [s for one in rounds for s in one]
        median = statistics.median(every)
        rows.append({"world": world, "bytes": size, "slot_mib": slot, "median_us": median * 1e6,
                     "round_medians_us": [statistics.median(one) * 1e6 for one in rounds], "GBps": size / median / 1e9})
    return rows


def print_table(rows: list[dict], gpu_rank: bool, dtype: str) -> None:
    print(f"\nall-reduce, {dtype}, rank 0 {'on cuda:0' if gpu_rank else 'on CPU'}; median over all rounds "
          "(per-round medians in brackets); vs = this slot's time / the fastest slot's at that size")
    print(f"{'ranks':<12} {'size':>8} {'slot':>7} {'median us':>10} {'GB/s':>7} {'vs':>6}  rounds")
    best = {}
    for r in rows:
        key = (r["world"], r["bytes"])
        best[key] = min(best.get(key, float("inf")), r["median_us"])
    for r in rows:
        rounds = ", ".join(f"{v:.0f}" for v in r["round_medians_us"])
        print(f"{ranks_label(r['world'], gpu_rank):<12} {human(r['bytes']):>8} {r['slot_mib']:>4} MiB "
              f"{r['median_us']:>10.1f} {r['GBps']:>7.2f} {r['median_us'] / best[(r['world'], r['bytes'])]:>5.2f}x  "
              f"[{rounds}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_group_options(parser)
    parser.add_argument("--slots", default="4,8,16", help="slot sizes in MiB (whole numbers)")
    parser.add_argument("--sizes", default="2M,16M,64M")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "slot_size.json"))
    opts = parser.parse_args()
    opts.slots = [int(s) for s in opts.slots.split(",")]
    opts.sizes = [parse_size(s) for s in opts.sizes.split(",")]
    if any(s <= 0 for s in opts.slots) or any(s <= 0 or s % 4 for s in opts.sizes) or min(opts.rounds, opts.iters) < 1:
        parser.error("slots must be positive MiB, sizes positive multiples of 4 bytes, --rounds and --iters >= 1")
    rows, notes = [], {}
    for world, result in run_groups(worker, opts):
        rows += summarize(world, result["samples"])
        notes[f"world {world}"] = {"rank 0 cores": result["cores"], "rank 1 cores": result["peer_cores"],
                                   "registered with CUDA": result["registered"]}
    shm_free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv, "gpu_rank": opts.gpu_rank,
            "dtype": opts.dtype, "rounds": opts.rounds, "iters": opts.iters, "cpus": len(os.sched_getaffinity(0)),
            "dev_shm_free_bytes": shm_free, "notes": notes}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    for world, info in notes.items():
        print(f"{world}: " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"/dev/shm free: {shm_free} bytes (JSON: {out})")
    print_table(rows, opts.gpu_rank, opts.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
