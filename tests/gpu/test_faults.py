"""Faults and load with a GPU rank (OPT-125m shapes, random weights), through the same runners as
tests/reliability/: hetero_shim.testing.fault_check and hetero_shim.testing.load_check.

- A rank (the CPU rank, or GPU rank 0) killed with SIGKILL during engine start-up, offline
  generation (TP=2; and the last CPU rank of TP=4) and serving with 32 requests in flight: the run
  fails the way stock vLLM fails, names the dead rank in the log, ends within 30 s of the kill,
  and leaves no process behind. The offline generation with the GPU rank killed also reads every
  gloo group's timeout on every rank (the shim's default).
- Load: 64 concurrent clients x 4 requests (completions and chat, streamed and not, max_tokens
  16..128, greedy / seeded / unseeded) on the heterogeneous server (TP=2): every request completes
  with its exact length, every greedy text equals the same request sent alone, host memory
  stays within the bound; then the CPU rank is killed with 32 requests in flight and the
  server fails them all and exits by itself, nothing left.

The runners' own checks (``checks`` in their result) are the assertions; each test keeps the
runner's JSON result, its output and the run's logs.
"""

from __future__ import annotations

import json
import sys

import pytest

from hetero_shim.testing import tiny_models

ENGINE = {"max_model_len": 512, "kv_cache_memory_bytes": 1 << 30}
RUNNER_TIMEOUT = 900  # the runners wait up to 600 s for the engine, then up to 90 s for the failure and 30 s more

FAULTS = [  # (phase, victim, TP size, more runner options)
    pytest.param("startup", "cpu", 2, [], id="startup-cpu"),
    pytest.param("startup", "gpu", 2, [], id="startup-gpu"),
    pytest.param("generate", "cpu", 2, [], id="generate-cpu"),
    pytest.param("generate", "cpu", 4, [], id="generate-cpu-tp4"),
    pytest.param("generate", "gpu", 2, ["--report-timeouts"], id="generate-gpu"),
    pytest.param("serve", "gpu", 2, [], id="serve-gpu"),
]


def opt_model() -> str:
    return str(tiny_models.get(tiny_models.OPT_125M_SHAPE))


def runner(gpu, evidence, module: str, args: list[str], marker: str) -> tuple[dict | None, object]:
    """``python -m hetero_shim.testing.<module> ...`` in its own session; its result line (or None)."""
    done = gpu.run([sys.executable, "-m", f"hetero_shim.testing.{module}", *args, "--workdir", str(evidence.dir),
                    "--json", str(evidence.dir / "result.json")], evidence.dir / f"{module}.out", RUNNER_TIMEOUT)
    line = next((line for line in done.text.splitlines() if line.startswith(marker)), None)
    return (json.loads(line[len(marker):]) if line else None), done


def runner_rows(evidence, result: dict | None, done, what: str) -> None:
    if result is None:
        evidence.row(f"{what}: runner result", False, f"rc={done.rc}, no result line; see {done.log}")
        return
    for check, passed in result["checks"].items():
        evidence.row(f"{what}: {check}", passed, "")
    evidence.row(f"{what}: runner exit status 0, nothing of it left", done.rc == 0 and done.left == [],
                 f"rc={done.rc}; left: {done.left}")


@pytest.mark.parametrize("phase,victim,tp,more", FAULTS)
def test_rank_killed(gpu, evidence, phase, victim, tp, more):
    result, done = runner(gpu, evidence, "fault_check", [opt_model(), "--phase", phase, "--victim", victim,
                                                         "--tp", str(tp), "--engine", json.dumps(ENGINE), *more],
                          "FAULT_RESULT ")
    what = f"{victim.upper()} rank killed during {phase}, TP={tp}"
    runner_rows(evidence, result, done, what)
    if result is not None:
        hit = result.get("victim") or {}
        want_rank = 0 if victim == "gpu" else tp - 1
        evidence.row(f"{what}: the victim is {victim.upper()} rank {want_rank}",
                     hit.get("kind") == victim and hit.get("rank") == want_rank, f"victim {hit}")
        if phase == "startup":
            named = [line for line in result["named"] if f"{victim.upper()} rank {want_rank}" in line
                     and "SIGKILL" in line]
            evidence.row(f"{what}: the shim names the rank and its signal", bool(named),
                         (named or result["named"] or ["nothing named"])[0][:200])
        evidence.save("named", result.get("named"))
    evidence.check()


def test_load_then_cpu_rank_killed_while_serving(gpu, evidence):
    result, done = runner(gpu, evidence, "load_check", [opt_model(), "--tp", "2", "--lengths", "16,32,64,128",
                                                        "--engine", json.dumps(ENGINE), "--then-kill", "cpu"],
                          "LOAD_RESULT ")
    what = "load 64 clients x 4 requests, then CPU rank killed, TP=2"
    runner_rows(evidence, result, done, what)
    if result is not None:
        evidence.row(f"{what}: 256 requests, no error, exact lengths",
                     result["requests"] == 256 and result["errors"] == 0 and result["wrong_length"] == 0,
                     f"{result['requests']} requests, {result['errors']} errors {result['error_samples']}, "
                     f"{result['wrong_length']} of wrong length")
        evidence.row(f"{what}: greedy texts == sequential reference",
                     result["greedy"] == 128 and result["greedy_mismatch"] == 0,
                     f"{result['greedy']} greedy, {result['greedy_mismatch']} differ; seeded {result['seeded']}, "
                     f"{result['seeded_mismatch']} differ (not required)")
        start, end = result["memory_start"]["rss_mib"], result["memory_end"]["rss_mib"]
        evidence.row(f"{what}: server tree RSS recorded", start > 0, f"RSS {start} -> {end} MiB, "
                     f"peak {result['memory_peak']}")
        kill = result.get("kill") or {}
        evidence.row(f"{what}: the victim is CPU rank 1",
                     (kill.get("victim") or {}).get("kind") == "cpu" and (kill.get("victim") or {}).get("rank") == 1,
                     f"victim {kill.get('victim')}; in flight {kill.get('in_flight_at_hit')}, failed "
                     f"{kill.get('in_flight_failed')}; exit {kill.get('exit_code')} after {kill.get('seconds_to_exit')} s")
    evidence.check()
