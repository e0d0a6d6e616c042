"""HeteroCommunicator on two real gloo processes, through gloo and through shared memory (CPU
tensors here; on the GPU machine the GPU rank's CUDA tensors cross through pinned or registered host
memory, checked by tests/gpu/ and bench/allreduce.py --gpu-rank)."""

import textwrap

import pytest

import procs

SCRIPT = textwrap.dedent(
    """
    import os, sys, tempfile, torch, torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, init_file, mode):
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        from hetero_shim.collectives.communicator import HeteroCommunicator, local_only
        comm = HeteroCommunicator(cpu_group=dist.group.WORLD, device=torch.device("cpu"),
                                  device_group=dist.group.WORLD, collectives=mode)
        assert (comm.shm is None) == (mode == "gloo"), (mode, comm.shm)
        assert torch.equal(comm.all_reduce(torch.full((2, 3), rank + 1.0)), torch.full((2, 3), 3.0))
        last = comm.all_gather(torch.full((2, 1), float(rank)), dim=-1)
        assert last.tolist() == [[0.0, 1.0], [0.0, 1.0]], last
        first = comm.all_gather(torch.full((1, 2), float(rank)), dim=0)
        assert first.tolist() == [[0.0, 0.0], [1.0, 1.0]], first
        got = comm.gather(torch.tensor([float(rank)]), dst=0, dim=0)
        assert (got.tolist() == [0.0, 1.0]) if rank == 0 else got is None
        part = comm.reduce_scatter(torch.arange(4.0), dim=0)
        assert part.tolist() == ([0.0, 2.0] if rank == 0 else [4.0, 6.0]), part
        ids = torch.tensor([[7 if rank == 0 else 9]], dtype=torch.int32)
        comm.broadcast(ids, src=0)
        assert ids.item() == 7
        if rank == 1:  # a warm-up pass on one rank only: no partner, must not communicate
            with local_only():
                assert torch.equal(comm.all_reduce(torch.ones(2)), torch.ones(2))
                assert comm.all_gather(torch.ones(1, 2), dim=0).shape == (2, 2)
        dist.barrier()
        comm.destroy()
        print(f"RANK{rank} OK", flush=True)
        dist.barrier()
        # not dist.destroy_process_group(): in one CI run (of 5c690c2) gloo's teardown aborted
        # ("terminate called without an active exception") after both ranks had printed OK;
        # what this test checks is done, so leave without torch's teardown
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(worker, args=(tempfile.mktemp(), sys.argv[1]), nprocs=2)
    """
)


@pytest.mark.parametrize("mode", ["gloo", "auto"])
def test_collectives_on_two_gloo_ranks(tmp_path, mode):
    """``auto`` takes shared memory here (both ranks on this host)."""
    script = tmp_path / "comm_check.py"
    script.write_text(SCRIPT)
    proc = procs.run_python([str(script), mode], timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "RANK0 OK" in proc.stdout and "RANK1 OK" in proc.stdout
