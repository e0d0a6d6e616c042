"""CPU ranks' KV budgets (pure arithmetic) and the host memory they are planned from."""

from __future__ import annotations

import pytest

from hetero_shim.errors import HeteroConfigError
from hetero_shim.planning import kv_budget, node
from hetero_shim.planning.kv_budget import GIB, PROCESS_OVERHEAD, Workload


def work(ranks=2, weights=GIB, per_token=1024, max_model_len=2048, max_num_seqs=256, fraction=0.9, processes=None):
    return Workload(cpu_weights=(weights,) * ranks, cpu_bytes_per_token=(per_token,) * ranks,
                    max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                    processes=ranks + 1 if processes is None else processes, fraction=fraction)


def test_default_counts_weights_and_processes_and_is_shared():
    w = work(ranks=2, per_token=1 << 20)  # large per-token size: the workload cap does not bind
    found = kv_budget.budgets(w, 40 * GIB, None, None)
    left = 40 * GIB - 2 * GIB - 3 * PROCESS_OVERHEAD
    assert found.per_rank == (int(0.9 * left) // 2,) * 2
    assert "shared by 2 CPU rank(s)" in found.source
    assert sum(found.per_rank) + 2 * GIB + 3 * PROCESS_OVERHEAD <= 40 * GIB  # never more than the host has


def test_default_is_capped_by_what_the_workload_can_use():
    """A tiny model on a big host: max_num_seqs x max_model_len tokens, not 90 % of the RAM."""
    w = work(ranks=2, weights=2 << 20, per_token=1024, max_model_len=256, max_num_seqs=256)
    found = kv_budget.budgets(w, 24 * GIB, None, None)
    assert found.per_rank == (1024 * 256 * 256,) * 2
    assert any("capped" in n for n in found.notes)


@pytest.mark.parametrize("ranks", [1, 3, 7])
def test_many_cpu_ranks_share_what_is_left(ranks):
    w = work(ranks=ranks, weights=GIB // 2, per_token=64 << 10)
    found = kv_budget.budgets(w, 16 * GIB, None, None)
    assert len(found.per_rank) == ranks
    assert sum(found.per_rank) + ranks * GIB // 2 + (ranks + 1) * PROCESS_OVERHEAD <= 16 * GIB


def test_explicit_space_that_fits_applies_to_every_cpu_rank():
    found = kv_budget.budgets(work(ranks=3), 64 * GIB, 2, None)
    assert found.per_rank == (2 * GIB,) * 3 and found.source == "VLLM_CPU_KVCACHE_SPACE=2"


def test_explicit_space_that_cannot_fit_names_the_setting_numbers_and_fix():
    with pytest.raises(HeteroConfigError) as err:
        kv_budget.budgets(work(ranks=7, weights=GIB), 16 * GIB, 4, None)
    text = str(err.value)
    assert "VLLM_CPU_KVCACHE_SPACE=4 asks 4.00 GiB of KV cache for each of 7 CPU rank(s), 28.00 GiB in all" in text
    assert "16.00 GiB available" in text and "set VLLM_CPU_KVCACHE_SPACE to at most 0" in text


def test_explicit_bytes_that_cannot_fit_say_what_to_set():
    with pytest.raises(HeteroConfigError, match="set kv_cache_memory_bytes to at most"):
        kv_budget.budgets(work(ranks=2), 8 * GIB, None, 4 * GIB)


def test_default_too_small_for_one_request_is_refused_with_what_to_change():
    with pytest.raises(HeteroConfigError, match="lower max_model_len"):
        kv_budget.budgets(work(ranks=2, weights=6 * GIB, per_token=1 << 20, max_model_len=1 << 14), 16 * GIB, None, None)


def test_weights_counted_more_than_once_say_so_when_they_do_not_fit():
    note = "their decoder layers counted 2 times"
    w = Workload(cpu_weights=(3 * GIB,), cpu_bytes_per_token=(1024,), max_model_len=2048, max_num_seqs=1,
                 processes=2, fraction=0.9, weights_note=note)
    with pytest.raises(HeteroConfigError) as err:
        kv_budget.budgets(w, 6 * GIB, 4, None)
    assert f"the CPU ranks' weights take about 3.00 GiB ({note}) and" in str(err.value)


@pytest.mark.parametrize("route, env, copies", [
    ("", {}, 1.0),  # the CPU ranks compute their linear layers themselves
    # and the rows after adapt's (the default's) 60 %
    ("steps of >= 64 tokens on the next stage's GPU rank", {}, 2.4),
    ("routed", {"HETERO_SHIM_CPU_GEMM_SPLIT": "adapt"}, 2.4),
    ("routed", {"HETERO_SHIM_CPU_GEMM_SPLIT": "50"}, 2.0),  # one fixed share: no rows of their own
    ("routed", {"HETERO_SHIM_CPU_GEMM_SPLIT": "adapt:50,60,70"}, 2.3),  # the rows after its 70 %
    ("routed", {"HETERO_SHIM_CPU_GEMM_SPLIT": "50", "HETERO_SHIM_CPU_GEMM_SPLIT_WIDE": "8:75"}, 2.25),
    ("routed", {"HETERO_SHIM_CPU_GEMM_SPLIT": "0", "HETERO_SHIM_CPU_GEMM_SPLIT_WIDE": "8:75"}, 2.0),  # no split
])
def test_decoder_layers_held_twice_where_a_gpu_computes_large_steps(monkeypatch, route, env, copies):
    from hetero_shim.planning.layer_costs import decoder_weight_copies
    from hetero_shim.planning.plan import RankPlan

    for name in ("HETERO_SHIM_CPU_GEMM_SPLIT", "HETERO_SHIM_CPU_GEMM_SPLIT_WIDE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plan = RankPlan(2, 1, ((0, 1),), (), (), cpu_gemm=route)
    assert decoder_weight_copies(plan) == pytest.approx(copies)


def test_the_weights_note_says_what_saves_the_larger_shares_rows():
    from hetero_shim.planning.layer_costs import copies_note

    assert copies_note(1.0) == ""
    assert copies_note(2.0).startswith("their decoder layers counted 2 times") and "larger share" not in copies_note(2.0)
    assert copies_note(2.4).endswith("the rows after the split's larger share (a fixed HETERO_SHIM_CPU_GEMM_SPLIT, "
                                     "e.g. 50, without HETERO_SHIM_CPU_GEMM_SPLIT_WIDE holds them once)")

def test_the_kv_budgets_see_where_the_linear_layers_go(monkeypatch):
    """build_plan decides the CPU ranks' route before their KV budgets, which count the weights by it."""
    from hetero_shim.planning import build

    seen = []
    monkeypatch.setattr(build.run_state, "publish_plan", lambda text: None)
    build.build_plan(2, 1, kv_for=lambda p: seen.append(p.cpu_gemm) or kv_budget.KvBudgets((GIB,), "test"),
                     cpu_gemm=lambda p: "routed")
    assert seen == ["routed"]


def test_no_cpu_ranks_no_budgets():
    assert kv_budget.budgets(work(ranks=0), GIB, None, None).per_rank == ()


# -- the node reader --------------------------------------------------------------------------
MEMINFO = "MemTotal:       131072000 kB\nMemFree:         1000000 kB\nMemAvailable:   125829120 kB\n"


def fake_host(tmp_path, monkeypatch, node_kib: dict[int, int], cgroup: str | None = None):
    (tmp_path / "meminfo").write_text(MEMINFO)
    nodes = tmp_path / "nodes"
    for n, kib in node_kib.items():
        (nodes / f"node{n}").mkdir(parents=True)
        (nodes / f"node{n}" / "meminfo").write_text(
            f"Node {n} MemTotal: {kib} kB\nNode {n} MemFree: {kib // 2} kB\nNode {n} Active(file): 10 kB\n"
            f"Node {n} Inactive(file): 10 kB\nNode {n} SReclaimable: 0 kB\n")
    nodes.mkdir(exist_ok=True)
    monkeypatch.setattr(node, "PROC_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(node, "SYS_NODE", nodes)
    cg = tmp_path / "cgroup"
    cg.mkdir()
    if cgroup is not None:
        (cg / "memory.max").write_text(cgroup)
        (cg / "memory.current").write_text(str(4 << 30))
    monkeypatch.setattr(node, "CGROUP_V2", cg)
    monkeypatch.setattr(node, "CGROUP_V1", cg / "none")


def test_numa_meminfo_smaller_than_reality_is_not_trusted(tmp_path, monkeypatch):
    """A VM whose node0 reports 8.9 GiB of 125: the host's MemAvailable is used."""
    fake_host(tmp_path, monkeypatch, {0: int(8.9 * (1 << 20))})
    mem = node.host_memory()
    assert not mem.nodes_trusted
    assert mem.for_node(0).available == 125829120 * 1024
    assert "is not used" in mem.describe()


def test_numa_meminfo_that_adds_up_is_trusted(tmp_path, monkeypatch):
    fake_host(tmp_path, monkeypatch, {0: 65536000, 1: 65536000})
    mem = node.host_memory()
    assert mem.nodes_trusted and mem.for_node(1).total == 65536000 * 1024
    assert mem.for_node(1).available == (32768000 + 20) * 1024


def test_cgroup_limit_clamps_the_host(tmp_path, monkeypatch):
    fake_host(tmp_path, monkeypatch, {0: 131072000}, cgroup=str(16 << 30))
    mem = node.host_memory()
    assert mem.host.total == 16 << 30 and mem.host.available == 12 << 30 and mem.cgroup_limit == 16 << 30
    assert mem.for_node(0).available <= 12 << 30


def test_unlimited_cgroup_is_no_limit(tmp_path, monkeypatch):
    fake_host(tmp_path, monkeypatch, {0: 131072000}, cgroup="max")
    assert node.host_memory().cgroup_limit is None
