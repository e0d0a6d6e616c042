"""The GPU rank's shared-memory all-reduce against CPU peers, every path (needs a GPU; no vLLM).

For each entry of --shm-cpu-ranks (default 1,3), spawned processes: group rank 0 on cuda:0, the
others on the CPU, meeting through ``hetero_shim.collectives.factory.for_group`` as heterogeneous mode
does. For each GPU-rank path (``fused kernel``: hetero_shim.collectives.fused_kernel; ``no fused``:
HETERO_SHIM_SHM_FUSED_KERNEL=0, i.e. four stream operations with one CPU rank, host waits with
more; ``64 KiB slots``: the default path with slots so small that most checks go through in
pieces, up to 256 of them per call; ``host waits``: HETERO_SHIM_SHM_STREAM_OPS=0) it checks:
- exact fp32 sums (small integers) at sizes that take each branch of the kernel: 1 and 3
  elements (no 16-byte vector), 8 KiB, 8 KiB + 4 bytes (vectors and a tail), 64 KiB, 256 KiB
  (32 blocks; with 3 CPU ranks already the chunked sums), 256 KiB + 4 bytes and 2 MiB (above the
  fused kernel: four operations with one CPU rank, host waits with three), 16 MiB + 4 bytes and
  32 MiB + 4 bytes (in pieces of the default slot, 16 MiB with one CPU rank and 8 MiB with three,
  the last of one element);
- a tensor at an address that is not 16-byte aligned, a 2-D tensor (shape kept), a strided one;
- bf16 and fp16 random data: every rank holds the same bits, close to the exact sum (8 KiB,
  256 KiB, 8 MiB + 2 bytes);
- 200 back-to-back dependent all-reduces with no synchronization between them (bench/allreduce.py),
  at 8 KiB, 256 KiB, 9 MiB and 36 MiB (three pieces of a 16 MiB slot, alternating with 18 MiB + 4
  bytes: two).
and that the fused kernel loaded on the GPU rank. Every check of every path runs (a failure is
recorded, the peers still make the same calls); the rows go to allreduce_rows.json.

``--cpu-dry-run`` runs the same checks with every rank on the CPU (tests/integration runs it so
on a machine without a GPU).
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path

import pytest

from bench.allreduce import back_to_back, cores_for, same_bits

pytestmark = [pytest.mark.no_vllm, pytest.mark.cpu_dry_run]

SIZES = [4, 12, 8 << 10, (8 << 10) + 4, 64 << 10, 256 << 10, (256 << 10) + 4, 2 << 20, (16 << 20) + 4,
         (32 << 20) + 4]
# name: (stream ops, HETERO_SHIM_SHM_FUSED_KERNEL, slot bytes or None: the default)
PATHS = {"fused kernel": (True, "1", None), "no fused": (True, "0", None), "64 KiB slots": (True, "1", 64 << 10),
         "host waits": (False, "0", None)}


def checks(comm, rank: int, world: int, device, group) -> list[tuple[str, object]]:
    import torch

    def exact(x_of_rank):
        got = comm.all_reduce(x_of_rank(rank))
        want = sum(x_of_rank(q).cpu() for q in range(world))
        assert got.shape == want.shape and torch.equal(got.cpu(), want), f"wrong sum, shape {tuple(want.shape)}"

    def ints(n, offset=0):
        return lambda q: (torch.arange(offset, offset + n, dtype=torch.float32, device=device) % 1000 + q)

    out = []
    for size in SIZES:
        out.append((f"fp32 exact, {size} bytes", lambda size=size: exact(ints(size // 4))))
    out.append(("fp32 exact, not 16-byte aligned", lambda: exact(lambda q: ints(2049)(q)[1:])))
    out.append(("fp32 exact, 2-D (8, 512)", lambda: exact(lambda q: ints(4096)(q).view(8, 512))))
    out.append(("fp32 exact, strided", lambda: exact(lambda q: ints(4096)(q)[::2])))
    for dtype in (torch.bfloat16, torch.float16):
        for size in (8 << 10, 256 << 10, (8 << 20) + 2):
            out.append((f"{str(dtype)[6:]} same bits, {size} bytes",
                        lambda dtype=dtype, size=size: same_bits(comm.all_reduce, rank, world, size // 2, device, group,
                                                                 dtype)))
    out.append(("200 back-to-back, 8 KiB", lambda: back_to_back(comm.all_reduce, rank, world, 2048, device)))
    out.append(("200 back-to-back, 256 KiB", lambda: back_to_back(comm.all_reduce, rank, world, 65536, device)))
    out.append(("200 back-to-back, 9 MiB", lambda: back_to_back(comm.all_reduce, rank, world, 9 << 18, device)))
    out.append(("200 back-to-back, 36 MiB", lambda: back_to_back(comm.all_reduce, rank, world, 9 << 20, device)))
    return out


def worker(rank: int, world: int, init: str, results: str, cpu_only: bool) -> None:
    """One rank of the group (spawned): every path, every check; rank 0 writes the rows."""
    os.sched_setaffinity(0, cores_for(rank, world))
    import torch
    import torch.distributed as dist

    from hetero_shim import settings
    from hetero_shim.collectives import factory, shm

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)), backend="gloo")
    device = torch.device("cuda:0" if rank == 0 and not cpu_only else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = []
    for path, (stream_ops, fused, slot) in PATHS.items():
        with settings.environ_set({settings.SHM_FUSED_KERNEL: fused}):
            comm = factory.for_group(group, list(range(world)), rank, world, device, mode="shm", stream_ops=stream_ops,
                                 timeout_s=30, slot=slot)
        loaded = getattr(comm, "fused_kernel", False)
        for name, check in checks(comm, rank, world, device, group):
            try:
                check()
                comm.settle()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ok, detail = True, ""
            except Exception as e:  # report, keep going: the peer still makes the same calls
                ok, detail = False, f"{type(e).__name__}: {e}"
                traceback.print_exc()
            rows.append({"world": world, "path": path, "check": name, "ok": ok, "detail": detail,
                         "fused_loaded": loaded})
        dist.barrier(group=group)
        comm.close()
    if rank == 0:
        Path(results).write_text(json.dumps(rows))
    dist.barrier(group=group)


def run_group(world: int, cpu_only: bool) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "rows.json")
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), results, cpu_only), nprocs=world)
        return json.loads(Path(results).read_text())


def test_gpu_rank_allreduce_every_path(gpu, evidence, shm_world):
    cpu_only = gpu.opts.cpu_dry_run
    rows = run_group(shm_world, cpu_only)
    evidence.save("allreduce_rows", rows)
    group = f"1 GPU+{shm_world - 1} CPU" + (" (CPU-only dry run)" if cpu_only else "")
    for path in PATHS:
        mine = [r for r in rows if r["path"] == path]
        failed = [f"{r['check']}: {r['detail']}" for r in mine if not r["ok"]]
        evidence.row(f"shm all-reduce {group}, {path}: every check exact", bool(mine) and not failed,
                     f"{len(mine) - len(failed)}/{len(mine)} passed" + ("; " + "; ".join(failed) if failed else ""))
    fused_used = cpu_only or all(r["fused_loaded"] for r in rows if r["path"] == "fused kernel")
    evidence.row(f"shm all-reduce {group}: fused kernel loaded on the GPU rank", fused_used,
                 "(CPU-only dry run)" if cpu_only else str(fused_used))
    evidence.check()
