"""Pipeline mode: stage kinds and the GPU/CPU layer split (pure logic)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetero_shim.errors import HeteroConfigError
from hetero_shim.planning.layer_costs import GpuLayerCosts
from hetero_shim.planning.layer_split import (
    choose_split,
    even_partition,
    fit_gpu_layers,
    parse_gpu_layers,
    parse_partition,
    spread,
    stage_kinds,
)
from hetero_shim.planning.plan import RankPlan, plan_from_json, plan_to_json


def test_stage_kinds_whole_stages_only():
    assert stage_kinds(2, 1, 1) == ("gpu", "cpu")
    assert stage_kinds(3, 1, 1) == ("gpu", "cpu", "cpu")
    assert stage_kinds(2, 2, 2) == ("gpu", "cpu")
    assert stage_kinds(2, 2, 0) == ("cpu", "cpu")
    assert stage_kinds(2, 1, 2) == ("gpu", "gpu")
    with pytest.raises(HeteroConfigError, match=r"GPU and CPU ranks in stage 0 \(ranks 0-1\).*divides the GPU ranks \(1\)"):
        stage_kinds(2, 2, 1)


def test_parse_gpu_layers():
    assert parse_gpu_layers(3) == 3 and parse_gpu_layers("7") == 7 and parse_gpu_layers(" 2 ") == 2
    for bad in (0, -1, "x", "1.5", 2.0, True, None):
        with pytest.raises(HeteroConfigError, match="whole number of layers"):
            parse_gpu_layers(bad)


def test_even_partition_matches_vllm_rule():
    # vLLM get_pp_indices: remainder to the stages before the last, counting back from the second to last
    assert even_partition(8, 2) == (4, 4)
    assert even_partition(7, 2) == (4, 3)
    assert even_partition(10, 4) == (2, 3, 3, 2)
    assert even_partition(2, 2) == (1, 1)


def test_user_partition_wins_and_is_validated():
    split = choose_split(8, ("gpu", "cpu"), gpu_layers=5, user_partition="6,2")
    assert split.partition == (6, 2) and "set by the user" in split.source and "not used" in split.source
    with pytest.raises(HeteroConfigError, match="sums to 7 layers but the model has 8"):
        choose_split(8, ("gpu", "cpu"), user_partition="5,2")
    with pytest.raises(HeteroConfigError, match="names 3 stage"):
        parse_partition("2,2,4", 8, 2)
    with pytest.raises(HeteroConfigError, match="comma-separated"):
        parse_partition("4;4", 8, 2)
    with pytest.raises(HeteroConfigError, match="at least one layer"):
        parse_partition("8,0", 8, 2)


def test_explicit_gpu_layers():
    assert choose_split(12, ("gpu", "cpu"), gpu_layers=9).partition == (9, 3)
    assert choose_split(12, ("gpu", "cpu", "cpu"), gpu_layers=5).partition == (5, 4, 3)
    assert choose_split(12, ("gpu", "gpu", "cpu"), gpu_layers=9).partition == (5, 4, 3)
    no_gpu = choose_split(4, ("cpu", "cpu"), gpu_layers=3)
    assert no_gpu.partition == (3, 1) and "no GPU on this node" in no_gpu.source


@pytest.mark.parametrize("args, message", [
    ((2, ("gpu", "cpu"), 3), "hetero_gpu_layers=3 is more than the model's 2 layers"),
    ((4, ("gpu", "cpu"), 4), "leaves 0 of the model's 4 layers for 1 CPU stage"),
    ((4, ("gpu", "cpu", "cpu"), 3), "use 1 to 2"),
    ((4, ("gpu", "gpu", "cpu"), 1), "1 for 2 GPU stage"),
    ((2, ("cpu", "cpu", "cpu"), None), "pipeline_parallel_size=3 is larger than the model's 2 layer"),
    ((4, ("gpu", "gpu"), 2), "every pipeline stage runs on a GPU"),
])
def test_bad_splits(args, message):
    with pytest.raises(HeteroConfigError, match=message):
        choose_split(*args)


def test_automatic_split():
    assert choose_split(8, ("cpu", "cpu")).partition == (4, 4)
    assert "even split" in choose_split(7, ("cpu", "cpu")).source
    assert choose_split(12, ("gpu", "cpu"), fits=5, fit_detail="d").partition == (5, 7)
    assert choose_split(12, ("gpu", "cpu"), fits=40).partition == (11, 1)  # every CPU stage keeps a layer
    assert choose_split(12, ("gpu", "gpu", "cpu"), fits=3).partition == (3, 3, 6)
    with pytest.raises(HeteroConfigError, match="not one layer fits in the GPU budget"):
        choose_split(12, ("gpu", "cpu"), fits=0)
    with pytest.raises(HeteroConfigError, match=r"hetero_gpu_layers=6 does not fit: 4 layer\(s\) fit"):
        choose_split(12, ("gpu", "cpu"), gpu_layers=6, fits=4)


def test_fit_and_costs():
    assert fit_gpu_layers(100, 20, 30) == 2 and fit_gpu_layers(10, 20, 30) == 0
    costs = GpuLayerCosts(budget=100, fixed=20, per_layer_weights=20, per_layer_kv=20, how="x")
    assert costs.fits() == 2 and costs.fits(with_kv=False) == 4 and "per layer" in costs.describe()


@given(layers=st.integers(1, 200), pp=st.integers(2, 8), lead=st.integers(0, 8), data=st.data())
def test_every_split_covers_all_layers_once(layers, pp, lead, data):
    kinds = tuple("gpu" if s < min(lead, pp - 1) else "cpu" for s in range(pp))
    gpu_layers = data.draw(st.none() | st.integers(1, layers + 2))
    fits = data.draw(st.none() | st.integers(0, layers + 2))
    try:
        split = choose_split(layers, kinds, gpu_layers=gpu_layers, fits=fits)
    except HeteroConfigError:
        return
    assert len(split.partition) == pp and sum(split.partition) == layers and min(split.partition) >= 1
    ranges = [split.layer_range(s) for s in range(pp)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if gpu_layers is not None:
        n_lead = max(1, kinds.count("gpu"))
        assert sum(split.partition[:n_lead]) == gpu_layers
        assert max(split.partition[n_lead:]) - min(split.partition[n_lead:]) <= 1  # CPU stages share evenly
    assert parse_partition(split.env_value, layers, pp) == split.partition


@given(layers=st.integers(1, 100), stages=st.integers(1, 10))
def test_spread_is_even(layers, stages):
    parts = spread(layers, stages)
    assert sum(parts) == layers and max(parts) - min(parts) <= 1


def test_plan_prints_stages_and_layers():
    plan = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((1,),), pp_size=2, layers=(9, 3),
                    split_source="hetero_gpu_layers=9 on 1 GPU stage(s)")
    text = plan.describe()
    assert "2 pipeline stages; layer split 9,3 (hetero_gpu_layers=9" in text
    assert "rank 0: GPU  cuda:0  stage 0: layers 0-8 (9)" in text
    assert "rank 1: CPU  cores 1  stage 1: layers 9-11 (3)" in text
    assert plan_from_json(plan_to_json(plan)) == plan
    assert RankPlan(world_size=4, gpu_ranks=0, pp_size=2, layers=(1, 1)).stage(3) == 1


def test_checkpoint_numels_reads_safetensors_headers(tmp_path):
    import json
    import struct

    from hetero_shim.planning.layer_costs import checkpoint_numels

    header = {"__metadata__": {"format": "pt"},
              "model.embed_tokens.weight": {"dtype": "F32", "shape": [10, 4], "data_offsets": [0, 160]},
              "model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [160, 288]},
              "model.layers.1.mlp.up_proj.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [288, 416]},
              "model.layers.1.input_layernorm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [416, 432]},
              "lm_head.weight": {"dtype": "F32", "shape": [10, 4], "data_offsets": [432, 592]}}
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(592))
    assert checkpoint_numels(str(tmp_path)) == ({0: 32, 1: 36}, 40)  # lm_head sits on the last stage
    assert checkpoint_numels(str(tmp_path / "missing")) is None


def test_cpu_first_pipeline_puts_the_gpu_stages_last():
    """With the CPU stages first the GPU ranks are the top ranks; the GPU stages still get as many
    layers as fit, the CPU stages the rest, in stage order."""
    assert stage_kinds(2, 1, 1, cpu_first=True) == ("cpu", "gpu")
    assert stage_kinds(4, 2, 4, cpu_first=True) == ("cpu", "cpu", "gpu", "gpu")
    with pytest.raises(HeteroConfigError, match="would put GPU and CPU ranks in stage 1"):
        stage_kinds(2, 2, 1, cpu_first=True)
    split = choose_split(28, ("cpu", "gpu"), fits=15, fit_detail="x")
    assert split.partition == (13, 15)
    assert choose_split(28, ("cpu", "gpu"), gpu_layers=17).partition == (11, 17)
    assert choose_split(10, ("cpu", "cpu", "gpu"), gpu_layers=4).partition == (3, 3, 4)


def test_cpu_first_plan_numbers_devices_and_cores_by_kind():
    plan = RankPlan(world_size=3, gpu_ranks=1, cpu_lists=((0, 1), (2, 3)), reserved=(4,), pp_size=3,
                    layers=(4, 4, 2), cpu_first=True, kv_budgets=(1 << 30, 2 << 30))
    assert [plan.kind(r) for r in range(3)] == ["cpu", "cpu", "gpu"]
    assert list(plan.cpu_ranks) == [0, 1] and plan.cpu_index(1) == 1 and plan.gpu_index(2) == 0
    text = plan.describe()
    assert "rank 2: GPU  cuda:0" in text and "rank 0: CPU  cores 0-1  stage 0: layers 0-3 (4)  KV cache 1.00 GiB" in text
    assert plan_from_json(plan_to_json(plan)) == plan


def llama_3b_config(eager: bool):
    """A duck-typed vLLM config of 3B Llama shapes (bf16), as gpu_layer_costs reads it."""
    from types import SimpleNamespace

    hf = SimpleNamespace(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         intermediate_size=8192, vocab_size=128256, max_position_embeddings=0)
    model = SimpleNamespace(dtype="bfloat16", model="/nonexistent", hf_text_config=hf, enforce_eager=eager,
                            get_num_kv_heads=lambda par: 8, get_head_size=lambda: 128, max_model_len=1024)
    cache = SimpleNamespace(cache_dtype="auto", kv_cache_memory_bytes=335544320, gpu_memory_utilization=1.0)
    return SimpleNamespace(model_config=model, cache_config=cache, scheduler_config=SimpleNamespace(
        max_num_batched_tokens=2048), parallel_config=SimpleNamespace(tensor_parallel_size=1))


BUDGET_3B = int(5.5 * (1 << 30))  # the harness's 1.5x budget at 3B shapes: GPU memory for the stage


def test_gpu_layer_costs_reserve_more_for_a_compiled_graph_captured_stage(monkeypatch):
    """3B Llama shapes (bf16) at the harness's 1.5x budget: 5.5 GiB of GPU memory for the stage.
    Eager, 1 GiB is kept for the CUDA context; compiled with CUDA graphs 1.5 GiB, and the weights
    on the GPU (LM head + layers) then stay within the weight budget W = 3.68 GiB."""
    from hetero_shim import settings
    from hetero_shim.planning.layer_costs import gpu_layer_costs

    monkeypatch.delenv(settings.CPU_GEMM_AHEAD, raising=False)
    eager, compiled = gpu_layer_costs(llama_3b_config(True), BUDGET_3B), gpu_layer_costs(llama_3b_config(False), BUDGET_3B)
    assert compiled.fixed - eager.fixed == 1 << 29
    layer = compiled.per_layer_weights
    assert eager.fits() == 17 and compiled.fits() == 15
    assert 128256 * 3072 * 2 + 15 * layer <= 3.68 * (1 << 30)
    # a CPU stage that computes its prefill on this GPU is charged its context and two 32 MiB weight buffers
    streaming = gpu_layer_costs(llama_3b_config(False), BUDGET_3B, cpu_ranks_on_gpu=1)
    assert streaming.fixed - compiled.fixed == (790 << 20) + 2 * (32 << 20)
    assert streaming.fits() == 10 and "1 CPU rank(s) computing large steps here 0.83 GiB" in streaming.describe()
    # served by this stage's rank instead (the default where a CPU stage precedes the GPU stage): no context
    served = gpu_layer_costs(llama_3b_config(False), BUDGET_3B, served_on_gpu=1)
    assert abs((served.fixed - compiled.fixed) / (1 << 30) - 0.151) < 0.005
    assert served.fits() == 14 and "the previous CPU stage's large steps computed here 0.15 GiB" in served.describe()


def test_pieces_copied_ahead_are_charged_a_buffer_each(monkeypatch):
    from hetero_shim import settings
    from hetero_shim.planning.layer_costs import gpu_layer_costs

    def fixed(ahead: str, **where) -> int:
        monkeypatch.setenv(settings.CPU_GEMM_AHEAD, ahead)
        return gpu_layer_costs(llama_3b_config(False), BUDGET_3B, **where).fixed

    # four 32 MiB buffers instead of two, for a CPU rank's own stream and for the served one
    assert fixed("3", cpu_ranks_on_gpu=1) - fixed("1", cpu_ranks_on_gpu=1) == 2 * (32 << 20)
    assert fixed("3", served_on_gpu=1) - fixed("1", served_on_gpu=1) == 2 * (32 << 20)


def test_who_computes_a_cpu_stages_large_steps(monkeypatch):
    from hetero_shim import settings
    from hetero_shim.planning.layer_costs import cpu_ranks_on_each_gpu

    monkeypatch.delenv(settings.CPU_GEMM_ON_GPU, raising=False)
    monkeypatch.delenv(settings.CPU_GEMM_VIA, raising=False)
    assert cpu_ranks_on_each_gpu(("cpu", "gpu")) == (0, 1)  # the default plan: the GPU rank serves
    assert cpu_ranks_on_each_gpu(("gpu", "cpu")) == (1, 0)  # nobody after the CPU stage: it opens the GPU
    assert cpu_ranks_on_each_gpu(("cpu", "cpu", "gpu")) == (1, 1)
    assert cpu_ranks_on_each_gpu(("cpu", "cpu")) == (0, 0)
    monkeypatch.setenv(settings.CPU_GEMM_VIA, "own")
    assert cpu_ranks_on_each_gpu(("cpu", "gpu")) == (1, 0)
    monkeypatch.setenv(settings.CPU_GEMM_ON_GPU, "0")
    assert cpu_ranks_on_each_gpu(("cpu", "gpu")) == (0, 0)
