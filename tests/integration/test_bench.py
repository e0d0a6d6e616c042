"""The benchmarks run (at toy size: this checks the harness works, not timings)."""

import json

import procs


def test_allreduce_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "allreduce.json"
    proc = procs.run_python([str(procs.REPO / "bench" / "allreduce.py"), "--sizes", "8K,64K", "--iters", "3",
                             "--out", str(out)], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["path"], r["bytes"]) for r in rows} == {
        (p, b) for p in ("gloo .cpu()", "HeteroCommunicator") for b in (8192, 65536)
    }
    assert all(r["median_us"] > 0 for r in rows)
    assert "vs baseline" in proc.stdout  # the table is printed
