"""The benchmark harness's pure parts: the GPU memory budget, the engine arguments of each
configuration, the prefetch layout, the ratios, and the sized Llama checkpoint writer."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import configs, report  # noqa: E402

GIB = configs.GIB
FULL = configs.WORKLOADS["full"]


def model(weights_gib: float = 6.0, layers: int = 28, heads: int = 24, kv_heads: int = 8) -> configs.ModelInfo:
    layer = int(weights_gib * GIB * 0.9 / layers)
    return configs.ModelInfo(path="/m", dtype="bfloat16", params=int(weights_gib * GIB / 2),
                             weights_bytes=int(weights_gib * GIB), layer_bytes=[layer] * layers,
                             kv_bytes_per_token=2 * layers * kv_heads * 128 * 2, heads=heads, kv_heads=kv_heads)


def test_budget_is_weights_on_gpu_plus_kv_cache():
    m = model(6.0)
    b = configs.make_budget(m, FULL, gpu_total_gib=80.0, budget_ratio=1.5)
    assert b.budget_gib == pytest.approx(4.0)
    assert b.weights_gib == pytest.approx(4.0 - b.kv_cache_bytes / GIB)
    # the KV cache holds the largest batch (4 x (512 + 1) prefill tokens) with 30 % to spare
    assert b.kv_cache_bytes >= m.kv_bytes_per_token * FULL.kv_tokens() * 1.3
    assert b.gpu_memory_utilization == pytest.approx((4.0 + b.headroom_gib) / 80.0, abs=1e-4)
    assert "KV cache" in b.as_dict()["definition"]
    with pytest.raises(ValueError, match="nothing for weights"):
        configs.make_budget(m, FULL, gpu_total_gib=80.0, budget_gib=0.1)


def test_each_configuration_keeps_at_most_the_weight_budget_on_the_gpu():
    m = model(6.0)
    b = configs.make_budget(m, FULL, gpu_total_gib=80.0, budget_ratio=1.5)
    plans = {name: configs.plan(name, m, b, FULL, gpu=True, eager=False) for name in configs.CONFIGS}
    assert "does not fit" in plans["gpu"]["skip"]
    assert plans["gpu-ref"]["skip"] is None and plans["gpu-ref"]["over_budget"]
    uva = plans["offload-uva"]
    assert uva["engine"]["cpu_offload_gb"] == pytest.approx(6.0 - b.weights_gib, abs=0.011)
    assert uva["gpu_weights_gib"] <= b.weights_gib and not uva["over_budget"]
    pre = plans["offload-prefetch"]
    assert pre["engine"]["offload_backend"] == "prefetch" and not pre["over_budget"]
    assert pre["gpu_weights_gib"] <= b.weights_gib
    tp2 = plans["hetero-tp2"]
    assert tp2["engine"]["device"] == "heterogeneous" and tp2["engine"]["tensor_parallel_size"] == 2
    assert tp2["gpu_weights_gib"] == pytest.approx(3.0) and not tp2["over_budget"]
    pp2 = plans["hetero-pp2"]
    assert pp2["engine"]["pipeline_parallel_size"] == 2 and pp2["gpu_weights_gib"] is None and pp2["split"]
    free = plans["hetero-pp2-free"]  # the same engine, processes not confined
    assert free["engine"] == pp2["engine"] and free["env"] == {"HETERO_SHIM_CONFINE": "0"} and pp2["env"] == {}
    assert plans["hetero-tp2-free"]["engine"] == tp2["engine"]
    for p in plans.values():
        assert p["engine"]["kv_cache_memory_bytes"] == b.kv_cache_bytes  # the same KV cache everywhere
        assert p["engine"]["enable_prefix_caching"] is False
        assert p["engine"]["gpu_memory_utilization"] == b.gpu_memory_utilization


def test_without_a_gpu_offload_is_skipped_with_the_reason():
    m = model(0.01, layers=2, heads=4, kv_heads=2)
    b = configs.make_budget(m, configs.WORKLOADS["toy"], gpu_total_gib=None)
    assert b.budget_gib is None
    for name in ("offload-uva", "offload-prefetch"):
        assert "no GPU" in configs.plan(name, m, b, configs.WORKLOADS["toy"], gpu=False, eager=True)["skip"]
    stock = configs.plan("gpu", m, b, configs.WORKLOADS["toy"], gpu=False, eager=True)
    assert stock["skip"] is None and "gpu_memory_utilization" not in stock["engine"]
    with pytest.raises(ValueError, match="unknown configuration"):
        configs.plan("gpu-only", m, b, configs.WORKLOADS["toy"], gpu=False, eager=True)


def test_heads_that_do_not_split_are_skipped():
    m = model(6.0, heads=24, kv_heads=8)
    b = configs.make_budget(m, FULL, gpu_total_gib=80.0)
    assert configs.plan("hetero-tp4", m, b, FULL, gpu=True, eager=False)["skip"] is None
    odd = model(6.0, heads=6, kv_heads=3)
    assert "TP=4" in configs.plan("hetero-tp4", odd, b, FULL, gpu=True, eager=False)["skip"]


@pytest.mark.parametrize("layers,needed", [(28, 1), (28, 9), (28, 14), (28, 15), (28, 28), (16, 5), (32, 31)])
def test_prefetch_layout_offloads_the_fewest_layers_spread_out(layers, needed):
    group, k, count = configs.prefetch_layout(layers, needed)
    chosen = [i for i in range(layers) if i % group >= group - k]  # vLLM's selection rule
    assert len(chosen) == count >= needed
    possible = {sum(1 for i in range(layers) if i % g >= g - j) for g in range(1, layers + 1) for j in range(1, g + 1)}
    assert count == min(c for c in possible if c >= needed)
    if needed * 2 <= layers and layers % needed == 0:
        assert k == 1  # one layer in each group: evenly spread


def test_prefetch_layout_refuses_more_layers_than_the_model_has():
    assert configs.prefetch_layout(4, 5) is None


def test_ratios_pair_candidates_with_baselines_of_the_same_model():
    def run(model, config, b1, ttft, status="ok"):
        return {"model": model, "config": config, "status": status,
                "figures": {"decode_b1_tok_s": b1, "decode_b16_tok_s": b1 * 10, "prefill_tok_s": 100.0,
                            "ttft_ms": ttft}}

    runs = [run("3b", "offload-uva", 10.0, 200.0), run("3b", "hetero-tp2", 13.0, 100.0),
            run("1b", "hetero-tp2", 50.0, 10.0), run("3b", "hetero-tp4", 1.0, 1.0, status="failed")]
    [r] = report.ratios(runs)
    assert (r["model"], r["candidate"], r["baseline"]) == ("3b", "hetero-tp2", "offload-uva")
    assert r["decode_b1_tok_s"] == pytest.approx(1.3) and r["ttft_ms"] == pytest.approx(2.0)


def test_sized_llama_checkpoint_matches_transformers_and_reads_back(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hetero_shim.testing import tiny_models

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=False)
    out = tiny_models.write_llama(cfg, tmp_path / "m", dtype="bfloat16", device="cpu")
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(hf_cfg).state_dict().items()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors |= load_file(out / f)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert 0.015 < tensors["model.layers.0.mlp.up_proj.weight"].float().std() < 0.025
    info = configs.read_model(out)
    assert info.params == sum(t.numel() for t in tensors.values())
    assert len(info.layer_bytes) == 3 and info.dtype == "bfloat16"
    again = tiny_models.write_llama(cfg, tmp_path / "n", dtype="bfloat16", device="cpu")
    assert torch.equal(load_file(again / "model-00001-of-00001.safetensors")["lm_head.weight"],
                       tensors["lm_head.weight"])  # same seed, same weights


def test_reserved_core_variants_stack_with_others():
    assert configs.split_variants("hetero-pp2-r1") == ("hetero-pp2", {"HETERO_SHIM_RESERVE_CORES": "1"})
    assert configs.split_variants("hetero-pp2-r0-eager") == (
        "hetero-pp2", {"HETERO_SHIM_RESERVE_CORES": "0", "HETERO_SHIM_GPU_STAGE_GRAPHS": "0"})


def test_a_wider_share_variant_gets_a_fixed_share_below_it():
    """HETERO_SHIM_CPU_GEMM_SPLIT_WIDE refuses the default adapt: -wideNN runs at 50 % below its tokens,
    or at a -splitNN's share where the name has one."""
    wide = "HETERO_SHIM_CPU_GEMM_SPLIT_WIDE"
    assert configs.split_variants("hetero-pp2-wide60") == (
        "hetero-pp2", {wide: "8:60", "HETERO_SHIM_CPU_GEMM_SPLIT": "50"})
    assert configs.split_variants("hetero-pp2-split45-wide60")[1] == {wide: "8:60", "HETERO_SHIM_CPU_GEMM_SPLIT": "45"}
    assert configs.split_variants("hetero-pp2-splitadapt") == ("hetero-pp2", {"HETERO_SHIM_CPU_GEMM_SPLIT": "adapt"})
    assert configs.split_variants("hetero-pp2-adapt506070") == ("hetero-pp2",
                                                                 {"HETERO_SHIM_CPU_GEMM_SPLIT": "adapt:50,60,70"})


def test_expert_offload_takes_only_expert_weights_up_to_the_excess(tmp_path):
    """offload-uva-experts on a real (small) Qwen3-MoE checkpoint: --cpu-offload-params selects the
    experts, and the offloaded size is what exceeds the weight budget, at most all experts."""
    from hetero_shim.testing import arch_models

    from bench import models as bench_models

    family, preset = bench_models.MOE_PRESETS["moe-mini"]
    small = dict(preset, vocab_size=8000, hidden_size=512, moe_intermediate_size=256, intermediate_size=1024,
                 num_attention_heads=8, head_dim=64, num_experts=16)  # ~45 MB: offload sizes are 0.01 GiB steps
    path = arch_models.get_moe(family, small, cache=tmp_path)
    m = configs.read_model(path)
    shapes = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        shapes.update(configs._safetensors_shapes(f))
    experts_gib = sum(int(np.prod(s)) for n, s in shapes.items() if ".experts." in n) * configs.DTYPE_BYTES[m.dtype] / GIB
    assert 0 < experts_gib < m.weights_bytes / GIB
    total = m.weights_bytes / GIB
    kv_gib = configs.kv_cache_bytes(m, FULL) / GIB
    for weights in (total * 1.1, total * 0.9, (total - experts_gib) * 0.5):  # fits; a little over; far over
        b = configs.make_budget(m, FULL, gpu_total_gib=80.0, budget_gib=kv_gib + weights)
        assert b.weights_gib == pytest.approx(weights, abs=1e-4)  # rounded to 4 decimals
        p = configs.plan("offload-uva-experts", m, b, FULL, gpu=True, eager=False)
        if total <= b.weights_gib:
            assert "nothing to offload" in p["skip"]
            continue
        assert p["engine"]["cpu_offload_params"] == ["experts"] and p["engine"]["offload_backend"] == "uva"
        want = min(total - b.weights_gib, experts_gib)
        assert p["engine"]["cpu_offload_gb"] == pytest.approx(want, abs=0.011)
        # a little over: offloading part of the experts fits the budget; far over: even without every
        # expert the rest does not fit, and the run is flagged
        assert p["over_budget"] == (total - experts_gib > b.weights_gib)
