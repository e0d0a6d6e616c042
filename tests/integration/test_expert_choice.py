"""MoE expert choice against the real installed vLLM (patches/per_step/expert_choice.py): all-CPU
heterogeneous TP=2 with HETERO_SHIM_EXPERT_CHOICE=rank0 runs the exchange on every MoE layer and step
(rank 1 continues with the ids and weights it received, so a wrong exchange changes the tokens) and gives
stock vLLM TP=1's greedy tokens (8 prompts x 16 tokens, fp32), on the tiny Qwen3-MoE and Mixtral of
hetero_shim/testing/arch_models.py; with expert parallelism too (rank 0's global ids, then each rank's
own experts). Without the setting an all-CPU group keeps its own choice (auto syncs only groups that
mix GPU and CPU ranks) and logs nothing about it. Six engine starts, about 35-50 s each on 2 cores.
"""

from __future__ import annotations

import re

import procs
import pytest
from conftest import generate
from fixtures_vllm import GENERATE, parse_result

from hetero_shim.testing import arch_models, tiny_models

SYNC_LINE = (r"hetero_shim: MoE expert choice: every rank of TP group \[0, 1\] \(CPU, CPU\) uses rank 0's "
             r"\(HETERO_SHIM_EXPERT_CHOICE=rank0\); this is TP rank (\d)")


@pytest.fixture(scope="module")
def stock_tp1():
    """Stock vLLM, no shim, TP=1: RESULT per family (computed once per module)."""
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            cache[family] = generate(arch_models.get(family), "--tp", "1")
            assert cache[family]["shim"] is False
            assert len(cache[family]["tokens"]) == len(tiny_models.PROMPTS)
        return cache[family]

    return get


def hetero_tp2(family: str, *extra: str, **env: str):
    proc = procs.run_python([GENERATE, str(arch_models.get(family)), "--tp", "2", "--device", "heterogeneous",
                             "--enable", *extra], timeout=300, **env)
    assert proc.returncode == 0, proc.stdout[-6000:]
    result = parse_result(proc.stdout)
    assert result["shim"] is True and "rank 0: CPU" in result["plan"] and "rank 1: CPU" in result["plan"]
    return result, proc.stdout


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_rank0_choice_gives_stock_tp1_tokens(stock_tp1, family):
    result, out = hetero_tp2(family, HETERO_SHIM_EXPERT_CHOICE="rank0")
    assert sorted(re.findall(SYNC_LINE, out)) == ["0", "1"], out[-6000:]  # both ranks, once each
    assert "mixture-of-experts model whose experts are split" not in out  # no start-up warning
    assert result["tokens"] == stock_tp1(family)["tokens"]


def test_rank0_choice_with_expert_parallelism(stock_tp1):
    family = "qwen3_moe"
    result, out = hetero_tp2(family, "--enable-expert-parallel", HETERO_SHIM_EXPERT_CHOICE="rank0")
    assert sorted(re.findall(SYNC_LINE, out)) == ["0", "1"], out[-6000:]
    assert len(re.findall(r"this CPU rank computes (\d+) of (\d+) experts", out)) == 2  # each maps rank 0's ids
    assert result["tokens"] == stock_tp1(family)["tokens"]


def test_all_cpu_groups_keep_their_own_choice_by_default(stock_tp1):
    family = "qwen3_moe"
    result, out = hetero_tp2(family)
    assert "MoE expert choice" not in out
    assert result["tokens"] == stock_tp1(family)["tokens"]
