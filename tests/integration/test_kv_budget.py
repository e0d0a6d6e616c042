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


def test_default_sizing_with_four_cpu_ranks(models, reference):
    """Four CPU ranks on this 2-core host (threads not bound) with no KV setting at all: each gets
    the same budget, capped by what the workload can use, printed in the rank plan, and the four
    together never more than the host has available."""
    total = int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0]) * 1024
    proc = procs.run_python([GENERATE, str(models["llama"]), "--tp", "4", "--device", "heterogeneous", "--enable",
                             "--kv-cache-bytes", "0"], timeout=420, VLLM_CPU_OMP_THREADS_BIND="nobind")
    assert proc.returncode == 0, proc.stdout[-6000:]
    result = parse_result(proc.stdout)
    report = kv_report.parse(proc.stdout)
    budgets = list(report["budgets"].values())
    assert len(budgets) == 4 and len(set(budgets)) == 1 and 0 < sum(budgets) < total
    assert "KV cache capped at what max_num_seqs x max_model_len" in result["plan"]
    assert "shared by 4 CPU rank(s)" in result["plan"] and "KV cache 0." in result["plan"]
    assert result["tokens"] == reference("llama")["tokens"]


def test_numa_meminfo_smaller_than_the_host(models, reference, tmp_path):
    """A host whose NUMA meminfo reports 2 GiB of far more (faked through the shim's node reader in
    every process): budgets come from the host's MemAvailable, and the CPU ranks' own memory check
    sees the host's figures, so an explicit 3 GiB per rank (more than the node claims) starts."""
    fake = procs.REPO / "tests" / "integration" / "fake_numa"
    host_total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    result, report, log = run_tp2(models["llama"], "--kv-cache-bytes", "0", VLLM_CPU_KVCACHE_SPACE="3",
                                  FAKE_NUMA_GIB="2", FAKE_NUMA_DIR=str(tmp_path),
                                  PYTHONPATH=f"{fake}:{procs.REPO}")
    assert "NUMA meminfo reports 2.0 of" in result["plan"] and "is not used" in result["plan"]
    assert report["budgets"] == {0: 3 * GIB, 1: 3 * GIB}
    checked = [line for line in log.splitlines() if "Explicitly set" in line and "GiB for KV cache" in line]
    assert checked and all(f"/{host_total / GIB:.2f})" in line for line in checked), checked
    assert result["tokens"] == reference("llama")["tokens"]
