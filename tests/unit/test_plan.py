"""Rank planning and core partitioning (pure logic)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetero_shim.errors import HeteroConfigError
from hetero_shim.planning.plan import (
    Cpu,
    RankPlan,
    count_gpu_ranks,
    format_id_list,
    parse_bind_list,
    parse_id_list,
    partition_cpus,
    plan_from_json,
    plan_to_json,
    share_reserved,
)


def cpus(nodes: dict[int, int]) -> list[Cpu]:
    out, next_id = [], 0
    for node, count in nodes.items():
        for _ in range(count):
            out.append(Cpu(node=node, id=next_id, core=next_id))
            next_id += 1
    return out


def test_gpu_ranks_from_node_and_override():
    assert count_gpu_ranks(4, gpus_on_node=1, override=None) == 1
    assert count_gpu_ranks(2, gpus_on_node=0, override=None) == 0
    assert count_gpu_ranks(2, gpus_on_node=8, override=None) == 2
    assert count_gpu_ranks(4, gpus_on_node=2, override=1) == 1
    with pytest.raises(HeteroConfigError, match="more GPU ranks than this node has GPUs"):
        count_gpu_ranks(4, gpus_on_node=0, override=1)
    with pytest.raises(HeteroConfigError, match="at least 1"):
        count_gpu_ranks(0, gpus_on_node=1, override=None)


def test_kinds_and_description():
    plan = RankPlan(world_size=3, gpu_ranks=1, cpu_lists=((2, 3), (4, 5)), reserved=(0,))
    assert [plan.kind(r) for r in range(3)] == ["gpu", "cpu", "cpu"]
    text = plan.describe()
    assert "rank 0: GPU" in text and "rank 1: CPU  cores 2-3" in text and "reserved cores: 0" in text
    assert plan_from_json(plan_to_json(plan)) == plan
    assert "linear layers" not in text
    routed = RankPlan(world_size=2, gpu_ranks=1, cpu_first=True, pp_size=2, layers=(1, 1), cpu_gemm="ROUTE")
    assert "  CPU ranks' linear layers: ROUTE" in routed.describe()
    assert plan_from_json(plan_to_json(routed)) == routed


def test_id_lists_round_trip():
    assert parse_id_list("0-3,8") == [0, 1, 2, 3, 8]
    assert format_id_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    for bad in ("a", "3-1", "", "-1"):
        with pytest.raises(HeteroConfigError):
            parse_id_list(bad)


def test_bind_list_must_match_cpu_ranks():
    assert parse_bind_list("0-1|2-3", 2, range(4)) == [[0, 1], [2, 3]]
    assert parse_bind_list("auto", 2, range(4)) is None
    with pytest.raises(HeteroConfigError, match="names 3 CPU list"):
        parse_bind_list("0|1|2", 2, range(4))
    with pytest.raises(HeteroConfigError, match="not available"):
        parse_bind_list("0|9", 2, range(4))
    with pytest.raises(HeteroConfigError, match="two CPU ranks"):
        parse_bind_list("0-1|1-2", 2, range(4))


def test_one_node_two_ranks_split_cores():
    lists, reserved, notes = partition_cpus(cpus({0: 8}), cpu_ranks=2, reserve=1)
    assert lists == [[0, 1, 2, 3], [4, 5, 6]] and reserved == [7]
    assert any("share 1 NUMA node" in n for n in notes)


def test_round_robin_over_nodes():
    lists, reserved, _ = partition_cpus(cpus({0: 4, 1: 4}), cpu_ranks=3, reserve=0)
    assert lists == [[0, 1], [4, 5, 6, 7], [2, 3]]  # ranks 0 and 2 share node 0
    assert reserved == []


def test_two_cores_two_ranks_reserve_dropped_with_note():
    lists, reserved, notes = partition_cpus(cpus({0: 2}), cpu_ranks=2, reserve=1)
    assert lists == [[0], [1]] and reserved == []
    assert any("too few cores" in n for n in notes)


def test_more_ranks_than_cores_is_refused():
    with pytest.raises(HeteroConfigError, match="3 CPU rank.*need at least 3 cores"):
        partition_cpus(cpus({0: 2}), cpu_ranks=3, reserve=0)


def test_small_node_refused_with_numbers():
    with pytest.raises(HeteroConfigError, match="NUMA node 1 has 1 core"):
        partition_cpus(cpus({0: 6, 1: 1}), cpu_ranks=4, reserve=0)


@given(
    st.dictionaries(st.integers(0, 3), st.integers(1, 12), min_size=1, max_size=4),
    st.integers(1, 8),
    st.integers(0, 4),
)
def test_partition_properties(nodes, ranks, reserve):
    pool = cpus(nodes)
    try:
        lists, reserved, _ = partition_cpus(pool, ranks, reserve)
    except HeteroConfigError:
        per_node_ranks = {n: 0 for n in sorted(nodes)}
        for r in range(ranks):
            per_node_ranks[sorted(nodes)[r % len(nodes)]] += 1
        assert ranks > len(pool) or any(nodes[n] < per_node_ranks[n] for n in nodes)
        return
    given_out = [i for cores in lists for i in cores]
    assert len(lists) == ranks and all(lists)  # every rank has cores
    assert len(given_out) == len(set(given_out))  # no core given twice
    assert not set(given_out) & set(reserved)
    assert set(given_out) | set(reserved) <= {c.id for c in pool}
    node_of = {c.id: c.node for c in pool}
    assert all(len({node_of[i] for i in cores}) == 1 for cores in lists)  # a rank stays on one node


@given(st.lists(st.lists(st.integers(0, 63), min_size=1, max_size=6), min_size=1, max_size=5))
def test_bind_list_parser_accepts_what_format_writes(groups):
    flat = [i for g in groups for i in set(g)]
    text = "|".join(format_id_list(sorted(set(g))) for g in groups)
    if len(flat) != len(set(flat)):
        with pytest.raises(HeteroConfigError):
            parse_bind_list(text, len(groups), range(64))
    else:
        assert parse_bind_list(text, len(groups), range(64)) == [sorted(set(g)) for g in groups]


def test_reserved_cores_go_to_the_rank_with_fewest_cores_on_their_node():
    host = cpus({0: 8, 1: 8})
    lists, shared = share_reserved([[0, 1, 2], [3, 4], [8, 9, 10]], [5, 6, 15], host)
    assert shared == [5, 6, 15]
    assert lists == [[0, 1, 2, 6], [3, 4, 5], [8, 9, 10, 15]]


def test_a_reserved_core_of_a_node_without_cpu_ranks_stays_out():
    lists, shared = share_reserved([[0, 1]], [2, 9], cpus({0: 4, 1: 8}))
    assert lists == [[0, 1, 2]] and shared == [2]
