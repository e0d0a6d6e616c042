"""The bench's request timings of the CPU stage's channel to the next stage's GPU rank: which steps
are timed, what is recorded around the real channel (the server standing in on the CPU), and how a
wait is cut into the server's phases (bench/breakdown/hsbench_channel.py, bench/channel.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
wrapt = pytest.importorskip("wrapt")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "breakdown"))
sys.path.insert(0, str(ROOT))

import hsbench_channel  # noqa: E402

from bench import breakdown, channel  # noqa: E402
from hetero_shim.collectives import gemm_channel as gc  # noqa: E402
from hetero_shim.collectives import gemm_queue, gemm_server  # noqa: E402
from hetero_shim.collectives import weight_stream  # noqa: E402


def _rec(what, request, step, t0, t1, tokens=1):
    return [what, request, step, tokens, t0, t1]


def test_a_wait_is_cut_into_the_servers_phases():
    # request 1: published at 0, the CPU's own rows until 3, waits until 10;
    # the server picks it up at 2, queues 4..6, answers at 9; the CPU sees it at 10
    client = [_rec("start", 1, 5, -1, 0), _rec("wait", 1, 5, 3, 10), _rec("finish", 1, 5, 3, 11)]
    server = [_rec("serve", 1, 5, 2, 9), _rec("queue", None, 5, 4, 6)]
    # request 2, same step: answered before the CPU waits (no wait)
    client += [_rec("start", 2, 5, 20, 21), _rec("wait", 2, 5, 30, 30), _rec("finish", 2, 5, 30, 30.5)]
    server += [_rec("serve", 2, 5, 22, 25), _rec("queue", None, 5, 23, 24)]
    row = channel.summarize([[*r[:4], r[4] / 1e3, r[5] / 1e3] for r in client],
                            [[*r[:4], r[4] / 1e3, r[5] / 1e3] for r in server])[1]
    assert row["steps"] == 1 and row["requests_per_step"] == 2
    assert row["wait_ms"] == pytest.approx(7.0)
    assert row["wait_in_ms"] == pytest.approx({"pick-up": 0.0, "prepare": 1.0, "queue": 2.0, "GPU": 3.0,
                                               "notice": 1.0})
    assert sum(row["wait_in_ms"].values()) == pytest.approx(row["wait_ms"])
    assert row["own_ms"] == pytest.approx(3.0 + 9.0) and row["join_ms"] == pytest.approx(1.0 + 0.5)
    assert row["median_us"]["pick-up"] == pytest.approx(1500.0)  # 2 and 1 ms


def test_a_stand_in_server_has_one_serving_phase():
    client = [_rec("start", 1, 0, 0, 1), _rec("wait", 1, 0, 1, 5), _rec("finish", 1, 0, 5, 5)]
    server = [_rec("serve", 1, 0, 2, 4)]
    row = channel.summarize(client, server)[1]
    assert set(row["wait_in_ms"]) == {"pick-up", "serve", "notice"}
    assert sum(row["wait_in_ms"].values()) == pytest.approx(row["wait_ms"])


def test_a_request_queued_before_it_came_is_one_phase():
    """No serve record for a request of a step the server timed: the server queued it (its host not
    involved); its whole wait is "queued". The serve that queued it answered when it began queuing.
    A request of a step the server did not time is left out."""
    # request 1: answered at 3.5, then the serve queued the step's later requests until 9
    client = [_rec("start", 1, 0, 0, 1), _rec("wait", 1, 0, 1, 5), _rec("finish", 1, 0, 5, 5)]
    server = [_rec("serve", 1, 0, 2, 9), _rec("ahead", 2, 0, 3.5, 9)]
    client += [_rec("start", 2, 0, 6, 7), _rec("wait", 2, 0, 8, 10), _rec("finish", 2, 0, 10, 11)]
    client += [_rec("start", 3, 1, 20, 21), _rec("wait", 3, 1, 22, 30), _rec("finish", 3, 1, 30, 31)]
    row = channel.summarize(client, server)[1]
    assert row["steps"] == 1 and row["requests_per_step"] == 2
    assert row["wait_in_ms"]["queued"] == pytest.approx(2e3) and row["median_us"]["queued"] == pytest.approx(3e6)
    assert row["wait_in_ms"]["serve"] == pytest.approx(1.5e3) and row["wait_in_ms"]["notice"] == pytest.approx(1.5e3)
    assert sum(row["wait_in_ms"].values()) == pytest.approx(row["wait_ms"])


class _Layer:
    def __init__(self, weight):
        self.weight = weight


def test_the_timed_steps_of_the_real_channel_are_written(tmp_path, monkeypatch):
    # requests served one at a time as they come; the queue's phases: test_gemm_channel's queue tests
    monkeypatch.setenv("HETERO_SHIM_CPU_GEMM_QUEUE_STEP", "0")
    class Client(gc.GemmClient):
        pass

    class Server(gemm_server.GemmServer):
        pass

    class Queue(gemm_queue.StepQueue):
        pass

    module = type("module", (), {"GemmClient": Client, "GemmServer": Server, "StepQueue": Queue})
    timer = hsbench_channel.ChannelTimer(breakdown.hook.WindowCounter([(None, 1, 2)]), str(tmp_path / "1.channel.json"))
    installed = []
    hsbench_channel.install(timer, lambda fn, name: installed.append(name) or (fn(module) if "gemm" in name else None),
                            lambda fn, what: fn)
    assert installed == ["hetero_shim.collectives.gemm_channel", "hetero_shim.collectives.gemm_server",
                         "hetero_shim.collectives.gemm_queue", "hetero_shim.collectives.weight_stream"]

    layers = [_Layer(torch.randn(64, 32)), _Layer(torch.randn(128, 64))]
    weight_stream.cut_into_pieces(layers, None)
    for layer in layers:
        layer.split_rows = layer.weight.shape[0] // 2
        layer.split_pieces = weight_stream.row_pieces(layer.split_rows, layer.weight.shape[1] * 4, None)
    client = Client(layers, max_tokens=4, rank=90)
    try:
        server = Server(client.path, torch.device("cpu"))
        for step in range(4):
            timer.begin_step(step, 3)
            for index, layer in enumerate(layers):
                x = torch.randn(3, layer.weight.shape[1])
                rows = layer.split_rows
                client.start(x, index, None, split=True)
                assert server._serve(client.requests)
                got = client.finish(x, index, tail=x @ layer.weight[rows:].T)
                torch.testing.assert_close(got, x @ layer.weight.T)
            timer.end_step()
    finally:
        client.close()

    written = json.loads((tmp_path / "1.channel.json").read_text())
    assert written["windows"] == [[None, 1, 2]]
    records = written["records"]
    assert {r[2] for r in records} == {1, 2}  # steps 0 and 3 not timed
    assert sorted({r[0] for r in records}) == ["finish", "serve", "start", "wait"]
    assert [r[1] for r in records if r[0] == "start"] == [3, 4, 5, 6]  # requests of steps 1 and 2
    summary = channel.summarize(records, records)
    assert summary[3]["steps"] == 2 and summary[3]["requests_per_step"] == 2
    assert set(summary[3]["wait_in_ms"]) == {"pick-up", "serve", "notice"}


def test_the_channel_clients_cost_per_request_is_measured(tmp_path):
    """bench/channel_client.py times the client's start and finish over real segments (no peer, the
    answer already there) and writes one row per token count."""
    from bench import channel_client

    out = tmp_path / "client.json"
    assert channel_client.main(["--shapes", "96x32,40x96", "--tokens", "1,3", "--repeats", "20",
                                "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [row["tokens"] for row in got["rows"]] == [1, 3]
    assert all(row["us_per_request"] > 0 and row["requests"] == 40 for row in got["rows"])
    assert got["share"] == 50 and got["shapes"] == [[96, 32], [40, 96]]
