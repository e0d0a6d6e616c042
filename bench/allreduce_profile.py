"""Where a small GPU<->CPU shared-memory all-reduce spends its time (one GPU rank + one CPU rank).

    python bench/allreduce_profile.py [--bytes 8192] [--iters 2000] [--out OUT.json]

Rank 0 on cuda:0, rank 1 on the CPU (the cores split in equal halves, as ``bench/allreduce.py
--cores even``), fp32. Per operation,
averaged over ``--iters`` (after 50 warm-up calls):
- ``launch floor`` (rank 0 alone): the GPU rank's device work of one all-reduce without any peer:
  copy into the registered segment, copy back, add (queued back to back, one synchronize at the end);
- ``fused kernel`` / ``4 stream ops`` / ``host waits``: the all-reduce (stream-ordered with one
  fused kernel, stream-ordered with a copy, a flag write, a stream wait and an add, or waiting on
  the host), back to back with one synchronize at the end
  (throughput: what a model's layers see) and with a synchronize after each call (latency: what
  bench/allreduce.py reports);
- rank 1: its time per call outside waiting for the GPU rank (its own Python and copies);
- ``step: ...`` (rank 0 alone): the host cost of each call the stream-ordered all-reduce makes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.allreduce import cores_for  # noqa: E402  (its even split, as in the runs recorded so far)


def statement_costs(comm, x, iters: int) -> dict:
    """Microseconds per call of each step a GPU rank's stream-ordered all-reduce queues (GPU rank alone)."""
    import torch

    from hetero_shim.shm_collectives import FLAG_STRIDE

    n = x.numel()
    mine, peer = comm._data(0, x.dtype, 0, n), comm._data(0, x.dtype, n, n)
    pinned = torch.empty(n, dtype=x.dtype, pin_memory=True)
    flag = comm._address(0, 1)  # the "reduced" flag: 2-rank all-reduces never use it
    area = comm._base + comm._area_offset(0) if getattr(comm, "fused_kernel", False) else 0  # buffer 0's pieces (device)
    handle = torch.cuda.current_stream().cuda_stream
    out = torch.empty_like(x)
    steps = {
        "torch.cuda.current_stream()": lambda: torch.cuda.current_stream(),
        "torch._C._cuda_getCurrentRawStream": lambda: torch._C._cuda_getCurrentRawStream(0),
        "torch.empty_like": lambda: torch.empty_like(x),
        "x.contiguous().view(-1)": lambda: x.contiguous().view(-1),
        "D2H copy_ into the registered segment": lambda: mine.copy_(x, non_blocking=True),
        "D2H copy_ into a torch pinned tensor": lambda: pinned.copy_(x, non_blocking=True),
        "H2D copy_ from the registered segment": lambda: out.copy_(peer, non_blocking=True),
        "add_ (device)": lambda: out.add_(x),
        "torch.add reading the segment (zero copy)": lambda: torch.add(x, comm._device_data(0, x.dtype, n, n), out=out),
        "cuStreamWriteValue64 (ctypes)": lambda: comm._ops.write(handle, flag, 0),
        "cuStreamWaitValue64, met (ctypes)": lambda: comm._ops.wait_at_least(handle, flag, 0),
        # seq 0 with the "reduced" slots as the flags: its wait is met, and no arrive flag is touched
        "fused kernel, wait met (ctypes launch)": lambda: comm._fused.launch(handle, x, out, area, flag, flag, 0, 0, 2,
                                                                           FLAG_STRIDE // 8),
        "comm._check_signatures": lambda: comm._check_signatures(comm._seq, comm._signature(1, x.dtype, n * 4), "x"),
    }
    costs = {}
    for name, fn in steps.items():
        for reps in (50, iters):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        costs[f"step: {name}"] = {"per_call_us": elapsed / iters * 1e6}
    return costs


def worker(rank: int, init: str, opts, out: str) -> None:
    os.sched_setaffinity(0, cores_for(rank, 2))
    import torch
    import torch.distributed as dist

    from hetero_shim import settings
    from hetero_shim import shm_collectives as shm

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    group = dist.new_group([0, 1], backend="gloo")
    gpu = rank == 0
    device = torch.device("cuda:0" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    n = opts.bytes // 4
    rows, notes = {}, {}
    waited = [0.0]
    for name, stream_ops, fused in (("fused kernel", True, "1"), ("4 stream ops", True, "0"),
                                    ("host waits", False, "0")):
        with settings.environ_set({settings.SHM_FUSED_KERNEL: fused}):
            comm = shm.for_group(group, [0, 1], rank, 2, device, mode="shm", stream_ops=stream_ops)
        inner = comm._wait

        def timed_wait(*a, inner=inner, **k):
            t = time.perf_counter()
            inner(*a, **k)
            waited[0] += time.perf_counter() - t

        comm._wait = timed_wait
        x = torch.zeros(n, device=device)
        for mode in ("back to back", "synchronize each"):
            for _ in range(50):
                comm.all_reduce(x)
            comm.settle()
            sync()
            dist.barrier(group=group)
            waited[0] = 0.0
            start = time.perf_counter()
            for _ in range(opts.iters):
                comm.all_reduce(x)
                if mode == "synchronize each":
                    sync()
            comm.settle()
            sync()
            total = time.perf_counter() - start
            rows[f"{name}, {mode}"] = {"per_call_us": total / opts.iters * 1e6,
                                       "outside_waits_us": (total - waited[0]) / opts.iters * 1e6}
        comm.settle()
        dist.barrier(group=group)
        # the steps address two pieces of n elements in one data area: only up to half the area
        fits = 2 * x.numel() * x.element_size() <= comm.world * comm.slot
        if gpu and fused == "1" and getattr(comm, "fused_kernel", False) and fits:
            rows.update(statement_costs(comm, x, opts.iters))
        if gpu:
            notes[name] = f"fused kernel loaded: {getattr(comm, 'fused_kernel', False)}"
        dist.barrier(group=group)
        comm.close()
    if gpu:
        host = torch.empty(2 * n, dtype=torch.float32, pin_memory=True)
        x, y = torch.zeros(n, device=device), torch.zeros(n, device=device)
        for reps in (50, opts.iters):
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                host[:n].copy_(x, non_blocking=True)
                y.copy_(host[n:], non_blocking=True)
                y.add_(x)
            sync()
        rows["launch floor (GPU rank alone)"] = {"per_call_us": (time.perf_counter() - start) / opts.iters * 1e6}
    every = [None, None]
    dist.all_gather_object(every, rows, group=group)
    if rank == 0:
        Path(out).write_text(json.dumps({"gpu_rank": every[0], "cpu_rank": every[1], "notes": notes}))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--out", default="bench/out/allreduce_profile.json")
    opts = parser.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "rows.json")
        mp.spawn(worker, args=(os.path.join(tmp, "init"), opts, result_path), nprocs=2)
        result = json.loads(Path(result_path).read_text())
    result["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv,
                      "bytes": opts.bytes, "iters": opts.iters}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=1))
    print("; ".join(f"{k}: {v}" for k, v in result["notes"].items()))
    print(f"{opts.bytes} bytes fp32, 1 GPU rank + 1 CPU rank, {opts.iters} calls (microseconds per call)")
    print(f"{'what':<42} {'GPU rank':>9} {'its own work':>13} {'CPU rank':>9} {'its own work':>13}")
    for key, g in result["gpu_rank"].items():
        c = result["cpu_rank"].get(key, {})
        print(f"{key:<42} {g['per_call_us']:>9.1f} {g.get('outside_waits_us', float('nan')):>13.1f} "
              f"{c.get('per_call_us', float('nan')):>9.1f} {c.get('outside_waits_us', float('nan')):>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
