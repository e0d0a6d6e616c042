"""Worker script for test_shm_collectives.py: N real processes, torch.distributed gloo, shared-memory collectives.

    python shm_check.py WORLD SCENARIO

Scenarios: ``exact`` (results checked bit for bit against the same additions done locally and, for
integer-valued data, against gloo), ``stuck`` (the last rank never calls: the others must raise a
clear error within the deadline), ``killed`` (the last rank exits during a collective: named
within a second). Every rank prints ``RANK<r> OK`` or ``RANK<r> ERROR <message>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hetero_shim.collectives import factory, shm, shm_segment
from hetero_shim.errors import HeteroConfigError

SLOT = 16 << 10  # small slots: pieces and chunked reductions are exercised at small sizes
CHUNKED_MIN = 4 << 10


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: lines of concurrent ranks do not interleave


def inputs(rank: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(n, generator=gen).to(dtype)


def expected_sum(world: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The documented result, piece by piece: in-rank-order additions (2 ranks, small pieces),
    torch.sum over the ranks (chunked pieces)."""
    parts = torch.stack([inputs(q, n, dtype, seed) for q in range(world)])
    out = torch.empty(n, dtype=dtype)
    per_piece = SLOT // dtype.itemsize
    for p0 in range(0, n, per_piece):
        p1 = min(n, p0 + per_piece)
        if world == 2 or (p1 - p0) * dtype.itemsize < CHUNKED_MIN:
            acc = parts[0, p0:p1] + parts[1, p0:p1]
            for q in range(2, world):
                acc += parts[q, p0:p1]
        else:
            acc = parts[:, p0:p1].sum(0, dtype=dtype)
        out[p0:p1] = acc
    return out


def exact_sum(world: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return sum(inputs(q, n, dtype, seed).double() for q in range(world))


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 0.01, torch.int32: 0}


def same_on_every_rank(t: torch.Tensor, group) -> bool:
    everyone = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, t.contiguous(), group=group)
    return all(torch.equal(e.view(torch.uint8) if e.dtype == torch.bool else e, t) for e in everyone)


def check_other_host(rank: int, world: int) -> None:
    """A rank that reports another host: ``auto`` falls back to gloo everywhere, ``shm`` is refused everywhere."""
    real = shm_segment.host_identity
    if rank == world - 1:
        shm_segment.host_identity = lambda: "elsewhere/0"
    try:
        assert factory.for_group(dist.group.WORLD, list(range(world)), rank, world, torch.device("cpu"), mode="auto") is None
        try:
            factory.for_group(dist.group.WORLD, list(range(world)), rank, world, torch.device("cpu"), mode="shm")
            raise AssertionError("shm was forced across hosts without an error")
        except HeteroConfigError as e:
            assert "HETERO_SHIM_COLLECTIVES=shm, but shared-memory collectives cannot be used: ranks are on 2 hosts" in str(e), e
    finally:
        shm_segment.host_identity = real


def check_exact(rank: int, world: int) -> None:
    check_other_host(rank, world)
    group = dist.group.WORLD
    cpu = torch.device("cpu")
    # rank 0 is not a reducer: the GPU rank's role (contributes, sums no chunk), exercised on the CPU
    comm = factory.for_group(group, list(range(world)), rank, world, cpu, mode="shm", slot=SLOT, timeout_s=60,
                         reducer=rank != 0, label="check", chunked_min_bytes=CHUNKED_MIN)
    assert comm is not None
    # a second, concurrent group on the same ranks: its own segment, interleaved calls
    other = factory.for_group(dist.new_group(list(range(world)), backend="gloo"), list(range(world)), rank, world, cpu,
                          mode="shm", slot=4096, timeout_s=60, label="other")
    seed = 0
    sizes = [1, 7, 1000, 1023, 2049, SLOT // 4, SLOT // 4 + 3, 3 * SLOT // 2 + 5, 5 * SLOT]  # elements
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int32):
        for n in sizes:
            for _repeat in range(2):
                seed += 1
                x = inputs(rank, n, dtype, seed)
                got = comm.all_reduce(x)
                want = expected_sum(world, n, dtype, seed)
                assert got is x, "CPU all_reduce is in place"
                assert torch.equal(got, want), (dtype, n, (got - want).abs().max())
                assert torch.allclose(got.double(), exact_sum(world, n, dtype, seed), rtol=0, atol=TOLERANCE[dtype])
                assert same_on_every_rank(got, group), (dtype, n)
                y = inputs(rank, n, dtype, seed).round()  # integer-valued: any summation order is exact
                z = y.clone()
                dist.all_reduce(z, group=group)
                assert torch.equal(other.all_reduce(y), z), ("vs gloo", dtype, n)
    # 2-d, non-contiguous and dim variants
    base = torch.arange(6 * 5, dtype=torch.float32).view(6, 5) * (rank + 1)
    t = base.t()  # non-contiguous
    got = comm.all_reduce(t)
    assert got is t and torch.equal(t, (torch.arange(30.0).view(6, 5) * sum(range(1, world + 1))).t())
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        for shape, dim in (((3, 4), -1), ((3, 4), 0), ((2, 3, 5), 1), ((SLOT // 4 + 1,), 0), ((2, SLOT // 8 + 3), -1)):
            x = (torch.arange(torch.Size(shape).numel()).view(shape) + 1000 * rank).to(dtype)
            got = comm.all_gather(x, dim)
            parts = [(torch.arange(x.numel()).view(shape) + 1000 * q).to(dtype) for q in range(world)]
            assert torch.equal(got, torch.cat(parts, dim)), (dtype, shape, dim)
    for src in range(world):
        for n in (1, 33, 3 * world * SLOT // 4 + 11):
            x = torch.full((n,), float(rank)) if rank != src else torch.arange(n, dtype=torch.float32)
            assert comm.broadcast(x, src) is x and torch.equal(x, torch.arange(n, dtype=torch.float32)), (src, n)
    ids = torch.tensor([[7 if rank == 0 else 9]], dtype=torch.int32)
    other.broadcast(ids, 0)
    assert ids.item() == 7
    # no slot given and HETERO_SHIM_SHM_SLOT_MB unset (test_shm_collectives runs this without it): the
    # group-size default, taken from rank 0, while /dev/shm has room for twice the segment
    os.environ.pop("HETERO_SHIM_SHM_SLOT_MB", None)
    default = factory.for_group(dist.new_group(list(range(world)), backend="gloo"), list(range(world)), rank, world, cpu,
                            mode="shm", timeout_s=60, label="default")
    assert default.slot == {2: 16 << 20}.get(world, 8 << 20), default.slot
    base = torch.arange(5 * (default.slot // 4) // 2 + 1, dtype=torch.float32) % 1000  # 2.5 slots: three pieces
    assert torch.equal(default.all_reduce(base + rank), base * world + sum(range(world)))
    default.close()
    # mismatched calls are named, not mixed
    try:
        if rank == 0:
            comm.broadcast(torch.zeros(4), 0)
        else:
            comm.all_reduce(torch.zeros(4))
        raise AssertionError("mismatched collectives were not detected")
    except shm.ShmCollectiveError as e:
        assert "called different collectives" in str(e), e
    comm.close()
    other.close()
    with open("/proc/self/maps") as f:
        mapped = [line for line in f if shm_segment.PREFIX in line]
    assert not mapped, f"segments still mapped after close(): {mapped}"


def check_stuck(rank: int, world: int) -> None:
    group = dist.group.WORLD
    comm = factory.for_group(group, list(range(world)), rank, world, torch.device("cpu"), mode="shm", timeout_s=3)
    assert comm is not None
    comm.all_reduce(torch.ones(8))
    if rank == world - 1:
        time.sleep(8)  # alive, but never calls the next collective
        return
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(8))
        raise AssertionError("no error although a rank never arrived")
    except shm.ShmCollectiveError as e:
        took = time.monotonic() - start
        assert f"group rank(s) [{world - 1}] did not arrive within 3 s" in str(e), e
        assert 2.9 < took < 6, took
        say(f"RANK{rank} MESSAGE {e}")
    try:
        comm.all_reduce(torch.ones(8))
        raise AssertionError("a broken communicator was used again")
    except shm.ShmCollectiveError as e:
        assert "unusable after an earlier error" in str(e), e


def check_killed(rank: int, world: int) -> None:
    group = dist.group.WORLD
    comm = factory.for_group(group, list(range(world)), rank, world, torch.device("cpu"), mode="shm", timeout_s=120)
    assert comm is not None
    comm.all_reduce(torch.ones(8))
    if rank == world - 1:
        time.sleep(0.5)
        os._exit(3)  # dies without calling the next collective
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(8))
        raise AssertionError("no error although a rank exited")
    except shm.ShmCollectiveError as e:
        took = time.monotonic() - start
        assert f"group rank {world - 1} (pid " in str(e) and "died (the process exited before arriving)" in str(e), e
        assert took < 5, took
        say(f"RANK{rank} MESSAGE {e}")


def worker(rank: int, world: int, scenario: str, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        {"exact": check_exact, "stuck": check_stuck, "killed": check_killed}[scenario](rank, world)
    except BaseException as e:
        say(f"RANK{rank} ERROR {type(e).__name__}: {e}")
        os._exit(1)
    say(f"RANK{rank} OK")
    os._exit(0)  # no gloo teardown: in the failure scenarios a peer is gone


def main() -> int:
    world, scenario = int(sys.argv[1]), sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, world, scenario, os.path.join(tmp, "init"))) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    codes = [p.exitcode for p in procs]
    say(f"EXIT CODES {codes}")
    if scenario == "killed":
        return 0 if codes[:-1] == [0] * (world - 1) and codes[-1] == 3 else 1
    return 0 if codes == [0] * world else 1


if __name__ == "__main__":
    sys.exit(main())
