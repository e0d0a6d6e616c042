"""The expert-id mapping of CPU ranks under expert parallelism (patches/per_step/expert_parallel.py),
on made-up routings: a rank keeps its own experts' weights under local ids, and the ranks' partial
outputs add up to the whole MoE's."""

import pytest

torch = pytest.importorskip("torch")

from hetero_shim import run_state  # noqa: E402
from hetero_shim.patches.per_step import expert_parallel as ep  # noqa: E402

EXPERTS, HIDDEN = 6, 8


def moe(x, topk_weights, topk_ids, weights):
    """A reference MoE: sum over a token's routed experts of weight x (x @ W_expert)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(topk_weights[t], topk_ids[t]):
            out[t] += w * (x[t] @ weights[int(e)])
    return out


def test_ranks_partial_outputs_add_up_to_the_whole_moe():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, HIDDEN, generator=gen)
    weights = torch.randn(EXPERTS, HIDDEN, HIDDEN, generator=gen)
    topk_ids = torch.randint(0, EXPERTS, (5, 2), generator=gen, dtype=torch.int32)
    topk_weights = torch.rand(5, 2, generator=gen)
    whole = moe(x, topk_weights, topk_ids, weights)
    total = torch.zeros_like(whole)
    for mine in (range(0, 3), range(3, 6)):  # two EP ranks, three experts each
        expert_map = torch.full((EXPERTS,), -1, dtype=torch.int32)
        expert_map[list(mine)] = torch.arange(len(mine), dtype=torch.int32)
        w, ids = ep.to_local(topk_weights, topk_ids, expert_map)
        assert ids.dtype == topk_ids.dtype and int(ids.min()) >= 0 and int(ids.max()) < len(mine)
        total += moe(x, w, ids, weights[list(mine)])  # the rank holds only its own experts
    torch.testing.assert_close(total, whole)


def test_routing_is_mapped_only_inside_a_call_with_an_expert_map(monkeypatch):
    monkeypatch.setattr(run_state, "heterogeneous", lambda: True)
    routed = (torch.tensor([[0.7, 0.3]]), torch.tensor([[4, 1]], dtype=torch.int64))
    expert_map = torch.tensor([-1, -1, -1, 0, 1, 2], dtype=torch.int32)
    params = ep.CALL_026

    def call(*args, **kwargs):  # stands for CPUFusedMOE.__call__: routes inside
        return ep.local_experts_of_routing(lambda: routed, None, (), {})

    outside = ep.local_experts_of_routing(lambda: routed, None, (), {})
    assert outside[1].tolist() == [[4, 1]] and outside[0].tolist() == [[pytest.approx(0.7), pytest.approx(0.3)]]
    args = (None,) * params.positions["expert_map"] + (expert_map,)
    weights, ids = ep.remember_expert_map(params)(call, None, args, {})
    assert ids.tolist() == [[1, 0]] and weights.tolist() == [[pytest.approx(0.7), 0.0]]
    weights, ids = ep.remember_expert_map(params)(call, None, (), {"expert_map": None})
    assert ids.tolist() == [[4, 1]]


def test_apply_handed_the_routing_gets_local_ids(monkeypatch):
    monkeypatch.setattr(run_state, "heterogeneous", lambda: True)
    seen = {}

    def apply(*args, **kwargs):
        seen["weights"] = ep.APPLY_030.get(args, kwargs, "topk_weights")
        seen["ids"] = ep.APPLY_030.get(args, kwargs, "topk_ids")

    args = [None] * 9
    args[4], args[5] = torch.tensor([[0.5, 0.5]]), torch.tensor([[2, 5]], dtype=torch.int32)
    args[8] = torch.tensor([0, 1, 2, -1, -1, -1], dtype=torch.int32)
    ep.local_experts_in_apply(apply, None, tuple(args), {})
    assert seen["ids"].tolist() == [[2, 0]] and seen["weights"].tolist() == [[0.5, 0.0]]
    monkeypatch.setattr(run_state, "heterogeneous", lambda: False)  # outside heterogeneous mode: untouched
    ep.local_experts_in_apply(apply, None, tuple(args), {})
    assert seen["ids"].tolist() == [[2, 5]]


def test_a_tokens_slots_keep_distinct_local_ids():
    """vLLM 0.26's pure-PyTorch CPU MoE counts a token's experts with scatter (duplicates count once)
    and then expects one output row per slot: with two of a token's slots on one local id it failed
    on the GPU machine (8191 rows for 8192 slots). Every token's ids stay distinct, own slots keep
    their expert, other ranks' slots weigh 0."""
    gen = torch.Generator().manual_seed(1)
    experts, top_k, tokens = 8, 4, 200
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(torch.int32)
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    expert_map = torch.full((experts,), -1, dtype=torch.int32)
    expert_map[4:] = torch.arange(4, dtype=torch.int32)  # this rank holds experts 4-7
    w, ids = ep.to_local(topk_weights, topk_ids, expert_map)
    assert all(len(set(row)) == top_k for row in ids.tolist())
    counted = torch.zeros(tokens, 4, dtype=torch.int64).scatter_(1, ids.long(), 1).sum()
    assert int(counted) == tokens * top_k  # one row per slot, as the MoE's sort expects
    own = topk_ids >= 4
    assert torch.equal(ids[own], (topk_ids[own] - 4).to(ids.dtype))
    assert torch.equal(w[own], topk_weights[own]) and bool((w[~own] == 0).all())
