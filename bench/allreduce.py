"""Micro-benchmark: one all-reduce between ranks of one host, as heterogeneous mode runs it.

    python bench/allreduce.py [--gpu-rank] [--cpu-ranks 1,3] [--sizes 8K,64K,2M,16M] [--iters 50]
                              [--out bench/out/allreduce.json]

For each entry of ``--cpu-ranks`` one group of spawned processes: rank 0 holds its tensor on
cuda:0 with ``--gpu-rank`` (the GPU machine), else on the CPU; the other ranks are CPU ranks. Each
rank gets its own cores (torch threads = its cores): with ``--gpu-rank`` as heterogeneous mode
splits them (``--cores plan``: rank 0 on the reserved cores, each CPU rank on its plan's cores;
on 16 cores with 1 CPU rank: 3 and 13), else (or ``--cores even``) in equal blocks. Measured in
the same run, on the same processes, fp32 tensors:
- ``gloo .cpu()``: the naive path (unpinned device-to-host copy, gloo, copy back) = baseline;
- ``gloo pinned``: HeteroCommunicator with HETERO_SHIM_COLLECTIVES=gloo (pinned staging + gloo);
- ``shm``: HeteroCommunicator with HETERO_SHIM_COLLECTIVES=shm (hetero_shim.collectives.shm;
  the GPU rank copies into the CUDA-registered segment, and its all-reduce waits on its CUDA
  stream: hetero_shim.collectives.gpu_stream);
- ``shm no fused`` (``--gpu-rank`` only): the same with HETERO_SHIM_SHM_FUSED_KERNEL=0 (with one
  CPU rank the GPU rank queues a copy, a flag write, a stream wait and an add instead of one fused
  kernel, hetero_shim.collectives.fused_kernel; with more CPU ranks it waits on the host);
- ``shm host waits`` (``--gpu-rank`` only): the same with HETERO_SHIM_SHM_STREAM_OPS=0 (the GPU
  rank's host thread waits for its copy and for the peers: the previous design);
- ``vLLM CPU SHM``: vLLM's own CPU communicator (its C++ shared-memory all-reduce), only when every
  rank is a CPU rank and vLLM's CPU kernels load (all-CPU heterogeneous mode uses it).
Every path is first checked for the right sum (fp32), the shm paths for every rank holding the
same bits of a random bf16 and fp16 sum, and for 200 back-to-back all-reduces with no synchronization in
between, each input computed from the previous result (what a model's layers do; up to 9 MiB, i.e.
three pieces). Times are rank 0's (the GPU rank with ``--gpu-rank``): median and 90th percentile
of ``--iters`` calls; GB/s = payload bytes / median.
The table is printed last; JSON has every row. Targets: 8 KiB <= 50 us, 16 MiB >= 20 GB/s.
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
BASELINE = "gloo .cpu()"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def human(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def timed(fn, iters: int, sync) -> list[float]:
    samples = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return samples


def ranks_label(world: int, gpu_rank: bool) -> str:
    return f"1 GPU+{world - 1} CPU" if gpu_rank else f"{world} CPU"


def add_group_options(parser) -> None:
    """The options every multi-rank all-reduce benchmark here shares: where rank 0 is, how many CPU ranks."""
    parser.add_argument("--gpu-rank", action="store_true", help="rank 0's tensors live on cuda:0")
    parser.add_argument("--cpu-ranks", default="1,3", help="CPU ranks beside rank 0, one group per entry")


def run_groups(worker, opts) -> list[tuple[int, dict]]:
    """One spawned group per entry of ``opts.cpu_ranks`` (rank 0 and that many CPU ranks), in turn:
    ``worker(rank, world, init_file, opts, results_path)``; the group's rank 0 writes JSON to
    results_path. Returns (world, that JSON) per group."""
    import torch.multiprocessing as mp

    done = []
    for cpu_ranks in (int(c) for c in opts.cpu_ranks.split(",")):
        world = 1 + cpu_ranks
        with tempfile.TemporaryDirectory() as tmp:
            results_path = os.path.join(tmp, "rows.json")
            mp.spawn(worker, args=(world, os.path.join(tmp, "init"), opts, results_path), nprocs=world)
            done.append((world, json.loads(Path(results_path).read_text())))
    return done


def cores_for(rank: int, world: int, split: str = "even") -> list[int]:
    """The cores of ``rank``: ``even`` = equal blocks of the allowed cores; ``plan`` = as
    heterogeneous mode gives them with one GPU rank (rank 0: the reserved cores, shared in a real run
    with the engine core and the front end; ranks 1..: each CPU rank's own cores, ``plan.partition_cpus``)."""
    allowed = sorted(os.sched_getaffinity(0))
    if split == "plan":
        from hetero_shim.planning import build, node
        from hetero_shim.planning.plan import partition_cpus

        lists, reserved, _ = partition_cpus(node.one_per_core(node.allowed_cpus()), world - 1,
                                            reserve=build.cores_to_reserve(1))
        return (reserved or allowed) if rank == 0 else lists[rank - 1]
    if len(allowed) < world:
        return [allowed[rank % len(allowed)]]
    per = len(allowed) // world
    return allowed[rank * per:(rank + 1) * per]


def vllm_cpu_communicator(group):
    """vLLM's CPU communicator with its SHM all-reduce, or (None, why not)."""
    try:
        os.environ.setdefault("VLLM_DIST_IDENT", f"hsbench{os.getppid()}")
        import torch
        from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator, _CPUSHMDistributed
        from vllm.platforms import current_platform

        if current_platform.device_type != "cpu":
            return None, f"vLLM platform is {current_platform.device_type}"
        current_platform.import_kernels()
        comm = CpuCommunicator(cpu_group=group, device=torch.device("cpu"), device_group=group, unique_name="tp:0")
        if not isinstance(comm.dist_module, _CPUSHMDistributed):
            return None, "vLLM's CPU SHM all-reduce is not available here"
        return comm, None
    except Exception as e:  # the comparison is optional: say why it is missing
        return None, f"{type(e).__name__}: {e}"


def same_bits(reduce, rank: int, world: int, n: int, device, group, dtype) -> None:
    """Random 16-bit data: every rank (GPU or CPU) must hold the same bits, close to the exact sum."""
    import torch
    import torch.distributed as dist

    def data(q):
        return torch.randn(n, generator=torch.Generator().manual_seed(q)).to(dtype)

    got = reduce(data(rank).to(device)).cpu()
    everyone = [torch.empty(2 * n, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(everyone, got.view(torch.uint8), group=group)
    assert all(torch.equal(e, everyone[0]) for e in everyone), f"ranks disagree on a {dtype} sum of {n} elements"
    exact = sum(data(q).double() for q in range(world))
    assert torch.allclose(got.double(), exact, rtol=0, atol=0.1), f"{dtype} sum of {n} elements is off"


def back_to_back(reduce, rank: int, world: int, n: int, device) -> None:
    """200 dependent all-reduces, alternating two sizes, nothing synchronized in between: exact results."""
    import torch

    base = [torch.arange(k, dtype=torch.float32, device=device) % 1000 for k in (n, max(1, n // 2 + 1))]
    x = [b + rank for b in base]
    ranks_sum = float(sum(range(world)))
    for i in range(200):
        k = i % 2
        y = reduce(x[k])  # = world * base + ranks_sum, exactly (small integers in fp32)
        x[k] = (y - ranks_sum) / world + rank  # = base + rank again, exactly (world is 2 or 4 here)
    for k in (0, 1):
        assert torch.equal(x[k].cpu(), (base[k] + rank).cpu()), f"back-to-back all-reduces of {n} elements went wrong"


def worker(rank: int, world: int, init_file: str, opts, results_path: str) -> None:
    every_rank = [cores_for(q, world, opts.cores) for q in range(world)]  # before this rank's mask narrows
    cores = every_rank[rank]
    os.sched_setaffinity(0, cores)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(len(cores))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from hetero_shim.collectives.communicator import HeteroCommunicator

    group = dist.new_group(list(range(world)), backend="gloo")
    use_gpu = opts.gpu_rank and rank == 0
    device = torch.device("cuda:0") if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if use_gpu else (lambda: None)
    pinned = HeteroCommunicator(cpu_group=group, device=device, device_group=group, collectives="gloo")
    shm = HeteroCommunicator(cpu_group=group, device=device, device_group=group, collectives="shm")
    paths = {BASELINE: None, "gloo pinned": pinned.all_reduce, "shm": shm.all_reduce}
    notes = {}
    extra = []
    if opts.gpu_rank:  # every rank builds them (a collective set-up); only rank 0's device differs
        from hetero_shim import settings

        with settings.environ_set({settings.SHM_FUSED_KERNEL: "0"}):
            unfused = HeteroCommunicator(cpu_group=group, device=device, device_group=group, collectives="shm")
        host_waits = HeteroCommunicator(cpu_group=group, device=device, device_group=group, collectives="shm",
                                        stream_ops=False)
        extra = [unfused, host_waits]
        paths["shm no fused"] = unfused.all_reduce
        paths["shm host waits"] = host_waits.all_reduce
    if use_gpu:
        notes = {"shm registered with CUDA": shm.shm.registered,
                 "shm stream-ordered": getattr(shm.shm, "stream_ordered", False),
                 "shm fused kernel": getattr(shm.shm, "fused_kernel", False),
                 "shm no fused: fused kernel": getattr(unfused.shm, "fused_kernel", False)}
    notes["shm slot bytes"] = shm.shm.slot
    if not opts.gpu_rank:
        vllm_comm, why = vllm_cpu_communicator(group)
        if vllm_comm is not None:
            paths["vLLM CPU SHM"] = vllm_comm.all_reduce
        else:
            notes["vLLM CPU SHM"] = f"not measured: {why}"
    rows = []
    for size in opts.sizes:
        n = size // 4
        check = torch.arange(n, dtype=torch.float32, device=device) % 1000 + rank
        want = (torch.arange(n, dtype=torch.float32) % 1000) * world + sum(range(world))
        x = torch.zeros(n, dtype=torch.float32, device=device)  # zeros stay zeros: no growing values

        def naive():
            host = x.cpu()
            dist.all_reduce(host, group=group)
            x.copy_(host)

        for name, reduce in paths.items():
            if name.startswith("shm"):
                for dtype in (torch.bfloat16, torch.float16):
                    same_bits(reduce, rank, world, n, device, group, dtype)
                back_to_back(reduce, rank, world, min(n, 9 << 18), device)  # up to 9 MiB: 3 pieces
            fn = naive if reduce is None else (lambda reduce=reduce: reduce(x))
            if reduce is not None:
                got = reduce(check.clone())
                assert torch.equal(got.cpu(), want), f"{name} gave a wrong sum at {size} bytes"
            timed(fn, 3, sync)  # warm-up
            dist.barrier(group=group)
            samples = sorted(timed(fn, opts.iters, sync))
            median = statistics.median(samples)
            rows.append({"world": world, "path": name, "bytes": size, "median_us": median * 1e6,
                         "p90_us": samples[int(0.9 * (len(samples) - 1))] * 1e6, "GBps": size / median / 1e9})
    if rank == 0:
        Path(results_path).write_text(json.dumps({"rows": rows, "notes": notes, "cores": cores,
                                                  "peer_cores": every_rank[1]}))
    dist.barrier(group=group)
    for comm in [shm, *extra]:
        comm.destroy()
    dist.destroy_process_group()


def print_table(rows: list[dict], opts) -> None:
    print(f"\nall-reduce, fp32, rank 0 {'on cuda:0' if opts.gpu_rank else 'on CPU'}, median of {opts.iters} calls")
    print(f"{'ranks':<12} {'size':>8}  {'path':<16} {'median us':>10} {'p90 us':>9} {'GB/s':>7} {'vs baseline':>12}")
    base = {(r["world"], r["bytes"]): r["median_us"] for r in rows if r["path"] == BASELINE}
    for r in rows:
        print(f"{ranks_label(r['world'], opts.gpu_rank):<12} {human(r['bytes']):>8}  {r['path']:<16} "
              f"{r['median_us']:>10.1f} {r['p90_us']:>9.1f} "
              f"{r['GBps']:>7.2f} {base[(r['world'], r['bytes'])] / r['median_us']:>11.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_group_options(parser)
    parser.add_argument("--sizes", default="8K,64K,2M,16M")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "allreduce.json"))
    parser.add_argument("--cores", choices=("plan", "even"), default=None,
                        help="plan: the GPU rank on the reserved cores and each CPU rank on its own cores, as "
                             "heterogeneous mode splits them (default with --gpu-rank); even: equal blocks "
                             "(default without it)")
    opts = parser.parse_args()
    opts.cores = opts.cores or ("plan" if opts.gpu_rank else "even")
    opts.sizes = [parse_size(s) for s in opts.sizes.split(",")]
    bad = [s for s in opts.sizes if s % 4 or s <= 0]
    if bad or opts.iters < 1:
        parser.error(f"sizes must be positive multiples of 4 bytes (fp32) and --iters >= 1; got sizes {bad}")
    rows, notes = [], {}
    for world, result in run_groups(worker, opts):
        rows += result["rows"]
        notes[f"world {world}"] = {**result["notes"], "rank 0 cores": result["cores"],
                                   "rank 1 cores": result["peer_cores"]}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from hetero_shim import settings

    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv,
            "gpu_rank": opts.gpu_rank, "cores": opts.cores, "iters": opts.iters, "cpus": len(os.sched_getaffinity(0)),
            "shm_slot_setting": settings.shm_slot_bytes(), "notes": notes}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    for world, info in notes.items():
        print(f"{world}: " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"(JSON: {out})")
    print_table(rows, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
