"""The weight stream's ordering (collectives/weight_stream.py), on stand-in CUDA streams that run
what they queued only when a scheduler picks it, after every call was queued: the copy stream
whenever its waits allow (a piece overwritten before a GEMM read it shows), or the GEMM stream
whenever its waits allow (a GEMM that reads a piece before it arrived shows). Every result must equal one linear of the whole weight.
The stream on a real GPU runs in tests/gpu/test_pipeline.py."""

import types

import pytest

torch = pytest.importorskip("torch")

from hetero_shim.collectives import weight_stream  # noqa: E402

REAL_COPY = torch.Tensor.copy_
REAL_LINEAR = torch.nn.functional.linear


class Event:
    def __init__(self) -> None:
        self.recorded, self.done = 0, 0

    def record(self, stream) -> None:
        self.recorded += 1
        stream.ops.append(("record", self, self.recorded))


class Stream:
    def __init__(self, device=None, name="") -> None:
        self.ops, self.name = [], name

    def wait_event(self, event) -> None:
        if event.recorded:  # CUDA: waiting on an event never recorded waits for nothing
            self.ops.append(("wait", event, event.recorded))

    def synchronize(self) -> None:
        pass


class Gpu:
    """Streams made here, the current one, and the scheduler that runs what they queued."""

    def __init__(self, monkeypatch) -> None:
        self.streams, self.current, self.copies = [], None, 0
        gpu = self

        def make_stream(device=None):
            s = Stream(device)
            gpu.streams.append(s)
            return s

        def copy_(dst, src, non_blocking=False):
            if not non_blocking:
                return REAL_COPY(dst, src)
            gpu.copies += 1
            gpu.current.ops.append(("run", lambda: REAL_COPY(dst, src)))
            return dst

        def linear(x, w, b=None):
            out = torch.full((x.shape[0], w.shape[0]), float("nan"))
            gpu.current.ops.append(("run", lambda: REAL_COPY(out, REAL_LINEAR(x, w, b))))
            return out

        monkeypatch.setattr(torch.cuda.streams, "Stream", make_stream)
        monkeypatch.setattr(torch.cuda.streams, "Event", Event)
        monkeypatch.setattr(torch.cuda, "set_stream", lambda s: setattr(gpu, "current", s))
        monkeypatch.setattr(torch.Tensor, "copy_", copy_)
        monkeypatch.setattr(torch.nn.functional, "linear", linear)

    def drain(self, first) -> None:
        """Run every queued op, stream ``first`` whenever its next op may run."""
        while any(s.ops for s in self.streams):
            ready = [s for s in self.streams if s.ops and (s.ops[0][0] != "wait" or s.ops[0][1].done >= s.ops[0][2])]
            assert ready, "deadlock: every stream waits on an event no stream will record"
            op = (first if first in ready else ready[0]).ops.pop(0)
            if op[0] == "run":
                op[1]()
            elif op[0] == "record":
                op[1].done = max(op[1].done, op[2])


def make_layers(shapes, chunk_rows):
    torch.manual_seed(0)
    layers = []
    for i, (n, k) in enumerate(shapes):
        w = torch.randn(n, k)
        layers.append(types.SimpleNamespace(weight=w, index=i, pieces=weight_stream.row_pieces(n, k * 4, chunk_rows * k * 4)))
    return layers


def run_calls(monkeypatch, ahead, order, first, rings=None):
    gpu = Gpu(monkeypatch)
    layers = make_layers([(40, 16), (24, 16), (64, 16), (8, 16)], chunk_rows=16)
    slot = max((end - a) * 16 * 4 for layer in layers for a, end in layer.pieces)
    streamer = weight_stream.WeightStreamer("cpu", layers, slot, rings, ahead)
    gpu.current = streamer.stream
    results = []
    for index in order:
        layer = layers[index]
        x = torch.randn(3, 16)
        parts = []
        streamer.multiply(x, layer, None, lambda a, b, part: parts.append((a, b, part)))
        results.append((x, layer, parts, len(streamer.queued)))
    gpu.drain(streamer.copies if first == "copy" else streamer.stream)
    for x, layer, parts, _ in results:
        assert [(a, b) for a, b, _ in parts] == layer.pieces
        got = torch.cat([p for _, _, p in parts], dim=1)
        torch.testing.assert_close(got, REAL_LINEAR(x, layer.weight))
    return streamer, results, gpu.copies


@pytest.mark.parametrize("first", ["copy", "gemm"])
@pytest.mark.parametrize("ahead", [1, 2, 3, 5])
def test_results_equal_whole_weight_linear_in_call_order(monkeypatch, ahead, first):
    streamer, results, _ = run_calls(monkeypatch, ahead, [0, 1, 2, 3] * 3, first)
    assert len(streamer.slots) == ahead + 1
    assert all(queued == ahead for *_, queued in results)  # each call leaves `ahead` pieces on their way


@pytest.mark.parametrize("first", ["copy", "gemm"])
@pytest.mark.parametrize("ahead", [1, 3])
def test_out_of_order_calls_and_rings_start_over_and_stay_right(monkeypatch, ahead, first):
    # rings (2, 2): layers 0-1 and 2-3 each called in their own order; switching rings, repeating a
    # layer or skipping one finds other pieces queued
    run_calls(monkeypatch, ahead, [0, 1, 0, 2, 3, 2, 1, 1, 3, 0], first, rings=(2, 2))


def test_a_ring_with_fewer_pieces_than_ahead_queues_each_piece_once(monkeypatch):
    # layer 3 alone is a ring of one piece: its next piece is itself, queued once however far ahead
    _, results, _ = run_calls(monkeypatch, 5, [3, 3, 3, 0, 1, 2], "copy", rings=(3, 1))
    assert results[0][3] == 1 and results[3][3] == 5


def test_calls_in_order_copy_each_piece_once(monkeypatch):
    streamer, _, copies = run_calls(monkeypatch, 3, [0, 1, 2, 3] * 2, "gemm")
    pieces = sum(len(layer.pieces) for layer in streamer.layers)  # 10: 3 + 2 + 4 + 1
    assert copies == 2 * pieces + 3  # the two rounds, and three pieces of the next on their way


@pytest.mark.parametrize("raw, ahead", [(None, 1), ("", 1), ("1", 1), ("4", 4), ("8", 8)])
def test_ahead_setting(monkeypatch, raw, ahead):
    from hetero_shim import settings

    if raw is None:
        monkeypatch.delenv(settings.CPU_GEMM_AHEAD, raising=False)
    else:
        monkeypatch.setenv(settings.CPU_GEMM_AHEAD, raw)
    assert settings.cpu_gemm_ahead() == ahead


@pytest.mark.parametrize("raw", ["0", "9", "two", "-1"])
def test_bad_ahead_is_one_clear_error(monkeypatch, raw):
    from hetero_shim import settings
    from hetero_shim.errors import HeteroConfigError

    monkeypatch.setenv(settings.CPU_GEMM_AHEAD, raw)
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_CPU_GEMM_AHEAD=.*1 to 8"):
        settings.cpu_gemm_ahead()


LLAMA_3B = [(5120, 3072 * 2), (3072, 3072 * 2), (16384, 3072 * 2), (3072, 8192 * 2)]  # qkv, o, gate_up, down


def test_every_layer_split_by_default():
    assert weight_stream.split_plan(LLAMA_3B, 50) == [2560, 1536, 8192, 1536]
    assert weight_stream.split_plan(LLAMA_3B, 0, large_only=True) == [0, 0, 0, 0]
    assert weight_stream.split_rows(100, 50) == 0  # either side would get less than a block


def test_large_only_keeps_the_gpu_ranks_share_of_all_the_bytes():
    plan = weight_stream.split_plan(LLAMA_3B * 2, 50, large_only=True)
    assert plan[:4] == plan[4:] and plan[0] == plan[1] == 0  # qkv and o whole on the CPU
    gate_up, down = plan[2], plan[3]
    assert gate_up % 64 == 0 and down % 64 == 0
    total = sum(n * row for n, row in LLAMA_3B)
    served = gate_up * 3072 * 2 + down * 8192 * 2
    assert 0.49 <= served / total <= 0.5  # 2/3 of gate_up's and down's rows, rounded down to blocks
    assert gate_up == 10880 and down == 2048
    # a share above the most the CPU may give away is capped at it
    capped = weight_stream.split_plan(LLAMA_3B, 80, large_only=True, max_pct=90)
    assert capped[2] == 16384 * 90 // 100 // 64 * 64 and capped[3] == 3072 * 90 // 100 // 64 * 64
