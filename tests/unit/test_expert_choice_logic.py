"""MoE expert choice (patches/per_step/expert_choice.py) without vLLM: the setting, which TP groups use
rank 0's choice, and the exchange itself between simulated ranks (one thread per rank, over a fake
broadcast and over sampling_sync's all-reduce broadcast with a fake sum all-reduce)."""

import sys
import threading
import types

import pytest

torch = pytest.importorskip("torch")

from hetero_shim import settings  # noqa: E402
from hetero_shim.errors import ExpertChoiceMismatch, HeteroConfigError  # noqa: E402
from hetero_shim.patches import tables  # noqa: E402
from hetero_shim.patches.per_step import expert_choice as ec  # noqa: E402
from hetero_shim.patches.per_step import sampling_sync  # noqa: E402
from hetero_shim.planning.plan import RankPlan, plan_to_json  # noqa: E402


# -- the setting ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,mode", [(None, "auto"), ("", "auto"), ("  ", "auto"), ("auto", "auto"),
                                      ("rank0", "rank0"), ("RANK0", "rank0"), (" off ", "off")])
def test_setting_values(monkeypatch, raw, mode):
    if raw is None:
        monkeypatch.delenv(settings.EXPERT_CHOICE, raising=False)
    else:
        monkeypatch.setenv(settings.EXPERT_CHOICE, raw)
    assert settings.expert_choice() == mode


@pytest.mark.parametrize("raw", ["on", "0", "gpu", "rank1", "auto,off"])
def test_a_bad_setting_is_one_error_naming_the_variable_and_the_values(monkeypatch, raw):
    monkeypatch.setenv(settings.EXPERT_CHOICE, raw)
    for read in (settings.expert_choice, settings.check_environment):
        with pytest.raises(HeteroConfigError) as err:
            read()
        assert str(err.value) == f"HETERO_SHIM_EXPERT_CHOICE={raw!r} is not supported; use one of auto, rank0, off"


# -- which groups use rank 0's choice -----------------------------------------------------------
@pytest.mark.parametrize("mode,kinds,syncs", [
    ("auto", ("gpu", "cpu"), True),
    ("auto", ("cpu", "gpu", "cpu"), True),
    ("auto", ("cpu", "cpu"), False),  # alike kernels pick alike
    ("auto", ("gpu", "gpu"), False),
    ("auto", ("gpu",), False),
    ("rank0", ("cpu", "cpu"), True),
    ("rank0", ("gpu", "gpu"), True),
    ("rank0", ("gpu", "cpu"), True),
    ("rank0", ("cpu",), False),  # nothing to agree with
    ("off", ("gpu", "cpu"), False),
    ("off", ("cpu", "cpu"), False),
])
def test_which_groups_use_rank0s_choice(mode, kinds, syncs):
    assert ec.wanted(mode, kinds) is syncs


def test_group_kinds_come_from_the_plan():
    tp2 = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((1,),))
    assert ec.group_kinds(tp2, [0, 1]) == ("gpu", "cpu")
    pp = RankPlan(world_size=4, gpu_ranks=2, cpu_lists=((4,), (5,)), pp_size=2)  # stages {0,1} GPU, {2,3} CPU
    assert ec.group_kinds(pp, [0, 1]) == ("gpu", "gpu") and ec.group_kinds(pp, [2, 3]) == ("cpu", "cpu")
    assert ec.group_kinds(None, [0, 1]) == ("cpu", "cpu")


# -- the exchange ---------------------------------------------------------------------------------
class Group:
    def __init__(self, rank: int, world: int):
        self.rank_in_group, self.world_size, self.ranks = rank, world, list(range(world))


def fake_broadcast(world: int):
    """A broadcast over ``world`` threads: every rank's buffer ends as rank 0's; sizes must agree."""
    buffers, barrier = {}, threading.Barrier(world)

    def make(rank):
        def broadcast(buffer):
            buffers[rank] = buffer
            barrier.wait()
            if rank:
                assert buffer.shape == buffers[0].shape, "the fake collective: sizes differ"
                buffer.copy_(buffers[0])
            barrier.wait()
        return broadcast
    return make


def fake_all_reduce_groups(world: int):
    """Groups whose all_reduce sums what every rank passed (for sampling_sync's broadcast by all-reduce)."""
    inputs, barrier = {}, threading.Barrier(world)

    class SumGroup(Group):
        def all_reduce(self, tensor):
            inputs[self.rank_in_group] = tensor.clone()
            barrier.wait()
            total = sum(inputs[r] for r in range(world))
            barrier.wait()
            return total
    return [SumGroup(r, world) for r in range(world)], inputs


def run_ranks(world, pairs, broadcast_of):
    results, errors = [None] * world, [None] * world

    def rank(r):
        try:
            results[r] = ec.agree(Group(r, world), *pairs[r], broadcast_of(r))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)
    return results, errors


def routing(tokens, top_k, experts, seed, weight_dtype=torch.float32, id_dtype=torch.int32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(id_dtype)
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1).to(weight_dtype)
    return weights.to(device), ids.to(device)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("id_dtypes", [(torch.int32, torch.int64), (torch.int64, torch.int32), (torch.int64,) * 2])
def test_every_rank_ends_with_rank0s_choice_in_its_own_dtypes(world, id_dtypes):
    experts = 1 << 20  # ids far above top_k: exact through the float32 buffer
    pairs = [routing(7, 4, experts, seed=r, id_dtype=id_dtypes[min(r, 1)],
                     weight_dtype=torch.float32 if r == 0 else torch.bfloat16) for r in range(world)]
    results, errors = run_ranks(world, pairs, fake_broadcast(world))
    assert errors == [None] * world
    assert results[0][0] is pairs[0][0] and results[0][1] is pairs[0][1]  # rank 0 keeps its own tensors
    for r in range(1, world):
        weights, ids = results[r]
        assert ids.dtype == pairs[r][1].dtype and weights.dtype == torch.bfloat16
        assert ids.shape == (7, 4) and torch.equal(ids.long(), pairs[0][1].long())
        assert torch.equal(weights, pairs[0][0].to(torch.bfloat16))
        assert not torch.equal(ids.long(), pairs[r][1].long())  # the test changes something


def test_all_cpu_groups_exchange_through_the_all_reduce_broadcast():
    """The all-CPU path: sampling_sync's broadcast by all-reduce (others add zeros) carries the buffer exactly."""
    groups, inputs = fake_all_reduce_groups(2)
    pairs = [routing(5, 2, 60, seed=r, id_dtype=torch.int64) for r in range(2)]
    results, errors = run_ranks(2, pairs, lambda r: lambda buffer: sampling_sync.broadcast_by_all_reduce(groups[r],
                                                                                                          buffer))
    assert errors == [None, None]
    assert torch.equal(results[1][1], pairs[0][1]) and torch.equal(results[1][0], pairs[0][0])
    assert float(inputs[1].abs().sum()) == 0.0  # rank 1 added zeros
    header = inputs[0][:2].tolist()
    assert header == [5.0, 2.0]


def test_a_different_shape_on_another_rank_is_a_clear_error():
    """Rank 0 routed 3 tokens x top-2, rank 1 2 x top-3 (same buffer size, so the collective itself passes)."""
    pairs = [routing(3, 2, 8, seed=0), routing(2, 3, 8, seed=1)]
    _, errors = run_ranks(2, pairs, fake_broadcast(2))
    assert errors[0] is None
    assert isinstance(errors[1], ExpertChoiceMismatch)
    message = str(errors[1])
    assert "TP rank 0 routed 3 tokens x top-2 but TP rank 1 routed 2 x top-3" in message
    assert "HETERO_SHIM_EXPERT_CHOICE=off" in message


def test_routing_results_that_are_not_tokens_by_top_k_are_refused():
    with pytest.raises(ExpertChoiceMismatch, match=r"weights \(3, 2\) and ids \(3, 4\)"):
        ec.pack(torch.rand(3, 2), torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ExpertChoiceMismatch, match=r"expected both \[tokens, top_k\]"):
        ec.pack(torch.rand(6), torch.zeros(6, dtype=torch.int32))


def test_no_tokens_is_a_header_only_exchange():
    pairs = [(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32))] * 2
    results, errors = run_ranks(2, pairs, fake_broadcast(2))
    assert errors == [None, None] and results[1][1].shape == (0, 4)


def test_packed_layout():
    weights, ids = torch.tensor([[0.75, 0.25]]), torch.tensor([[9, 3]], dtype=torch.int64)
    packed = ec.pack(weights, ids)
    assert packed.dtype == torch.float32 and packed.device.type == "cpu"
    assert packed.tolist() == [1.0, 2.0, 0.75, 0.25, 9.0, 3.0]
    assert ec.empty_like_packed(weights, ids).tolist() == [0.0] * 6


# -- the wrapper: decided once per group, logged, passes through otherwise --------------------
@pytest.fixture
def run(monkeypatch):
    """A heterogeneous run of ``plan`` seen from TP rank ``rank``; returns (group, calls of the exchange)."""
    monkeypatch.setattr(ec, "_decided", (None, None))
    monkeypatch.setattr(ec, "_warming_up", lambda: False)
    exchanged = []
    monkeypatch.setattr(ec, "broadcaster", lambda group, device_type: lambda buffer: exchanged.append(buffer.clone()))

    def start(plan, rank=0, ranks=None, mode=None):
        monkeypatch.setenv(settings.DEVICE, settings.HETEROGENEOUS)
        monkeypatch.setenv(settings.PLAN, plan_to_json(plan))
        if mode is None:
            monkeypatch.delenv(settings.EXPERT_CHOICE, raising=False)
        else:
            monkeypatch.setenv(settings.EXPERT_CHOICE, mode)
        group = Group(rank, plan.world_size if ranks is None else len(ranks))
        group.ranks = list(range(plan.world_size)) if ranks is None else ranks
        fake = types.ModuleType("vllm.distributed.parallel_state")
        fake.get_tp_group = lambda: group
        monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", fake)
        return group, exchanged
    return start


MIXED = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((1,),))
ALL_CPU = RankPlan(world_size=2, gpu_ranks=0, cpu_lists=((0,), (1,)))


def call(weights, ids):
    return ec.rank0_choice(lambda: (weights, ids), None, (), {})


@pytest.mark.parametrize("plan,mode,syncs", [(MIXED, None, True), (MIXED, "auto", True), (MIXED, "off", False),
                                             (ALL_CPU, None, False), (ALL_CPU, "rank0", True),
                                             (ALL_CPU, "off", False)])
def test_the_wrapper_exchanges_only_where_the_group_agrees(run, caplog, plan, mode, syncs):
    _, exchanged = run(plan, mode=mode)
    weights, ids = routing(4, 2, 16, seed=0)
    with caplog.at_level("INFO", logger="vllm.hetero_shim"):
        for _ in range(3):
            got = call(weights, ids)
            assert got[0] is weights and got[1] is ids  # rank 0 keeps its own
    assert len(exchanged) == (3 if syncs else 0)
    lines = [r.getMessage() for r in caplog.records if "MoE expert choice" in r.getMessage()]
    if syncs:
        kinds = "GPU, CPU" if plan is MIXED else "CPU, CPU"
        assert lines == [(f"hetero_shim: MoE expert choice: every rank of TP group [0, 1] ({kinds}) uses rank 0's "
                          f"(HETERO_SHIM_EXPERT_CHOICE={mode or 'auto'}); this is TP rank 0")]  # once, not per call
        assert exchanged[0][:2].tolist() == [4.0, 2.0]
    else:
        assert lines == []


def test_the_wrapper_skips_warm_up_passes_and_outside_heterogeneous_mode(run, monkeypatch):
    _, exchanged = run(MIXED)
    weights, ids = routing(4, 2, 16, seed=0)
    monkeypatch.setattr(ec, "_warming_up", lambda: True)
    call(weights, ids)
    assert exchanged == []
    monkeypatch.setattr(ec, "_warming_up", lambda: False)
    call(weights, ids)
    assert len(exchanged) == 1
    run(MIXED)  # a new engine: decided again for its group
    monkeypatch.delenv(settings.DEVICE)
    call(weights, ids)
    assert len(exchanged) == 1


def test_a_pipeline_stages_tp_group_decides_by_its_own_ranks(run):
    """PP=2 x TP=2 with 3 GPUs: stage 0 = ranks {0, 1} (GPU, GPU), stage 1 = ranks {2, 3} (GPU, CPU)."""
    plan = RankPlan(world_size=4, gpu_ranks=3, cpu_lists=((5,),), pp_size=2)
    weights, ids = routing(4, 2, 16, seed=0)
    _, exchanged = run(plan, rank=0, ranks=[0, 1])
    call(weights, ids)
    assert exchanged == []
    _, exchanged = run(plan, rank=0, ranks=[2, 3])
    call(weights, ids)
    assert len(exchanged) == 1


# -- the rows -------------------------------------------------------------------------------------
@pytest.mark.parametrize("release,cpu_target", [
    ("0.26.0", (ec.CPU_FUSED_MOE, "select_experts")), ("0.27.1", (ec.CPU_FUSED_MOE, "select_experts")),
    ("0.28.0", (ec.CPU_MOE, "select_experts")), ("0.29.0", (ec.CPU_MOE, "select_experts")),
    ("0.30.0", None), ("0.32.0", None), ("0.33.0", None)])
def test_targets_per_release(release, cpu_target):
    rows = ec.rows(release)
    targets = [(p.module, p.name) for p in rows]
    assert targets[0] == (ec.ROUTER, "FusedMoERouter.select_experts")
    assert targets[1:] == ([cpu_target] if cpu_target else [])
    assert all(p.hetero_only and p.concern == ec.CONCERN and p.tripwires for p in rows)


@pytest.mark.parametrize("release", tables.SUPPORTED)
def test_expert_choice_wraps_the_cpu_routing_inside_expert_parallels_wrapper(release):
    """Where both wrap one CPU routing function, expert_choice's row comes first in the table, so it is
    the inner wrapper: expert parallelism then maps rank 0's global ids to the rank's own experts."""
    table = tables.table(release)
    for i, patch in enumerate(table):
        if patch.concern == "expert parallelism on CPU ranks":
            ours = [j for j, p in enumerate(table) if p.concern == ec.CONCERN and p.target == patch.target]
            assert all(j < i for j in ours), (release, patch.target)
    shared = {p.target for p in table if p.concern == ec.CONCERN} & \
        {p.target for p in table if p.concern == "expert parallelism on CPU ranks"}
    assert bool(shared) == (release in ("0.26.0", "0.27.0", "0.27.1"))
