"""KV cache budgets in heterogeneous mode (all-CPU here): the user's settings are honoured per
rank, CPU ranks sharing a NUMA node split the node's default share, and the block count is
agreed across ranks (the smallest budget wins), with the text unchanged."""

from __future__ import annotations

import procs
from conftest import GENERATE, parse_result

from hetero_shim.testing import kv_report

GIB = 1 << 30


def run_tp2(model, *args: str, **env: str):
    proc = procs.run_python([GENERATE, str(model), "--tp", "2", "--device", "heterogeneous", "--enable", *args],
                            timeout=300, **env)
    assert proc.returncode == 0, proc.stdout[-6000:]
    report = kv_report.parse(proc.stdout)
    assert report is not None, "no KV cache agreement line in the log:\n" + proc.stdout[-4000:]
    return parse_result(proc.stdout), report, proc.stdout


def test_vllm_cpu_kvcache_space_sets_every_cpu_rank(models, reference):
    result, report, _ = run_tp2(models["llama"], "--kv-cache-bytes", "0", VLLM_CPU_KVCACHE_SPACE="1")
    assert report["budgets"] == {0: GIB, 1: GIB}
    assert kv_report.smallest_budget_wins(report)
    assert result["tokens"] == reference("llama")["tokens"]


def test_default_budget_is_shared_by_cpu_ranks_on_one_numa_node(models, reference):
    """No explicit size: vLLM's CPU default claims gpu_memory_utilization of the node per rank;
    two ranks on this host's one NUMA node get half of it each (minus what each already uses)."""
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    result, report, log = run_tp2(models["llama"], "--kv-cache-bytes", "0", "--gpu-memory-utilization", "0.2")
    assert "shared by 2 CPU rank(s)" in log
    for budget in report["budgets"].values():
        assert 0 < budget <= 0.2 * total / 2
    assert kv_report.smallest_budget_wins(report)
    assert result["tokens"] == reference("llama")["tokens"]
