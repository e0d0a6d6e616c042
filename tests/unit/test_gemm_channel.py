"""The channel through which the next pipeline stage's rank computes a CPU stage's large linear layers
and takes its activations (hetero_shim/collectives/gemm_channel.py, gemm_server.py, stage_handover.py): who serves
whom, and the protocol between two real processes (the server standing in on the CPU, as on machines
without a GPU)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

torch = pytest.importorskip("torch")

from hetero_shim.collectives import gemm_channel as gc  # noqa: E402
from hetero_shim.collectives import gemm_server  # noqa: E402
from hetero_shim.collectives import stage_handover as sh  # noqa: E402
from hetero_shim.collectives import weight_stream  # noqa: E402
from hetero_shim.planning.plan import RankPlan  # noqa: E402

SHAPES = ((96, 32), (40, 96), (7, 32))  # (out, in); a 1 KiB chunk cuts the first two into pieces
SPLIT = (40, 8, 0)  # leading rows the server computes in a split request (its pieces cut by the same chunk)
STEPS = 3


def test_the_next_stages_gpu_rank_serves_a_cpu_stage():
    cpu_first = RankPlan(world_size=2, gpu_ranks=1, cpu_first=True, pp_size=2, layers=(12, 20))
    assert gc.server_rank(cpu_first, 0) == 1 and gc.client_rank(cpu_first, 1) == 0
    assert gc.server_rank(cpu_first, 1) is None and gc.client_rank(cpu_first, 0) is None
    gpu_first = RankPlan(world_size=2, gpu_ranks=1, pp_size=2, layers=(20, 12))
    assert gc.server_rank(gpu_first, 1) is None and gc.client_rank(gpu_first, 1) is None
    # TP=2 per stage: each CPU rank is served by the GPU rank of its TP index
    wide = RankPlan(world_size=4, gpu_ranks=2, cpu_first=True, pp_size=2, layers=(12, 20))
    assert [gc.server_rank(wide, r) for r in range(4)] == [2, 3, None, None]
    assert [gc.client_rank(wide, r) for r in range(4)] == [None, None, 0, 1]
    all_cpu = RankPlan(world_size=2, gpu_ranks=0, pp_size=2, layers=(1, 1))
    assert gc.client_rank(all_cpu, 1) is None and gc.client_rank(all_cpu, 1, stand_in=True) == 0
    assert gc.server_rank(RankPlan(world_size=2, gpu_ranks=1), 1) is None  # tensor parallelism: nobody


class _Layer:
    def __init__(self, weight):
        self.weight = weight


def _weights():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, k, generator=gen) for n, k in SHAPES]


def _client(queue, kill_server_after: int | None):
    gen = torch.Generator().manual_seed(1)
    layers = [_Layer(w) for w in _weights()]
    weight_stream.cut_into_pieces(layers, 1024)
    split = SPLIT if kill_server_after is None else (0,) * len(SHAPES)
    for layer, rows in zip(layers, split):
        layer.split_rows = rows
        layer.split_pieces = weight_stream.row_pieces(rows, layer.weight.shape[1] * 4, 1024) if rows else []
    client = sh.open_client(layers, max_tokens=16, rank=0)
    worst, failure, handed = 0.0, None, []
    try:
        for step in range(STEPS):
            for index, w in enumerate(_weights()):
                if kill_server_after is not None and step * len(SHAPES) + index == kill_server_after:
                    queue.put(("kill", None))
                    time.sleep(0.2)
                x = torch.randn(2, 5, w.shape[1], generator=gen)
                bias = torch.randn(w.shape[0], generator=gen) if index != 1 else None
                got = client.linear(x, index, bias)
                want = torch.nn.functional.linear(x, w, bias)
                assert got.shape == want.shape
                worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
                rows = split[index]
                if rows:  # a small step's split: the leading rows asked for, the answer awaited later
                    m, n = x.numel() // w.shape[1], w.shape[0]
                    y = client.seg.region("y", m * n * 4, torch.float32)
                    y.fill_(float("nan"))
                    client.start(x, index, None if bias is None else bias[:rows], split=True)
                    got = client.finish(x, index)
                    want = want[..., :rows]
                    assert got.shape == want.shape
                    assert bool(y[m * rows:].isnan().all()), "the server computed rows that were not asked for"
                    worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
                    # the split as a CPU rank runs it: the other rows computed here, joined after the answer
                    client.start(x, index, None if bias is None else bias[:rows], split=True)
                    tail = torch.nn.functional.linear(x, w[rows:], None if bias is None else bias[rows:])
                    got = client.finish(x, index, tail=tail)
                    want = torch.nn.functional.linear(x, w, bias)
                    assert got.shape == want.shape and bool((got[..., rows:] == tail).all())
                    worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            handed.append(sh.before_send(_activations(step), vllm_only=False))
    except RuntimeError as exc:
        failure = str(exc)
    queue.put(("done", {"worst": worst, "failure": failure, "requests": client.requests, "handed": handed,
                        "file_left": os.path.exists(client.path)}))


def _activations(step: int) -> dict:
    """A step's intermediate tensors as a CPU stage sends them (bf16 like a real run, plus a plain value)."""
    gen = torch.Generator().manual_seed(100 + step)
    return {"hidden_states": torch.randn(step + 1, 24, generator=gen).to(torch.bfloat16),
            "residual": torch.randn(step + 1, 24, generator=gen), "aux": step}


def _server(queue):
    plan = RankPlan(world_size=2, gpu_ranks=0, pp_size=2, layers=(1, 1))
    deadline = time.monotonic() + 30
    while gc.find_client(0) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    received = []
    for step in range(STEPS):
        got = sh.before_receive(plan, 1, torch.device("cpu"), stand_in=True)
        want = _activations(step)
        received.append(None if got is None else (
            got.keys() == want.keys() and got["aux"] == step
            and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in ("hidden_states", "residual"))))
    queue.put(("served", sh._server.answered if sh._server else None))
    queue.put(("received", received))


def _run(kill_server_after=None):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    client = ctx.Process(target=_client, args=(queue, kill_server_after))
    server = ctx.Process(target=_server, args=(queue,))
    client.start()
    server.start()
    got = {}
    try:
        while "done" not in got or ("received" not in got and "kill" not in got):
            kind, value = queue.get(timeout=60)
            got[kind] = value
            if kind == "kill":
                server.kill()
    finally:
        client.join(30)
        server.join(30)
        for p in (client, server):
            if p.is_alive():
                p.kill()
    return got


def test_a_cpu_stage_gets_its_layers_computed_by_the_next_stage():
    """Every piece of every layer, with and without bias, over three steps, equals F.linear; the
    server returns after each step's send; the steps' activations arrive whole through the segment
    once the server is there (the first may precede it: then it goes over gloo, both sides agree);
    nothing is left in /dev/shm."""
    got = _run()
    done = got["done"]
    assert done["failure"] is None
    assert done["worst"] < 1e-6  # float32, each piece one GEMM of its rows
    requests = STEPS * (len(SHAPES) + 2 * sum(1 for rows in SPLIT if rows))  # whole, split, split and tail
    assert done["requests"] == requests and got["served"] == requests
    assert [r is not None for r in got["received"]] == done["handed"]
    assert all(r for r in got["received"] if r is not None) and done["handed"][1:] == [True] * (STEPS - 1)
    assert not done["file_left"]


def test_a_lost_server_is_noticed_and_the_client_says_so():
    """The server process killed mid-step: the client's next call fails within a second (the caller
    then computes on the CPU), instead of waiting for its timeout."""
    start = time.monotonic()
    got = _run(kill_server_after=4)
    done = got["done"]
    assert done["failure"] and "gone" in done["failure"]
    assert done["requests"] == 5
    assert time.monotonic() - start < 30


def test_a_name_file_left_by_a_killed_cpu_rank_is_swept():
    """The file naming a segment carries its creator's pid where collectives.sweep looks: once that
    process is gone, the sweep at the next run's planning removes it."""
    import subprocess

    from hetero_shim.collectives import sweep

    proc = subprocess.Popen(["true"])  # a pid that has exited
    proc.wait()
    path = gc.path_for(0, client_pid=proc.pid)
    with open(path, "w") as f:
        f.write("1 2 3 4")
    try:
        assert path in [str(p) for p in sweep.orphans()]
        live = gc.path_for(0)  # this process: alive, so kept
        with open(live, "w") as f:
            f.write("1 2 3 4")
        assert live not in [str(p) for p in sweep.orphans()]
    finally:
        for name in (path, gc.path_for(0)):
            if os.path.exists(name):
                os.unlink(name)


def test_a_stalled_peer_fails_the_step_within_the_gloo_timeout(monkeypatch):
    """Both waits of the hand-over are bounded as a gloo send or receive would be: a peer that is
    alive but sends (or takes) nothing fails the step after HETERO_SHIM_GLOO_TIMEOUT_S, naming it."""
    monkeypatch.setenv("HETERO_SHIM_GLOO_TIMEOUT_S", "1")
    layers = [_Layer(w) for w in _weights()]
    weight_stream.cut_into_pieces(layers, 1024)
    client = gc.GemmClient(layers, max_tokens=4, rank=7)
    try:
        server = gemm_server.GemmServer(client.path, torch.device("cpu"))
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"sent no step within 1 s \(HETERO_SHIM_GLOO_TIMEOUT_S\)"):
            server.serve_until(client.seg.words[gc.SENDS] + 1)
        with pytest.raises(RuntimeError, match=r"took no step's activations within 1 s"):
            client.wait_taken(client.seg.words[gc.TAKEN] + 1)
        assert time.monotonic() - start < 10
    finally:
        client.close()


QSHAPES = ((96, 32), (40, 96), (64, 40), (32, 64))  # four split layers, called in this order by a step
QSPLIT = (40, 8, 16, 16)
FULL = (0, 1, 2, 3)


def _split_layers(seed: int) -> tuple[torch.Generator, list, list]:
    """(the generator, the QSHAPES weights, layers of copies of them split at QSPLIT in 1 KiB pieces)."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, k, generator=gen) for n, k in QSHAPES]
    layers = [_Layer(w.clone()) for w in weights]
    weight_stream.cut_into_pieces(layers, 1024)
    for layer, rows in zip(layers, QSPLIT):
        layer.split_rows = rows
        layer.split_pieces = weight_stream.row_pieces(rows, layer.weight.shape[1] * 4, 1024)
    return gen, weights, layers


def _queued_client(queue, orders):
    gen, weights, layers = _split_layers(2)
    client = sh.open_client(layers, max_tokens=16, rank=0)
    worst, queued, failure = 0.0, [], None
    try:
        for step, order in enumerate(orders):
            flags = []
            for index in order:
                w, rows = weights[index], QSPLIT[index]
                x = torch.randn(3, w.shape[1], generator=gen)
                bias = torch.randn(w.shape[0], generator=gen) if index % 2 == 0 else None
                client.start(x, index, None if bias is None else bias[:rows], split=True)
                flags.append(client.queued)
                tail = torch.nn.functional.linear(x, w[rows:], None if bias is None else bias[rows:])
                got = client.finish(x, index, tail=tail)
                want = torch.nn.functional.linear(x, w, bias)
                worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            queued.append(flags)
            sh.before_send(_activations(step), vllm_only=False)
    except RuntimeError as exc:
        failure = str(exc)
    queue.put(("done", {"worst": worst, "queued": queued, "failure": failure}))


def _queued_server(queue, steps):
    plan = RankPlan(world_size=2, gpu_ranks=0, pp_size=2, layers=(1, 1))
    deadline = time.monotonic() + 30
    while gc.find_client(0) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(steps):
        sh.before_receive(plan, 1, torch.device("cpu"), stand_in=True)
    ahead = sh._server.ahead
    queue.put(("served", {"queued": ahead.queued, "on": ahead.on}))


def _run_queued(orders):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_queued_client, args=(queue, orders)),
             ctx.Process(target=_queued_server, args=(queue, len(orders)))]
    for p in procs:
        p.start()
    got = {}
    try:
        while len(got) < 2:
            kind, value = queue.get(timeout=60)
            got[kind] = value
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return got


@pytest.mark.parametrize("odd_step, why", [((0, 2, 1, 3), "out of order"), ((0, 1), "ends early")])
def test_a_steps_split_requests_are_queued_before_they_come(monkeypatch, odd_step, why):
    """HETERO_SHIM_CPU_GEMM_QUEUE_STEP=1: from the second step on, every split request after a step's
    first goes through the server's queue (GO/DONE), and each result equals F.linear. A step whose
    requests are not the predicted ones (another order; fewer than queued) still gets exact results,
    and from then on every request is served as it comes."""
    monkeypatch.setenv("HETERO_SHIM_CPU_GEMM_QUEUE_STEP", "1")
    orders = [FULL, FULL, FULL, odd_step, FULL]
    got = _run_queued(orders)
    done = got["done"]
    assert done["failure"] is None
    assert done["worst"] < 1e-6
    assert done["queued"][0] == [False] * 4  # no layer's bias seen yet
    assert done["queued"][1] == done["queued"][2] == [False, True, True, True]
    assert not any(done["queued"][3][1:]) if why == "out of order" else done["queued"][3] == [False, True]
    assert done["queued"][4] == [False] * 4
    assert got["served"]["on"] is False
    assert got["served"]["queued"] == 3 * 3


def test_a_queued_request_that_fails_is_not_taken_for_an_answer(monkeypatch):
    """The server's queue fails computing a queued request (its thread, as on the stand-in): the
    client's wait for it ends with the failure (its caller then computes on the CPU), not with the
    rows left in shared memory; the server stops serving and its queue is released."""
    import threading

    monkeypatch.setenv("HETERO_SHIM_CPU_GEMM_QUEUE_STEP", "1")
    gen, weights, layers = _split_layers(3)
    client = gc.GemmClient(layers, max_tokens=4, rank=9)
    server = gemm_server.GemmServer(client.path, torch.device("cpu"))
    computed = []
    real = server._compute_head

    def compute_head(index, m, with_bias, kind=0):
        computed.append(index)
        if len(computed) == 2:
            raise RuntimeError("injected")
        real(index, m, with_bias)

    server.ahead.compute = compute_head
    outcomes = []
    try:
        for step in (1, 2):
            serving = threading.Thread(target=server.serve_until, args=(step,))
            serving.start()
            for index in FULL:
                x = torch.randn(2, weights[index].shape[1], generator=gen)
                try:
                    client.start(x, index, None, split=True)
                    queued = client.queued
                    got = client.finish(x, index)
                    outcomes.append((step, index, queued, bool(torch.allclose(
                        got, torch.nn.functional.linear(x, weights[index][:QSPLIT[index]]), atol=1e-5))))
                except RuntimeError as exc:
                    outcomes.append((step, index, client.queued, str(exc)))
            client.publish_sends(step)
            serving.join(10)
            assert not serving.is_alive()
    finally:
        client.close()
    assert [o[:3] for o in outcomes[:4]] == [(1, i, False) for i in FULL] and all(o[3] is True for o in outcomes[:4])
    assert outcomes[4] == (2, 0, False, True) and outcomes[5] == (2, 1, True, True)
    assert outcomes[6][:3] == (2, 2, True) and "failed to compute" in outcomes[6][3]
    assert "stopped computing" in outcomes[7][3]  # the client's next call: nothing more asked of the server
    assert not server.serving and not server.ahead.on


def _split_steps(client, server, gen, weights, steps) -> tuple[list[int], float, list[list[bool]]]:
    """Pipeline steps of split requests of the FULL layers, each ``(tokens, kind)`` (kind None: as the
    token count says), served by ``server`` on a thread until the step's send; the CPU's rows joined as
    two kernels' parts. Returns the rows asked for, the worst relative error against F.linear, and per
    step whether each request went through the server's queue. Closes the client."""
    import threading

    asked, worst, queued = [], 0.0, []
    try:
        for step, (tokens, kind) in enumerate(steps, start=1):
            serving = threading.Thread(target=server.serve_until, args=(step,))
            serving.start()
            flags = []
            for index in FULL:
                w = weights[index]
                x = torch.randn(tokens, w.shape[1], generator=gen)
                bias = torch.randn(w.shape[0], generator=gen) if index % 2 == 0 else None
                chosen = client.start(x, index, bias, split=True, kind=kind)
                assert kind is None or chosen == kind
                rows = client.seg.table["layers"][index][chosen]
                asked.append(rows)
                flags.append(client.queued)
                mid = rows + (w.shape[0] - rows) // 2
                tail = tuple(torch.nn.functional.linear(x, w[a:b], None if bias is None else bias[a:b])
                             for a, b in ((rows, mid), (mid, w.shape[0])))
                got = client.finish(x, index, tail=tail)
                want = torch.nn.functional.linear(x, w, bias)
                assert got.shape == want.shape
                worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            queued.append(flags)
            client.publish_sends(step)
            serving.join(10)
            assert not serving.is_alive()
    finally:
        client.close()
    return asked, worst, queued


QWIDE = (64, 16, 16, 24)  # HETERO_SHIM_CPU_GEMM_SPLIT_WIDE's rows: more of each layer (the third: as many)


def test_larger_small_steps_split_at_the_wide_rows(monkeypatch):
    """With wide rows in the table, a split of a step of at least ``wide_tokens`` tokens asks for
    them (both sides pick by the token count), narrower steps for the split rows; each step's
    requests after its first are queued at the rows of its own size, and every result, the CPU's
    rows joined as two parts, equals F.linear."""
    monkeypatch.setenv("HETERO_SHIM_CPU_GEMM_QUEUE_STEP", "1")
    gen, weights, layers = _split_layers(4)
    for layer, rows in zip(layers, QWIDE):
        layer.wide_rows = rows
        layer.wide_pieces = weight_stream.row_pieces(rows, layer.weight.shape[1] * 4, 1024)
    client = gc.GemmClient(layers, max_tokens=16, rank=11, wide_tokens=6)
    server = gemm_server.GemmServer(client.path, torch.device("cpu"))
    asked, worst, queued = _split_steps(client, server, gen, weights, [(t, None) for t in (3, 8, 8, 3, 6, 2)])
    narrow, wide = list(QSPLIT), list(QWIDE)
    assert asked == narrow + wide + wide + narrow + wide + narrow
    assert worst < 1e-6
    assert queued[0] == [False] * 4 and all(flags == [False, True, True, True] for flags in queued[1:])
    assert server.serving and server.ahead.on


QLOW = (24, 8, 8, 8)  # HETERO_SHIM_CPU_GEMM_SPLIT=adapt's smaller share (the second: as many as the split's)


def test_the_client_chooses_each_steps_rows_and_the_server_follows(monkeypatch):
    """With three kinds of leading rows in the table (``adapt``), the client names a kind for each
    step and the server computes those rows, also for the requests it queued after the step's first:
    each step's requests after its first are queued at its own kind, a step of another kind than the
    last is served as well, and every result, the CPU's rows joined as two parts, equals F.linear."""
    monkeypatch.setenv("HETERO_SHIM_CPU_GEMM_QUEUE_STEP", "1")
    gen, weights, layers = _split_layers(5)
    for layer, low, wide in zip(layers, QLOW, QWIDE):
        layer.wide_rows, layer.low_rows = wide, low
        layer.wide_pieces = weight_stream.row_pieces(wide, layer.weight.shape[1] * 4, 1024)
        layer.low_pieces = weight_stream.row_pieces(low, layer.weight.shape[1] * 4, 1024)
    client = gc.GemmClient(layers, max_tokens=16, rank=12)
    server = gemm_server.GemmServer(client.path, torch.device("cpu"))
    assert set(server.kinds) == {"split", "wide", "low"}
    kinds = ("split", "low", "low", "wide", "split", "wide", "low")
    asked, worst, queued = _split_steps(client, server, gen, weights, [(3, kind) for kind in kinds])
    by_kind = {"split": list(QSPLIT), "wide": list(QWIDE), "low": list(QLOW)}
    assert asked == [rows for kind in kinds for rows in by_kind[kind]]
    assert worst < 1e-6
    assert queued[0] == [False] * 4 and all(flags == [False, True, True, True] for flags in queued[1:])
    assert server.serving and server.ahead.on


def test_a_kind_the_table_lacks_fails_the_request_not_the_process():
    """A request naming a kind of rows the table has no entry for (a client and server that disagree)
    makes the server stop serving with a logged failure; the client's wait raises, so its rank
    computes on the CPU from then on."""
    import threading

    gen, weights, layers = _split_layers(6)
    client = gc.GemmClient(layers, max_tokens=16, rank=13)
    server = gemm_server.GemmServer(client.path, torch.device("cpu"))
    assert set(server.kinds) == {"split"}
    try:
        serving = threading.Thread(target=server.serve_until, args=(1,))
        serving.start()
        w = weights[0]
        x = torch.randn(2, w.shape[1], generator=gen)
        client.start(x, 0, None, split=True)
        client.seg.words[gc.KIND] = gc.KINDS.index("wide")  # as a client of another kind would ask
        client.seg.words[gc.REQUEST] = client.requests + 1
        client.requests += 1
        client.seg.bell.ring()
        with pytest.raises(RuntimeError, match="failed to compute"):
            client.finish(x, 0)
        client.publish_sends(1)
        serving.join(10)
        assert not serving.is_alive() and not server.serving
    finally:
        client.close()


def test_a_split_answer_is_joined_right_for_every_token_count_and_input_shape():
    """The client keeps a small step's region views per layer, kind and token count: steps of changing
    sizes, with inputs of one, two and three dimensions, each get F.linear's result. The server's part
    is computed here, piece by piece into the answer region, as the CPU stand-in computes it."""
    linear = torch.nn.functional.linear
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(n, k, generator=gen) for n, k in SHAPES]
    layers = [_Layer(w.clone()) for w in weights]
    weight_stream.cut_into_pieces(layers, 1024)
    for layer, rows in zip(layers, SPLIT):
        layer.split_rows = rows
        layer.split_pieces = weight_stream.row_pieces(rows, layer.weight.shape[1] * 4, 1024) if rows else []
    client = gc.GemmClient(layers, max_tokens=16, rank=0)
    try:
        for m, dims in ((1, 1), (3, 2), (1, 2), (2, 3), (3, 2), (1, 1), (2, 2)):
            for index, (weight, rows) in enumerate(zip(weights, SPLIT)):
                if not rows:
                    continue
                k = weight.shape[1]
                x = torch.randn(m, k, generator=gen)
                shaped = x[0] if dims == 1 else x if dims == 2 else x.unsqueeze(0)
                assert client.start(shaped, index, None, split=True) == "split"
                sent = client.seg.region("x", m * k * 4, torch.float32).view(m, k)
                assert torch.equal(sent, x)
                y = client.seg.region("y", m * rows * 4, torch.float32)
                for first, end in layers[index].split_pieces:
                    gc.piece(y, m, first, end).copy_(linear(sent, weight[first:end]))
                client.seg.words[gc.ANSWER] = client.requests
                got = client.finish(shaped, index, tail=linear(shaped, weight[rows:]))
                want = linear(shaped, weight)
                assert got.shape == want.shape
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        client.close()
        os.close(client.fd)
