"""Large-token linear layers of CPU ranks on the GPU (patches/per_step/cpu_gemm_on_gpu.py): the
setting, the device a CPU rank is given, and the per-call choice, with a stand-in for the GPU side
(the GPU path itself runs in tests/gpu/test_pipeline.py)."""

import os

import pytest

torch = pytest.importorskip("torch")

from hetero_shim import settings  # noqa: E402
from hetero_shim.errors import HeteroConfigError  # noqa: E402
from hetero_shim.collectives import weight_stream  # noqa: E402
from hetero_shim.patches.per_step import cpu_gemm_on_gpu as gg  # noqa: E402
from hetero_shim.patches.startup import rank_process  # noqa: E402
from hetero_shim.planning.plan import RankPlan  # noqa: E402


@pytest.mark.parametrize("raw, tokens", [(None, 64), ("auto", 64), ("0", None), ("off", None), ("on", 64), ("1", 1),
                                         ("16", 16)])
def test_threshold_setting(monkeypatch, raw, tokens):
    if raw is None:
        monkeypatch.delenv(settings.CPU_GEMM_ON_GPU, raising=False)
    else:
        monkeypatch.setenv(settings.CPU_GEMM_ON_GPU, raw)
    assert settings.cpu_gemm_on_gpu_tokens() == tokens


def test_bad_threshold_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(settings.CPU_GEMM_ON_GPU, "-3")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_CPU_GEMM_ON_GPU='-3'.*0 .off., on"):
        settings.check_environment()


def test_cpu_ranks_get_the_gpu_ranks_devices_in_turn(monkeypatch):
    monkeypatch.setenv(settings.CPU_GEMM_ON_GPU, "on")
    plan = RankPlan(world_size=4, gpu_ranks=2, cpu_first=True)  # ranks 0, 1 CPU; 2, 3 GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert rank_process.gpu_for_large_steps(plan, 0)[settings.CPU_RANK_GPU] == "5"
    assert rank_process.gpu_for_large_steps(plan, 1)[settings.CPU_RANK_GPU] == "7"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    env = rank_process.gpu_for_large_steps(plan, 1)
    assert env == {settings.CPU_RANK_GPU: "1", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    assert rank_process.gpu_for_large_steps(RankPlan(world_size=2, gpu_ranks=0), 1) == {}
    monkeypatch.setenv(settings.CPU_GEMM_ON_GPU, "0")
    assert rank_process.gpu_for_large_steps(plan, 0) == {}


@pytest.mark.parametrize("raw", [None, "auto"])
def test_by_default_pipeline_cpu_stages_use_the_gpu_tensor_parallel_ranks_do_not(monkeypatch, raw):
    if raw is None:
        monkeypatch.delenv(settings.CPU_GEMM_ON_GPU, raising=False)
    else:
        monkeypatch.setenv(settings.CPU_GEMM_ON_GPU, raw)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pipeline = RankPlan(world_size=2, gpu_ranks=1, cpu_first=True, pp_size=2, layers=(12, 20))
    tensor_parallel = RankPlan(world_size=2, gpu_ranks=1)
    # the CPU stage is followed by the GPU stage: that stage's rank computes, no GPU in the CPU rank
    assert rank_process.gpu_for_large_steps(pipeline, 0) == {settings.CPU_RANK_GPU: "next-stage"}
    monkeypatch.setenv(settings.CPU_GEMM_VIA, "own")
    assert rank_process.gpu_for_large_steps(pipeline, 0)[settings.CPU_RANK_GPU] == "0"
    monkeypatch.delenv(settings.CPU_GEMM_VIA)
    assert rank_process.gpu_for_large_steps(tensor_parallel, 1) == {}
    monkeypatch.setenv(settings.CPU_GEMM_ON_GPU, "on")  # asked for: tensor-parallel CPU ranks too
    assert rank_process.gpu_for_large_steps(tensor_parallel, 1)[settings.CPU_RANK_GPU] == "0"


def test_the_rank_plan_says_where_cpu_ranks_linear_layers_go(monkeypatch):
    """The plan's line follows the settings the ranks will read: large steps to the next stage's GPU
    rank, smaller ones split with it (share, which layers, queued or not); own GPUs; nothing in TP."""
    for name in (settings.CPU_GEMM_ON_GPU, settings.CPU_GEMM_VIA, settings.CPU_GEMM_SPLIT,
                 settings.CPU_GEMM_SPLIT_LAYERS, settings.CPU_GEMM_SPLIT_WIDE, settings.CPU_GEMM_QUEUE_STEP,
                 "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    route = rank_process.large_steps_route
    pipeline = RankPlan(world_size=2, gpu_ranks=1, cpu_first=True, pp_size=2, layers=(12, 20))
    assert route(pipeline) == ("steps of >= 64 tokens on the next stage's GPU rank (weights streamed from shared "
                               "memory); smaller steps split: the leading rows of each layer, 40, 50 or 60 % as the CPU "
                               "rank finds fastest per step size, there, the others here at the same time, a step's "
                               "requests queued ahead")
    monkeypatch.setenv(settings.CPU_GEMM_QUEUE_STEP, "0")
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "40")
    assert route(pipeline).endswith("the leading 40 % of each layer's rows there, the others here at the same time")
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT_WIDE, "8:60")
    assert route(pipeline).endswith("the leading 40 % of each layer's rows (60 % in steps of >= 8 tokens) there, "
                                    "the others here at the same time")
    monkeypatch.delenv(settings.CPU_GEMM_SPLIT_WIDE)
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "auto")
    assert route(pipeline).endswith("the leading rows of each layer, a share the CPU rank measures at start-up, "
                                    "there, the others here at the same time")
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "adapt")
    assert route(pipeline).endswith("the leading rows of each layer, 40, 50 or 60 % as the CPU rank finds fastest per "
                                    "step size, there, the others here at the same time")
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "40")
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT_LAYERS, "large")
    assert "the leading rows of the large layers, 40 % of the stage's weights, there" in route(pipeline)
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "0")
    assert route(pipeline).endswith("(weights streamed from shared memory)")
    monkeypatch.setenv(settings.CPU_GEMM_VIA, "own")
    assert route(pipeline) == "steps of >= 64 tokens on GPU 0 (the rank's own CUDA context)"
    monkeypatch.delenv(settings.CPU_GEMM_VIA)
    # two CPU stages before the GPU stage: only the second is followed by a GPU rank
    three = RankPlan(world_size=3, gpu_ranks=1, cpu_first=True, pp_size=3, layers=(4, 4, 8))
    assert route(three) == ("CPU rank 0: steps of >= 64 tokens on GPU 0 (the rank's own CUDA context); CPU rank 1: "
                            "steps of >= 64 tokens on the next stage's GPU rank (weights streamed from shared memory)")
    assert route(RankPlan(world_size=2, gpu_ranks=1)) == ""  # tensor parallelism: by default on the CPU
    monkeypatch.setenv(settings.CPU_GEMM_ON_GPU, "0")
    assert route(pipeline) == ""


def test_the_gpu_budget_pays_for_cpu_ranks_streaming_there(monkeypatch):
    """Each CPU rank that opens the GPU is charged its context and two weight buffers. With whole
    weights (chunks off) that is what the engine's peak grew by on the H200 (0.96 GiB at 3B shapes,
    1.21 GiB at 8B); with the default 32 MiB pieces the buffers are 64 MiB at either size."""
    from types import SimpleNamespace

    from hetero_shim.planning import layer_costs

    gib = 1 << 30
    three_b = SimpleNamespace(hidden_size=3072, intermediate_size=8192)
    eight_b = SimpleNamespace(hidden_size=4096, intermediate_size=14336)
    monkeypatch.setenv(settings.CPU_GEMM_CHUNK_MIB, "0")
    assert abs(layer_costs.cpu_rank_gpu_bytes(three_b, 2) / gib - 0.96) < 0.01
    assert abs(layer_costs.cpu_rank_gpu_bytes(eight_b, 2) / gib - 1.21) < 0.01
    monkeypatch.delenv(settings.CPU_GEMM_CHUNK_MIB)
    for shapes in (three_b, eight_b):
        assert layer_costs.cpu_rank_gpu_bytes(shapes, 2) == layer_costs.CPU_RANK_CONTEXT + (64 << 20)
    tiny = SimpleNamespace(hidden_size=64, intermediate_size=128)  # weights below a piece: whole weights
    assert layer_costs.cpu_rank_gpu_bytes(tiny, 4) == layer_costs.CPU_RANK_CONTEXT + 2 * (2 * 64 * 128 * 4)
    monkeypatch.setenv(settings.CPU_GEMM_CHUNK_MIB, "lots")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_CPU_GEMM_CHUNK_MIB"):
        layer_costs.cpu_rank_gpu_bytes(tiny, 4)


def test_weights_are_cut_into_pieces_of_whole_rows():
    """Pieces cover every row once, in order, each at most the chunk (but at least one row); the slot
    size is the largest piece."""

    class Layer:
        def __init__(self, n, k):
            self.weight = torch.empty(n, k, dtype=torch.bfloat16)

    layers = [Layer(1000, 64), Layer(7, 64), Layer(3, 100_000)]
    size = weight_stream.cut_into_pieces(layers, 128 * 64 * 2)  # 128 rows of the first two
    assert layers[0].pieces[0] == (0, 128) and layers[0].pieces[-1] == (896, 1000) and len(layers[0].pieces) == 8
    assert layers[1].pieces == [(0, 7)]
    assert layers[2].pieces == [(0, 1), (1, 2), (2, 3)]  # a row larger than the chunk: one row a piece
    assert size == 100_000 * 2
    for layer in layers:
        rows = [r for first, end in layer.pieces for r in range(first, end)]
        assert rows == list(range(layer.weight.shape[0]))
    assert weight_stream.cut_into_pieces(layers, None) == 3 * 100_000 * 2 and layers[0].pieces == [(0, 1000)]


class FakeSide(gg.GpuSide):
    """The GPU side with the device stood in for: records the calls, computes on the CPU."""

    def __init__(self, min_tokens=4, fail=False):
        super().__init__(min_tokens, "0")
        self.device, self.calls, self.broken = "stand-in", [], fail

    def linear(self, x, layer, bias):
        if self.broken:
            raise RuntimeError("CUDA out of memory")
        self.calls.append(x.shape[0])
        return torch.nn.functional.linear(x, layer.weight, bias)


def layer_choice(side):
    weight = torch.randn(3, 5)
    cpu_calls = []

    def cpu(x, w, bias):
        cpu_calls.append(x.shape[0])
        return torch.nn.functional.linear(x, weight, bias)

    return gg.LayerChoice(cpu, weight, side), weight, cpu_calls


def test_tokens_below_the_threshold_stay_on_the_cpu():
    side = FakeSide(min_tokens=4)
    choice, weight, cpu_calls = layer_choice(side)
    removed = torch.empty(0)  # what vLLM leaves as layer.weight after packing
    for tokens in (1, 3, 4, 9):
        x = torch.randn(tokens, 5)
        torch.testing.assert_close(choice(x, removed, None), x @ weight.T)
    assert cpu_calls == [1, 3] and side.calls == [4, 9]


def test_nothing_moves_before_the_gpu_is_open():
    side = FakeSide(min_tokens=1)
    side.device = None
    choice, _, cpu_calls = layer_choice(side)
    choice(torch.randn(8, 5), None, None)
    assert cpu_calls == [8] and side.calls == []


def test_a_failing_gpu_call_falls_back_to_the_cpu_for_good(caplog):
    side = FakeSide(min_tokens=1, fail=True)
    choice, weight, cpu_calls = layer_choice(side)
    x = torch.randn(6, 5)
    torch.testing.assert_close(choice(x, None, None), x @ weight.T)
    assert side.device is None and cpu_calls == [6]
    assert "keeps its linear layers on the CPU" in caplog.text and "CUDA out of memory" in caplog.text
    choice(x, None, None)
    assert cpu_calls == [6, 6]


def test_dispatch_keeps_the_plain_weight_the_cpu_kernel_drops(monkeypatch):
    side = FakeSide(min_tokens=2)
    monkeypatch.setattr(gg, "_side", side)
    layer = torch.nn.Linear(5, 3, bias=True)
    plain = layer.weight.detach().clone()

    def dispatch(layer, remove_weight):  # as vLLM's packed path: its own copy, the plain weight dropped
        packed = layer.weight.detach().clone()
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, packed, bias)
        layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    gg.keep_gpu_choice(dispatch, None, (layer,), {"remove_weight": True})
    assert isinstance(layer.cpu_linear, gg.LayerChoice) and side.layers == [layer.cpu_linear]
    assert layer.cpu_linear.index == 0
    x = torch.randn(3, 5)
    got = layer.cpu_linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, plain, layer.bias))
    assert side.calls == [3]


@pytest.mark.parametrize("low, wide", [(0, 0), (4, 0), (0, 6), (4, 6), (5, 5)])
def test_the_splits_cpu_rows_stay_one_kernel_call(low, wide):
    """Each kind's CPU rows (rows_of(kind) to the end) give those rows of x @ W.T + b; the default
    share's rows are one kernel call whichever other kinds are in use, the wide kind's too (its own
    kernel), the low kind's two; the whole layer is x @ W.T + b."""
    weight, bias = torch.randn(10, 7), torch.randn(10)
    packed = []  # the rows each kernel was built for

    def dispatch(holder, remove_weight):  # as vLLM's packed path: its own copy of the rows it is given
        rows = holder.weight.detach().clone()
        packed.append(rows.shape[0])
        holder.cpu_linear = lambda x, w, b: torch.nn.functional.linear(x, rows, b)

    choice = gg.LayerChoice(None, weight, FakeSide())
    choice.split_rows, choice.low_rows, choice.wide_rows = 5, low, wide
    choice.split_kernels(dispatch)
    x = torch.randn(3, 7)
    want = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(choice.cpu(x, weight, bias), want)
    parts = {"split": 1, "low": 2 if 0 < low < 5 else 1, "wide": 1}
    for kind in ("split", "low", "wide") if low or wide else ("split",):
        rows = choice.rows_of(kind)
        if not rows:
            continue
        got = choice.tail_of(kind)(x, bias[rows:])
        assert (len(got) if isinstance(got, tuple) else 1) == parts[kind], kind
        got = torch.cat(got, dim=-1) if isinstance(got, tuple) else got
        torch.testing.assert_close(got, want[:, rows:])
    assert sum(packed) == 10 + (10 - wide if wide > 5 else 0)  # the wide kind's rows are held twice, no others


def test_dispatch_untouched_outside_a_cpu_rank(monkeypatch):
    monkeypatch.setattr(gg, "_side", None)
    monkeypatch.delenv(settings.RANK_KIND, raising=False)
    layer = torch.nn.Linear(5, 3)

    def dispatch(layer, remove_weight):
        layer.cpu_linear = torch.nn.functional.linear

    gg.keep_gpu_choice(dispatch, None, (layer, True), {})
    assert layer.cpu_linear is torch.nn.functional.linear


def test_embedding_tables_keep_vllms_choice(monkeypatch):
    side = FakeSide()
    monkeypatch.setattr(gg, "_side", side)
    table = torch.nn.Linear(5, 3)

    def dispatch(layer, remove_weight):
        layer.cpu_linear = torch.nn.functional.linear

    gg.keep_gpu_choice(dispatch, None, (table,), {"remove_weight": False})
    assert table.cpu_linear is torch.nn.functional.linear and side.layers == []


def test_the_driver_sees_the_gpu_python_does_not(monkeypatch):
    """reveal_to_driver changes the C environment (what the CUDA driver reads) and nothing else."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    monkeypatch.setattr(gg, "_revealed_to_driver", False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    monkeypatch.delenv(settings.CPU_RANK_GPU, raising=False)
    gg.reveal_to_driver()  # not a CPU rank given a GPU: nothing changes
    assert libc.getenv(b"CUDA_VISIBLE_DEVICES") == b"-1" and not gg._revealed_to_driver
    monkeypatch.setenv(settings.CPU_RANK_GPU, "3")
    gg.reveal_to_driver()
    assert libc.getenv(b"CUDA_VISIBLE_DEVICES") == b"3" and gg._revealed_to_driver
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "-1"


def test_a_traced_model_keeps_the_choice_per_call(monkeypatch):
    """Dynamo traces the model once, with the batch size dynamic (as vLLM's DYNAMO_TRACE_ONCE): behind the
    custom op the choice is still made per call; traced as Python it would be frozen at the size seen."""
    side = FakeSide(min_tokens=4)
    monkeypatch.setattr(gg, "_side", side)
    monkeypatch.setattr(gg, "_model_compiles", lambda: True)
    layer = torch.nn.Linear(5, 3, bias=True)
    plain = layer.weight.detach().clone()
    cpu_calls = []

    def dispatch(layer, remove_weight):
        packed = layer.weight.detach().clone()

        def cpu(x, weight, bias):
            cpu_calls.append(x.shape[0])
            return torch.nn.functional.linear(x, packed, bias)

        layer.cpu_linear = cpu
        layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    gg.keep_gpu_choice(dispatch, None, (layer,), {"remove_weight": True})
    assert not isinstance(layer.cpu_linear, gg.LayerChoice) and side.layers[0].weight.shape == (3, 5)
    # vLLM drops every guard of its one trace (decorators.py / wrapper.py: skip_all_guards_unsafe)
    forward = torch.compile(lambda x: layer.cpu_linear(x, layer.weight, layer.bias) * 2, backend="eager",
                            fullgraph=True, dynamic=True,
                            options={"guard_filter_fn": lambda entries: [False for _ in entries]})
    for rows in (8, 1, 6, 2):
        x = torch.randn(rows, 5)
        torch.testing.assert_close(forward(x), 2 * torch.nn.functional.linear(x, plain, layer.bias))
    assert side.calls == [8, 6] and cpu_calls == [1, 2]


@pytest.mark.parametrize("cpu_gbps, copy_gbps, pct", [
    (55, 55, 50),   # equal rates: half each
    (103, 55, 35),  # a fast CPU side (the bound step's rate on an H100 machine): less on the GPU
    (89.5, 58, 39),  # the rates measured inside the engine on that machine
    (20, 55, 60),   # a slow CPU side: at most the range's top
    (400, 55, 30),  # a very fast one: at least the range's bottom
])
def test_the_automatic_share_balances_the_two_rates(cpu_gbps, copy_gbps, pct):
    assert weight_stream.balanced_share(cpu_gbps * 1e9, copy_gbps * 1e9, 30, 60) == pct


def test_the_automatic_share_needs_positive_rates():
    with pytest.raises(ValueError, match="rates must be positive"):
        weight_stream.balanced_share(0.0, 55e9, 30, 60)


class _Layer:
    """A layer as one_token_rate reads it: a weight and ``cpu(x, weight, bias)``, counting its calls."""

    def __init__(self, n, k):
        self.weight, self.calls = torch.randn(n, k), 0

    def cpu(self, x, weight, bias):
        self.calls += 1
        assert x.shape == (1, weight.shape[1]) and x.dtype == weight.dtype and bias is None
        return torch.nn.functional.linear(x, weight)


def test_the_one_token_rate_times_every_layer_with_one_token():
    layers = [_Layer(256, 128), _Layer(128, 256), _Layer(512, 128)]
    rate = gg.one_token_rate(layers, passes=2)
    assert all(layer.calls == 3 for layer in layers)  # one untimed pass, two timed
    assert 1e6 < rate < 1e13  # bytes/s of fp32 weights read on this machine


def test_an_automatic_split_takes_the_measured_share(monkeypatch):
    """``auto``: the served side's share comes from its layers' measured rate and the assumed copy
    rate; the wider split refuses it, and a fixed percentage keeps its meaning."""
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "auto")
    monkeypatch.delenv(settings.CPU_GEMM_SPLIT_WIDE, raising=False)
    assert settings.cpu_gemm_split_auto() and settings.cpu_gemm_split_pct() == settings.CPU_GEMM_SPLIT_MIDDLE_PCT
    side = gg.ServedSide(64, 1)
    monkeypatch.setattr(gg, "one_token_rate", lambda got: 110e9 if got is side.layers else 0.0)
    assert side.measured_share() == 33  # 55 / (110 + 55)
    monkeypatch.setattr(gg, "one_token_rate", lambda got: 1e9)
    assert side.measured_share() == settings.CPU_GEMM_SPLIT_AUTO_RANGE[1]
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT_WIDE, "8:60")
    with pytest.raises(HeteroConfigError, match="needs a fixed share"):
        settings.cpu_gemm_split_wide()
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "45")
    assert not settings.cpu_gemm_split_auto() and settings.cpu_gemm_split_pct() == 45


def test_adapt_takes_three_given_shares_or_its_own(monkeypatch):
    """``adapt:LOW,MIDDLE,HIGH``: the three shares adapt chooses from, MIDDLE the split's own and the
    others the low and wide rows'; ``adapt`` alone its own; anything else one error saying what to give."""
    monkeypatch.delenv(settings.CPU_GEMM_SPLIT_WIDE, raising=False)
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "adapt")
    assert settings.cpu_gemm_split_adapt_shares() == settings.CPU_GEMM_SPLIT_ADAPT_SHARES == (40, 50, 60)
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, " Adapt:50, 60,70 ")
    assert settings.cpu_gemm_split_adapt() and not settings.cpu_gemm_split_auto()
    assert settings.cpu_gemm_split_adapt_shares() == (50, 60, 70)
    assert settings.cpu_gemm_split_pct() == 60 and settings.cpu_gemm_split_other_shares() == (50, 0, 70)
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT_WIDE, "8:80")
    with pytest.raises(HeteroConfigError, match="needs a fixed share"):
        settings.cpu_gemm_split_wide()
    monkeypatch.delenv(settings.CPU_GEMM_SPLIT_WIDE)
    for bad, says in (("adapt:50,60", "give three whole percentages"), ("adapt:", "give three whole percentages"),
                      ("adapt:40,x,60", "give three whole percentages"), ("adapt:60,50,70", "must rise"),
                      ("adapt:0,50,60", "must rise"), ("adapt:50,60,95", "at most 90"), ("adapt:50,50,60", "must rise")):
        monkeypatch.setenv(settings.CPU_GEMM_SPLIT, bad)
        with pytest.raises(HeteroConfigError, match=says) as err:
            settings.check_environment()
        assert "e.g. HETERO_SHIM_CPU_GEMM_SPLIT=adapt:50,60,70" in str(err.value)
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "adapted")
    with pytest.raises(HeteroConfigError, match="adapt:LOW,MIDDLE,HIGH"):
        settings.cpu_gemm_split_pct()


def test_an_adapting_split_keeps_one_kind_a_step_and_reports_each_steps_cost(monkeypatch):
    """``adapt``: the served side asks its chooser once per step (a step: the span between two
    pipeline sends), uses that kind for all the step's splits, and records the step's split cost
    under it before choosing the next step's; the wider split refuses ``adapt``."""
    from hetero_shim.collectives import share_choice

    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "adapt")
    assert settings.cpu_gemm_split_adapt() and settings.cpu_gemm_split_pct() == settings.CPU_GEMM_SPLIT_MIDDLE_PCT
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT_WIDE, "8:60")
    with pytest.raises(HeteroConfigError, match="instead of HETERO_SHIM_CPU_GEMM_SPLIT=adapt"):
        settings.cpu_gemm_split_wide()
    side = gg.ServedSide(64, 1)
    side.client = type("Client", (), {"sends": 0})()
    side.chooser = share_choice.ShareChooser(("low", "split", "wide"), default=1, trials=1, revisit=1000)
    side.kind_pct = {"low": 40, "split": 50, "wide": 60}
    recorded = []
    record = side.chooser.record
    monkeypatch.setattr(side.chooser, "record", lambda t, k, s: (recorded.append((t, k, round(s, 3))), record(t, k, s)))
    x = torch.zeros(4, 8)
    kinds = []
    for step in range(7):
        side.client.sends = step
        kinds.append({side._step_kind(x) for _ in range(3)})  # three splits of one step
        side.step_cost += {"low": 0.01, "split": 0.02, "wide": 0.03}[next(iter(kinds[-1]))]
    assert kinds == [{"split"}, {"split"}, {"low"}, {"low"}, {"wide"}, {"wide"}, {"low"}]
    assert [k for _, k, _ in recorded] == ["split", "split", "low", "low", "wide", "wide"]
    assert all(t == 4 for t, _, _ in recorded) and recorded[0][2] == 0.02
    assert side.chooser.kept(4) == "low"
