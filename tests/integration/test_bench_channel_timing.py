"""The bench hook's request timings on the real vLLM CPU build: PP=2 with the second stage's CPU rank
standing in for the GPU rank that computes the first stage's split decode steps
(HETERO_SHIM_CPU_RANK_GPU=next-stage), run with bench/breakdown/ first on PYTHONPATH. Both ranks
write their timed requests, and bench/breakdown.py cuts the CPU rank's wait into the server's
phases (bench/channel.py). With HETERO_SHIM_CPU_GEMM_QUEUE_STEP=1 the requests the server queued
before they came (every decode step's after its first, from the second decode step on) are one
phase, "queued"."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import procs
import pytest
from conftest import GENERATE

from hetero_shim.testing import tiny_models

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import breakdown  # noqa: E402


@pytest.mark.parametrize("queue_step", ["0", "1"])
def test_the_channels_requests_are_timed_on_both_sides(tmp_path, queue_step):
    model = tiny_models.get(tiny_models.ModelSpec(num_layers=4))
    trace = tmp_path / "trace"
    path = os.pathsep.join(p for p in (str(ROOT / "bench" / "breakdown"), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = procs.run_python([GENERATE, str(model), "--pp", "2", "--device", "heterogeneous", "--enable"],
                            timeout=300, PYTHONPATH=path, BENCH_BREAKDOWN_DIR=str(trace),
                            BENCH_BREAKDOWN_PROFILE="1000:1", BENCH_BREAKDOWN_CHANNEL="1:3",
                            HETERO_SHIM_CPU_GEMM_ON_GPU="9", HETERO_SHIM_CPU_RANK_GPU="next-stage",
                            HETERO_SHIM_CPU_GEMM_SPLIT="50", HETERO_SHIM_CPU_GEMM_QUEUE_STEP=queue_step)
    assert proc.returncode == 0, proc.stdout[-6000:]
    files = sorted(p.name for p in trace.iterdir())
    assert len([f for f in files if f.endswith(".channel.json")]) == 2, (files, proc.stdout[-3000:])
    summary = breakdown.summarize(trace)
    shown = breakdown.text(summary)
    [run] = [r for r in summary["runs"] if r.get("channel")]
    [pair] = run["channel"]
    # the second to fourth steps with tokens, whatever vLLM scheduled in them: every request of the
    # first stage's 2 layers x 4 linear layers (split in decode steps, whole in larger ones) timed
    rows = pair["tokens"].values()
    assert sum(row["steps"] for row in rows) == 3, shown
    assert all(row["requests_per_step"] == 8 for row in rows), shown
    phases = {"pick-up", "serve", "notice"} | ({"queued"} if queue_step == "1" else set())
    for row in rows:
        assert set(row["wait_in_ms"]) <= phases and {"pick-up", "serve", "notice"} <= set(row["wait_in_ms"]), shown
        assert abs(sum(row["wait_in_ms"].values()) - row["wait_ms"]) < 1e-2, shown
    assert any("queued" in row["wait_in_ms"] for row in rows) == (queue_step == "1"), shown
    assert "channel " in shown and " tok x " in shown, shown
