"""The bound's arithmetic (bench/bound_model.py) with made-up rates, the step breakdown's op categories
and aggregation (bench/breakdown/sitecustomize.py, bench/breakdown.py) on made-up profiler events."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import bound, bound_model, breakdown, configs, report  # noqa: E402

GIB = configs.GIB
FULL = configs.WORKLOADS["full"]


def llama(layers: int, layer_gib: float, embed_gib: float, tied: bool) -> configs.ModelInfo:
    embed = int(embed_gib * GIB)
    layer = int(layer_gib * GIB)
    norm = 4096
    total = layers * layer + embed + (0 if tied else embed) + norm
    return configs.ModelInfo(path="/m", dtype="bfloat16", params=total // 2, weights_bytes=total,
                             layer_bytes=[layer] * layers, kv_bytes_per_token=2 * layers * 8 * 128 * 2, heads=24,
                             kv_heads=8, embed_bytes=embed, lm_head_bytes=0 if tied else embed, tied=tied)


def rates(cpu: dict[str, float], threads: int = 13, every: int = 16, h2d: float | None = 55.0,
          hbm: float = 4000.0) -> dict:
    """A bound.py result with GB/s at batch 1 per kernel (the same at every thread count)."""
    row = {"gemm": {k: {"by_batch": {"1": {"GBps": v}, "16": {"GBps": v / 2}}} for k, v in cpu.items()},
           "unavailable": {}}
    gpu = {"cuda": True, "h2d_pinned_GBps": h2d, "hbm_read_GBps": hbm} if h2d else {"cuda": False}
    return {"plan_threads": threads, "all_threads": every, "cpu": {str(threads): row, str(every): row}, "gpu": gpu}


def test_best_cpu_rate_is_the_fastest_kernel_at_batch_1_at_the_plans_threads():
    r = rates({"F.linear": 68.6, "oneDNN": 70.0, "packed": 84.7})
    r["cpu"]["16"] = {"gemm": {"oneDNN": {"by_batch": {"1": {"GBps": 99.0}}}}}
    assert bound_model.best_cpu_rate(r) == (84.7e9, "packed", 13)
    assert bound_model.best_cpu_rate(r, threads=16) == (99.0e9, "oneDNN", 16)
    assert bound_model.best_cpu_rate(r, batch=16) == (84.7e9 / 2, "packed", 13)
    assert bound_model.best_cpu_rate({"cpu": {}}) is None


def test_model_bytes_embedding_reads_nothing_and_a_tied_lm_head_reads_the_embedding():
    tied = bound_model.model_bytes(llama(28, 0.1875, 0.73, tied=True))
    assert tied["lm_head"] == tied["embed"] == int(0.73 * GIB) and tied["lm_head_stored"] == 0
    untied = bound_model.model_bytes(llama(32, 0.4375, 0.98, tied=False))
    assert untied["lm_head"] == untied["lm_head_stored"] == untied["embed"]
    assert untied["other"] == 4096  # the final norm


def test_offload_and_pipeline_bounds_at_the_budget():
    m = llama(28, 0.1875, 0.73, tied=True)  # ~3B Llama shapes
    b = configs.make_budget(m, FULL, gpu_total_gib=139.0, budget_ratio=1.5)
    out = bound_model.bound_for(m, b, rates({"F.linear": 68.6, "oneDNN": 70.0, "packed": 84.7}), prefetch_layers=14)
    parts = bound_model.model_bytes(m)
    matrices = sum(parts["layers"]) + parts["lm_head"] + parts["other"]
    assert out["read_per_token_gib"] == pytest.approx(matrices / GIB, abs=1e-4)

    # UVA offload: (model - W, rounded up to 0.01 GiB) over PCIe, everything else from HBM
    off = math.ceil((m.weights_bytes / GIB - b.weights_gib) * 100) / 100 * GIB
    expect = off / 55e9 + (matrices - off) / 4000e9
    assert out["offload-uva"]["step_ms"] == pytest.approx(expect * 1e3, abs=1e-3)
    assert out["offload-uva"]["tok_s"] == pytest.approx(1 / expect, abs=0.01)
    # prefetch: the copies overlap the other layers' compute
    moved = 14 * parts["layers"][0]
    assert out["offload-prefetch"]["step_ms"] == pytest.approx(max(moved / 55e9, (matrices - moved) / 4000e9) * 1e3,
                                                               abs=1e-3)

    # pipeline, GPU stage first: embedding + the leading layers that fit W on the GPU; the rest + LM head on the CPU
    pp = out["hetero-pp2-gpufirst"]
    g = pp["gpu_layers"]
    assert parts["embed"] + g * parts["layers"][0] <= b.weights_gib * GIB
    assert parts["embed"] + (g + 1) * parts["layers"][0] > b.weights_gib * GIB
    cpu = (28 - g) * parts["layers"][0] + parts["lm_head"] + parts["other"]
    assert pp["cpu_read_gib"] == pytest.approx(cpu / GIB, abs=1e-4)
    assert pp["step_ms"] == pytest.approx((cpu / 84.7e9 + g * parts["layers"][0] / 4000e9) * 1e3, abs=1e-3)
    assert "packed" in pp["how"] and out["rates"]["cpu_kernel"] == "packed"
    assert out["rates"]["cpu_GBps_by_kernel"] == {"F.linear": 68.6, "oneDNN": 70.0, "packed": 84.7}
    # every split has its bound; more layers on the GPU is never slower
    by = pp["tok_s_by_gpu_layers"]
    assert by[str(g)] == pp["tok_s"] and len(by) == 29
    assert all(by[str(i)] <= by[str(i + 1)] for i in range(28))

    # pipeline, CPU stage first (the shim's default): LM head + norm + trailing layers on the GPU, the CPU
    # stage reads only its layers (its embedding lookup reads one row)
    cf = out["hetero-pp2"]
    gc = cf["gpu_layers"]
    tail = parts["lm_head"] + parts["other"]
    assert tail + gc * parts["layers"][0] <= b.weights_gib * GIB < tail + (gc + 1) * parts["layers"][0]
    assert cf["cpu_read_gib"] == pytest.approx((28 - gc) * parts["layers"][0] / GIB, abs=1e-4)
    assert cf["tok_s"] > pp["tok_s"] and "CPU stage first" in cf["how"]
    # its small steps split each layer with the GPU rank: the CPU stage's bytes at the CPU rate + PCIe;
    # without the split (HETERO_SHIM_CPU_GEMM_SPLIT=0) at the CPU rate alone
    cpu_cf, gpu_cf = (28 - gc) * parts["layers"][0], gc * parts["layers"][0] + tail
    assert cf["step_ms"] == pytest.approx((cpu_cf / (84.7e9 + 55e9) + gpu_cf / 4000e9) * 1e3, abs=1e-3)
    ns = out["hetero-pp2-nosplit"]
    assert ns["step_ms"] == pytest.approx((cpu_cf / 84.7e9 + gpu_cf / 4000e9) * 1e3, abs=1e-3)
    assert "split" in cf["how"] and "split" not in ns["how"]
    assert bound_model.bound_of_config(out, "hetero-pp2-nosplit") is ns
    assert bound_model.bound_of_config(out, "hetero-pp2") is cf

    # TP=2: half of every matrix on each side, ranks at once
    tp2 = out["hetero-tp2"]
    assert tp2["step_ms"] == pytest.approx(max(matrices / 2 / 84.7e9, matrices / 2 / 4000e9) * 1e3, abs=1e-3)
    assert out["hetero-tp4"]["cpu_read_gib"] == pytest.approx(0.75 * matrices / GIB, abs=1e-4)
    assert out["hetero_pp2_over_offload"] == pytest.approx(cf["tok_s"] / out["offload-uva"]["tok_s"], abs=1e-3)
    assert out["hetero_tp2_over_offload"] == pytest.approx(tp2["tok_s"] / out["offload-uva"]["tok_s"], abs=1e-3)
    # the CPU streaming 1.5x faster than PCIe: both heterogeneous bounds beat offload's
    assert out["hetero_pp2_over_offload"] > 1 and out["hetero_tp2_over_offload"] > 1


def test_without_a_gpu_every_byte_is_read_by_the_cpu_and_offload_has_no_bound():
    m = llama(2, 0.001, 0.0005, tied=False)
    b = configs.make_budget(m, configs.WORKLOADS["toy"], gpu_total_gib=None)
    out = bound_model.bound_for(m, b, rates({"oneDNN": 50.0}, threads=1, every=2, h2d=None))
    assert "offload-uva" not in out
    matrices = sum(m.layer_bytes) + m.lm_head_bytes + 4096
    assert out["hetero-tp2"]["step_ms"] == pytest.approx(matrices / 50e9 * 1e3, abs=1e-3)
    assert "2 threads" in out["hetero-tp2"]["how"]  # all cores: every rank is a CPU rank
    assert bound_model.bound_of_config(out, "hetero-tp2-free") is out["hetero-tp2"]


def test_report_gives_each_row_its_fraction_of_the_bound_and_the_runs_own_split():
    m = llama(28, 0.1875, 0.73, tied=True)
    b = configs.make_budget(m, FULL, gpu_total_gib=139.0, budget_ratio=1.5)
    bounds = bound_model.bound_for(m, b, rates({"oneDNN": 70.0}))
    g = bounds["hetero-pp2"]["gpu_layers"]
    runs = [
        {"model": "3b", "config": "offload-uva", "status": "ok", "figures": {"decode_b1_tok_s": 19.2}},
        {"model": "3b", "config": "hetero-pp2", "status": "ok", "figures": {"decode_b1_tok_s": 13.8},
         "hetero_plan": f"hetero_shim rank plan: 1 GPU rank(s) + 1 CPU rank(s), 2 pipeline stages; layer split "
                        f"{26 - g},{g + 2} (automatic)\n  rank 0: CPU  cores 0-12  stage 0: layers 0-{25 - g} ({26 - g})\n"
                        f"  rank 1: GPU  cuda:0  stage 1: layers {26 - g}-27 ({g + 2})"},
        {"model": "3b", "config": "gpu-ref", "status": "ok", "figures": {"decode_b1_tok_s": 90.0}},
        {"model": "3b", "config": "hetero-tp2", "status": "failed", "figures": {}},
    ]
    fractions = report.bound_fractions({"runs": runs, "bounds": {"3b": bounds}})
    assert [f["config"] for f in fractions] == ["offload-uva", "hetero-pp2"]
    off, pp = fractions
    assert off["fraction"] == pytest.approx(19.2 / bounds["offload-uva"]["tok_s"], abs=1e-3)
    assert pp["gpu_layers"] == g + 2
    assert pp["fraction_at_split"] == pytest.approx(13.8 / bounds["hetero-pp2"]["tok_s_by_gpu_layers"][str(g + 2)],
                                                    abs=1e-3)
    text = report.table({"runs": [r | {"planned": {}} for r in runs], "bounds": {"3b": bounds},
                         "bound": {"cpu": {}, "plan_threads": 13}})
    assert "b1 of bound" in text and "as a fraction of its bound" in text


@pytest.mark.parametrize(("name", "category"), [
    ("aten::linear", "GEMM"), ("aten::mm", "GEMM"), ("aten::addmm", "GEMM"), ("_C::onednn_mm", "GEMM"),
    ("_C::weight_packed_linear", "GEMM"), ("aten::matmul", "GEMM"),
    ("vllm::unified_attention_with_output", "attention"), ("_C::cpu_attn_reshape_and_cache", "attention"),
    ("_C::paged_attention_v1", "attention"), ("vllm::unified_kv_cache_update", "attention"),
    ("_C::rms_norm", "norms"), ("_C::fused_add_rms_norm", "norms"), ("aten::layer_norm", "norms"),
    ("_C::silu_and_mul", "activations"), ("_C::gelu_and_mul", "activations"),
    ("_C::rotary_embedding", "rotary"),
    ("_C::shm_allreduce", "communication"), ("comm::GroupCoordinator.all_reduce", "communication"),
    ("gloo:all_reduce", "communication"), ("c10d::broadcast_", "communication"),
    ("_C::shm_all_gather", "communication"),
    ("comm::HeteroCommunicator.broadcast", "communication"),
    ("aten::argmax", "sampling"), ("aten::multinomial", "sampling"),
    ("hetero_shim::cpu_linear", "GPU hand-off"),
    ("aten::copy_", None), ("aten::add_", None), ("aten::embedding", None), ("aten::broadcast_tensors", None),
    ("aten::slice", None), ("aten::addcmul_", None),
])
def test_op_categories(name, category):
    assert breakdown.categorize(name) == category


def _event(name, parent=None, self_us=0.0, device_us=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, self_cpu_time_total=self_us, self_device_time_total=device_us,
                           device_type="DeviceType.CPU")


def test_each_ops_self_time_goes_to_its_nearest_categorised_ancestor():
    step = _event("bench_step::execute::22", self_us=500)
    linear = _event("aten::linear", step, self_us=10)
    mm = _event("aten::mm", linear, self_us=3000, device_us=2500)
    reduce = _event("comm::GroupCoordinator.all_reduce", step, self_us=40)
    copy = _event("aten::copy_", reduce, self_us=300)  # the all-reduce's own copies: communication
    loose = _event("aten::slice", step, self_us=20)
    sample = _event("bench_step::sample::22", self_us=100)
    argmax = _event("aten::argmax", sample, self_us=50)
    index = _event("aten::index_select", sample, self_us=30)  # nothing of its own: sampling, under sample_tokens
    outside = _event("aten::mm", None, self_us=9999)  # between steps: not counted
    walls = {22: {"tokens": 1, "execute_ms": 4.0, "sample_ms": 0.5, "wall_ms": 4.5}}
    events = [step, linear, mm, reduce, copy, loose, sample, argmax, index, outside]
    out = breakdown.hook.summarize(events, walls)
    [row] = out["steps"]
    assert row["cpu_ms"] == {"GEMM": 3.01, "communication": 0.34, "other ops": 0.02, "sampling": 0.08}
    assert row["device_ms"] == {"GEMM": 2.5}
    assert row["ops_ms"] == pytest.approx(3.45)
    assert out["top_ops"][0] == {"name": "aten::mm", "category": "GEMM", "ms_per_step": 3.0, "calls_per_step": 1.0}

    by = breakdown.profile_by_tokens(out)[1]
    assert by["wall_ms"] == 4.5 and by["steps"] == 1
    assert by["ms"]["python/overhead"] == pytest.approx(4.5 - 3.45)
    assert list(by["ms"])[0] == "GEMM" and list(by["ms"])[-1] == "python/overhead"
    assert sum(by["share"].values()) == pytest.approx(1.0, abs=1e-3)


def test_helpers():
    assert bound.cores_for(13, list(range(13)), list(range(16))) == list(range(13))
    assert bound.cores_for(16, list(range(13)), list(range(16))) == list(range(16))
    assert bound.cores_for(2, [4, 5, 6], list(range(8))) == [4, 5]
    with pytest.raises(ValueError):
        bound.cores_for(9, [0], list(range(8)))
    assert bound.parse_shape("8192x16384") == (8192, 16384)
    assert bound_model.plan_gpu_layers("... layer split 11,17 (automatic)\n"
                                       "  rank 0: CPU  cores 0-12  stage 0: layers 0-10 (11)\n"
                                       "  rank 1: GPU  cuda:0  stage 1: layers 11-27 (17)") == 17
    assert bound_model.plan_gpu_layers("hetero_shim rank plan: 1 GPU rank(s) + 1 CPU rank(s)") is None
    assert breakdown.hook.parse_windows("5:3") == [(None, 5, 3)]
    assert breakdown.hook.parse_windows(None) == [(None, 22, 8), (16, 4, 8)]
    assert breakdown.hook.parse_windows("1:2, 16@4:8") == [(None, 1, 2), (16, 4, 8)]


def test_profile_windows_select_their_steps_in_turn(tmp_path):
    """The breakdown hook's windows (BENCH_BREAKDOWN_PROFILE): "K:N" counts every step with tokens,
    "T@K:N" only steps of T tokens; one window at a time, the next counted from when the last closed."""
    h = breakdown.hook._Hook(str(tmp_path))
    h.counter = breakdown.hook.WindowCounter(breakdown.hook.parse_windows("2:2,16@1:2"))
    closed, started = [], []

    def start():
        started.append(h.steps - 1)
        h.profiling = True

    def finish():  # the real one stops torch.profiler and summarises: here only the bookkeeping
        closed.append(list(h.selected))
        h.profiling, h.selected = False, []
        h.counter.advance()

    h.start = start
    for tokens in (5, 1, 1, 1, 16, 3, 16, 16, 16, 16):
        step = h.steps
        h.steps += 1
        if h.window_full():
            finish()
        h.select(step, tokens)
        if h.last_profiled(step):
            finish()
    # window 1: the 3rd and 4th steps with tokens; window 2: the 2nd and 3rd 16-token steps after it
    assert closed == [[2, 3], [6, 7]] and started == [2, 6] and h.counter.window == 2
    h.select(10, 16)  # every window done: nothing more is selected
    assert not h.profiling and h.selected == []


def test_layer_shapes_follow_the_models_config():
    llama_3b = {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8,
                "head_dim": 128}
    assert configs.layer_shapes(llama_3b) == bound.LAYER_SHAPES
    llama_8b = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
    assert bound.format_shapes(configs.layer_shapes(llama_8b)) == "6144x4096,4096x4096,28672x4096,4096x14336"
    assert configs.layer_shapes({"hidden_size": 64}) is None


def test_the_layer_rate_names_the_model_whose_shapes_were_measured():
    r = rates({"packed": 80.0})
    r["cpu"]["13"]["layer"] = {"by_kernel": {"packed": {"1": {"GBps": 70.0}}}}
    assert bound_model.best_cpu_rate(r)[1] == "packed, layer shapes of the 3B default"
    r["layer_shapes_of"] = "8b"
    assert bound_model.best_cpu_rate(r) == (70.0e9, "packed, layer shapes of 8b", 13)


def test_a_bound_recheck_is_reported_against_the_bound_steps_rate_at_the_same_threads():
    first = rates({"packed": 91.5})
    first["cpu"]["16"] = {"gemm": {"packed": {"by_batch": {"1": {"GBps": 150.0}}}}}
    now = {"plan_threads": 13, "cpu": {"13": {"gemm": {"packed": {"by_batch": {"1": {"GBps": 67.0}}}}}}}
    entry = {"after": "3b hetero-pp2", "date": "2026-12-03 19:58:10 UTC", "rates": now}
    line = report.recheck_line(entry, first)
    assert line == ("bound re-check after 3b hetero-pp2 (19:58): 13 threads, packed: 67.0 GB/s; "
                    "the bound step 91.5 GB/s (0.73x)")
    failed = {"after": None, "date": entry["date"], "error": "rc=1"}
    lines = report.bound_lines({"bound": {"error": "rc=1"}, "bound_rechecks": [entry, failed]}, [])
    assert lines[-2:] == ["bound re-check after 3b hetero-pp2 (19:58): 13 threads, packed: 67.0 GB/s",
                          "bound re-check after the bound step (19:58): rc=1"]
    assert report.recheck_line({**entry, "rates": {"cpu": {}}}, first).endswith("no CPU rate measured")


def test_layer_copies_for_adds_the_cpu_stage_of_the_default_pipeline():
    m = llama(28, 0.1875, 0.73, tied=True)  # ~3B Llama shapes
    b = configs.make_budget(m, FULL, gpu_total_gib=139.0, budget_ratio=1.5)
    parts = bound_model.model_bytes(m)
    cpu_layers = 28 - bound_model.pipeline_split(parts, b.weights_gib * GIB, cpu_first=True)
    assert 0 < cpu_layers < 28
    copies = bound.layer_copies_for(m, b)
    assert copies == tuple(sorted({*bound.LAYER_COPIES, cpu_layers}))
    assert max(copies) == cpu_layers  # the count the bound's rate is taken at
    assert bound.layer_copies_for(m, SimpleNamespace(weights_gib=None)) == bound.LAYER_COPIES


def test_the_bound_uses_the_largest_layer_count_and_the_table_lists_every_count():
    def layer(copies: int, gbps: float) -> dict:
        return {"shapes": [[5120, 3072]], "copies": copies, "bytes": copies * 31_457_280,
                "by_kernel": {"packed": {"1": {"GBps": gbps, "us_per_call": 300.0}}}}

    r = rates({"packed": 90.0})
    r["cpu"]["13"]["gemm"]["packed"]["max_rel_err"] = 0.001
    r["cpu"]["16"] = {"error": "not measured here"}
    small, large = layer(4, 91.5), layer(14, 68.0)
    row = r["cpu"]["13"] | {"layer": large, "layer_by_copies": {"4": small, "14": large},
                            "read": {"float32": {"GBps": 87.0}, "bfloat16": {"GBps": 86.0}}}
    r["cpu"]["13"] = row
    assert bound_model.best_cpu_rate(r)[0] == 68.0e9
    text = bound_model.table(r | {"meta": {}, "gpu": None})
    assert "4 layers in turn (0.13 GB)" in text and "14 layers in turn (0.44 GB)" in text
    assert "M=1: 91.5 GB/s" in text and "M=1: 68.0 GB/s" in text


def test_gapped_sequence_times_the_calls_only_not_the_work_between_them():
    import time

    seen = []

    def gemm(x):  # 1 ms per call
        seen.append(tuple(x.shape))
        until = time.perf_counter() + 1e-3
        while time.perf_counter() < until:
            pass

    import torch

    calls = [(gemm, 64), (gemm, 32)]
    out = bound.gapped_sequence(calls, total=2_000_000, gap_us=2000.0, min_time=0.0, gen=torch.Generator())
    assert out["reps"] == 3 and seen[:2] == [(1, 64), (1, 32)]
    assert 1.0 <= out["us_per_call"] / 1000 < 2.9  # the 2 ms gaps are not in the calls' time (3 ms if they were)
    assert out["GBps"] == pytest.approx(2_000_000 / (out["ms"] / 1e3) / 1e9, rel=0.01)


def test_cpu_stage_gemm_rate_from_the_breakdown_and_the_plan():
    plan = ("hetero_shim rank plan: 1 GPU rank(s) + 1 CPU rank(s), 2 pipeline stages; layer split 14,14\n"
            "  rank 0: CPU  cores 0-12  stage 0: layers 0-13 (14)  KV cache 0.31 GiB\n"
            "  rank 1: GPU  cuda:0  stage 1: layers 14-27 (14)\n")
    ranks = [{"kind": "cpu", "pp_stage": 0, "torch_threads": 13, "profile": {"1": {"ms": {"GEMM": 40.0}}}},
             {"kind": "gpu", "pp_stage": 1, "torch_threads": 1, "profile": {"1": {"ms": {"GEMM": 0.2}}}}]
    run = {"hetero_plan": plan, "breakdown": {"runs": [{"ranks": []}, {"ranks": ranks}]}}
    model = {"layers": 28, "weights_gib": 5.75, "embed_gib": 0.75, "lm_head_gib": 0.0, "tied": True}
    r = rates({"packed": 80.0})
    r["cpu"]["13"]["layer"] = {"by_kernel": {"packed": {"1": {"GBps": 75.0}}}}
    g = report.cpu_stage_gemm(run, model, r)
    nbytes = 14 * (5.0 / 28) * GIB  # the CPU stage's 14 layers; the embedding is a lookup
    assert g["gb"] == pytest.approx(nbytes / 1e9, abs=1e-3)
    assert g["GBps"] == pytest.approx(nbytes / 0.040 / 1e9, abs=0.01)
    assert (g["bound_GBps"], g["bound_threads"]) == (75.0, 13)
    assert g["of_bound"] == pytest.approx(g["GBps"] / 75.0, abs=1e-3)
    # a CPU stage that is the last one computes the LM head (the tied embedding) too
    last = {**run, "hetero_plan": plan.replace("rank 0: CPU  cores 0-12  stage 0: layers 0-13",
                                               "rank 0: CPU  cores 0-12  stage 1: layers 14-27")}
    last["breakdown"]["runs"][1]["ranks"][0] = {**ranks[0], "pp_stage": 1}
    assert report.cpu_stage_gemm(last, model, r)["gb"] == pytest.approx((nbytes + 0.75 * GIB) / 1e9, abs=1e-3)
    assert report.cpu_stage_gemm({"hetero_plan": plan}, model, r) is None  # no breakdown


def test_a_measured_split_pass_is_reported_but_does_not_lower_the_bound():
    """The split's pass measured outside the engine (bench/costream.py) is no ceiling: the engine's own
    pass ran faster than it on two GPU machines. The split pipeline's bound stays CPU + PCIe, and the
    measured pass is reported beside it."""
    m = llama(28, 0.1875, 0.73, tied=True)
    b = configs.make_budget(m, FULL, gpu_total_gib=139.0, budget_ratio=1.5)
    r = rates({"packed": 76.0})
    plain = bound_model.bound_for(m, b, r)
    assert "split_pass_GBps" not in plain["rates"] and "outside the engine" not in plain["hetero-pp2"]["how"]
    r["split_pass"] = {"by_fraction": {"0.0": {"1": {"GBps": 76.0}}, "0.4": {"1": {"GBps": 80.0}},
                                       "0.5": {"1": {"GBps": 82.6}, "16": {"GBps": 76.6}}, "0.6": {"1": {}}}}
    assert bound_model.best_split_pass(r) == (82.6e9, "0.5")
    out = bound_model.bound_for(m, b, r)
    cf, g = out["hetero-pp2"], out["hetero-pp2"]["gpu_layers"]
    cpu_bytes = (28 - g) * int(0.1875 * GIB)
    gpu_bytes = g * int(0.1875 * GIB) + bound_model.model_bytes(m)["lm_head"] + 4096
    assert cf["step_ms"] == pytest.approx((cpu_bytes / (76e9 + 55e9) + gpu_bytes / 4000e9) * 1e3, abs=1e-3)
    assert cf["step_ms"] == plain["hetero-pp2"]["step_ms"]
    assert "outside the engine: 82.6 GB/s at GPU share 0.5" in cf["how"] and out["rates"]["split_pass_GBps"] == 82.6
    assert out["hetero-pp2-nosplit"] == plain["hetero-pp2-nosplit"]  # the CPU alone: unchanged
    assert bound_model.best_split_pass({}) is None
    assert bound_model.best_split_pass({"split_pass": {"error": "x"}}) is None
