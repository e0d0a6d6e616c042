"""All-CPU TP groups: rank 0's sampled token ids reach every rank through a sum all-reduce
(vLLM's CPU shared-memory path) in which the other ranks add zeros. The all-reduce here is a
fake that sums what every simulated rank passed, one thread per rank."""

import threading

import pytest

torch = pytest.importorskip("torch")

from hetero_shim.patches.per_step import sampling_sync  # noqa: E402


class FakeGroup:
    def __init__(self, rank: int, shared: dict):
        self.rank_in_group, self.shared = rank, shared

    def all_reduce(self, tensor):
        self.shared["inputs"][self.rank_in_group] = tensor.clone()
        self.shared["barrier"].wait()
        return sum(self.shared["inputs"].values())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_every_rank_ends_with_rank0_ids(dtype):
    own = [torch.tensor([[5], [128255], [0]], dtype=dtype), torch.tensor([[9], [1], [77]], dtype=dtype),
           torch.tensor([[3], [3], [3]], dtype=dtype)]
    shared = {"inputs": {}, "barrier": threading.Barrier(len(own))}
    expected = own[0].clone()
    threads = [threading.Thread(target=sampling_sync.broadcast_by_all_reduce, args=(FakeGroup(r, shared), own[r]))
               for r in range(len(own))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    for r, tokens in enumerate(own):
        assert tokens.dtype == dtype and torch.equal(tokens, expected), r  # in place, exact
    assert all(shared["inputs"][r].abs().sum() == 0 for r in (1, 2))  # the others add zeros
