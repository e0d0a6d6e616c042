"""The OpenAI server in heterogeneous mode (TP=2, all CPU ranks here) under load, then a CPU
rank killed while requests are in flight; through hetero_shim.testing.load_check, the runner the
GPU tests use at realistic size (tests/gpu/test_faults.py).

Load: 64 concurrent clients x 4 requests (completions and chat, streamed and not, prompts of
several lengths, max_tokens 4..48 with ignore_eos, greedy / seeded T=0.8 / unseeded T=1.0; the
engine runs 8 at once, the rest queue): every request completes, every greedy text equals the same request sent alone before the
load, host memory of the whole server tree is recorded at start and end.
Kill: what stock vLLM 0.32 does when a worker dies under `vllm serve` (measured with
``fault_check.py --phase serve --stock``): requests in flight fail (500 or an error chunk),
/health answers 503 briefly, the server exits by itself with status 0 about 10 s later. A request
the engine had finished before the hit can still be on its way to the client; it must carry every
token asked for.
"""

from __future__ import annotations

import json
import sys

import procs

RUNNER = ["-m", "hetero_shim.testing.load_check"]


def test_load_then_cpu_rank_killed_while_serving(models, tmp_path):
    # The kill must land while the engine still generates, though the client reads up to seconds
    # behind it on 2 cores: 480 tokens each (the model's 512-token context) and at most 8 sequences
    # at once, so most of the 96 requests still wait in the engine at the hit (32 were seen all
    # finished by the engine before the hit on a busy 2-core machine).
    proc = procs.run([sys.executable, *RUNNER, str(models["llama"]), "--clients", "64", "--per-client", "4",
                      "--then-kill", "cpu", "--requests", "96", "--max-tokens", "480",
                      "--engine", '{"max_model_len": 512, "max_num_seqs": 8}',
                      "--workdir", str(tmp_path)], procs.python_env(), timeout=420)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("LOAD_RESULT ")), None)
    assert line, proc.stdout[-4000:]
    result = json.loads(line[len("LOAD_RESULT "):])
    print(proc.stdout[proc.stdout.index(line) + len(line):][:3000])
    assert result["requests"] == 256 and result["errors"] == 0 and result["wrong_length"] == 0, result["error_samples"]
    assert result["streamed"] > 0 and result["chat"] > 0 and result["seeded"] > 0
    assert result["greedy"] == 128 and result["greedy_mismatch"] == 0, result["greedy_mismatch_samples"]
    start, end = result["memory_start"]["rss_mib"], result["memory_end"]["rss_mib"]
    assert start > 0 and end - start <= max(512, 0.25 * start), (start, end)
    kill = result["kill"]
    assert kill["victim"]["kind"] == "cpu" and kill["victim"]["rank"] == 1
    not_failed = [r for r in kill["requests"] if not r.get("error")]  # what such a request got, if any
    assert kill["in_flight_failed"] > 0, (kill, not_failed)  # the hit landed while generating
    # the rest of those open at the hit had been finished by the engine before it: all 480 tokens
    assert kill["in_flight_failed"] + kill["in_flight_full"] == kill["in_flight_at_hit"], (kill, not_failed)
    assert kill["requests_hung"] == 0
    assert kill["exit_code"] == 0 and kill["seconds_to_exit"] < 30, kill  # stock vLLM 0.32 exits 0 here too
    assert any("VllmWorker-1 died unexpectedly" in l for l in kill["named"]), kill["named"]
    assert not result["left_after_exit"]
    assert proc.returncode == 0 and all(result["checks"].values()), result["checks"]
