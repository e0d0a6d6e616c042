"""bench/allreduce.py runs (at toy size: this checks the harness works and every path sums right, not timings)."""

import json
import sys

import procs


def test_allreduce_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "allreduce.json"
    proc = procs.run_python([str(procs.REPO / "bench" / "allreduce.py"), "--cpu-ranks", "1", "--sizes", "8K,2M",
                             "--iters", "3", "--out", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    measured = {(r["world"], r["path"], r["bytes"]) for r in rows}
    for path in ("gloo .cpu()", "gloo pinned", "shm"):  # each checked for the right sum before timing
        assert {(2, path, 8192), (2, path, 2 << 20)} <= measured
    # vLLM's own CPU SHM all-reduce is measured beside them when its kernels load, else the JSON says why
    assert any(r["path"] == "vLLM CPU SHM" for r in rows) or "vLLM CPU SHM" in result["meta"]["notes"]["world 2"]
    assert all(r["median_us"] > 0 for r in rows)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("2 CPU")  # the table is printed last
    assert "vs baseline" in proc.stdout


def test_shm_gpu_allreduce_dry_run_on_cpu(tmp_path):
    """tests/gpu/test_shm_allreduce.py (its real use: the GPU machine) runs its checks with every rank on
    the CPU here (--cpu-dry-run), so the GPU test stays runnable: every check passes and its evidence
    lists them all."""
    proc = procs.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      str(procs.REPO / "tests" / "gpu" / "test_shm_allreduce.py"), "--cpu-dry-run",
                      "--shm-cpu-ranks", "1", "--gpu-out", str(tmp_path)], procs.python_env(), timeout=240,
                     cwd=procs.REPO)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:]
    [found] = tmp_path.rglob("allreduce_rows.json")
    rows = json.loads(found.read_text())
    assert len(rows) == 4 * 23 and all(r["ok"] for r in rows)
    assert {r["path"] for r in rows} == {"fused kernel", "no fused", "64 KiB slots", "host waits"}

