"""Kill one rank of a heterogeneous vLLM run and check that it fails the way stock vLLM does.

    python -m hetero_shim.testing.fault_check MODEL --phase startup|generate|serve --victim cpu|gpu [options]

Phases
- startup:  offline ``LLM(..., device="heterogeneous")``; the victim is killed while the engine
            starts (after --at-log matches a log line, default "Starting to load model").
            Pass: ``LLM()`` raises, the log names the dead rank, nothing of the run is left.
- generate: offline generation of --requests long requests; the victim is killed --delay s
            after generation started (or after --at-log matches a log line). Pass: generate()
            raises (EngineDeadError) and the log says which worker died, within --limit s;
            nothing is left.
- serve:    the OpenAI api_server under ``python -m hetero_shim``; --requests requests (half
            streamed) are in flight when the victim is killed. Pass: every in-flight request
            ends with an error (none hangs), /health answers 503 or the server is gone, the
            server exits by itself within --limit s, nothing is left.

The victim is a worker process of the run's session whose /proc/<pid>/environ has
HETERO_SHIM_RANK_KIND=<victim> (highest rank for cpu, lowest for gpu; --rank picks one),
its rank read from the process title (VLLM::Worker_TP<n>; with pipeline stages, passed as
--engine '{"pipeline_parallel_size": 2}', Worker_PP<p>[_TP<n>] is rank p x --tp + n).
--signal STOP freezes it instead (alive but silent); see docs/guarantees.md for what vLLM does
then. --report-timeouts
(generate) reads the timeout of every gloo group on every rank through collective_rpc and
checks it equals --gloo-timeout (HETERO_SHIM_GLOO_TIMEOUT_S) or the shim's default.
--stock runs vLLM without the shim (TP ranks are then picked by title only; on a CPU host
pass a bind list, e.g. VLLM_CPU_OMP_THREADS_BIND='0|1').

Prints one line 'FAULT_RESULT {json}' and a short table; exit status 0 when it passed.
Stdlib and hetero_shim.testing only (plus the vLLM under test in the child processes).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from hetero_shim.settings import GLOO_TIMEOUT_DEFAULT_S
from hetero_shim.testing.proctree import kill_session, session_pids, wait_session_gone

REPO = Path(__file__).resolve().parents[2]  # the folder holding the hetero_shim package, put on the runs' PYTHONPATH
RANK_KIND = "HETERO_SHIM_RANK_KIND"
STARTUP_AT_LOG = r"Starting to load model"
TITLE_RANK = re.compile(r"Worker_(?:PP(\d+))?_?(?:TP(\d+))?")  # Worker_TP1, Worker_PP1, Worker_PP1_TP0
DEFAULT_ENGINE = {"enforce_eager": True, "dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 64 << 20}

OFFLINE = textwrap.dedent(
    """
    import json, sys, time
    def gloo_timeouts(worker):
        import torch
        from vllm.distributed import parallel_state
        tp = parallel_state.get_tp_group()
        groups = {"world": torch.distributed.group.WORLD, "tp device": tp.device_group, "tp cpu": tp.cpu_group}
        found = {}
        for name, group in groups.items():
            backend = group._get_backend(torch.device("cpu"))
            found[name] = backend.options._timeout.total_seconds() if type(backend).__name__ == "ProcessGroupGloo" else None
        return found
    def main():
        model, tp, stock, engine, requests, max_tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", \\
            json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
        if not stock:
            import hetero_shim
            hetero_shim.enable()
            engine["device"] = "heterogeneous"
        from vllm import LLM, SamplingParams
        start = time.monotonic()
        try:
            llm = LLM(model=model, tensor_parallel_size=tp, **engine)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            print(f"ENGINE FAILED after {time.monotonic() - start:.1f}s: {type(exc).__name__}: {first}", flush=True)
            sys.exit(3)
        if sys.argv[7] == "1":  # the timeout of every gloo group each rank holds
            print("GLOO_TIMEOUTS " + json.dumps(llm.collective_rpc(gloo_timeouts)), flush=True)
        print("GENERATING", flush=True)
        start = time.monotonic()
        try:
            llm.generate(["Hello"] * requests, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        except Exception as exc:
            print(f"RAISED after {time.monotonic() - start:.1f}s: {type(exc).__name__}", flush=True)
            sys.exit(3)
        print("FINISHED", flush=True)
    if __name__ == "__main__":
        main()
    """
)


# -- the process tree ------------------------------------------------------------------------
def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; PSS splits shared pages among their users."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


def tree_memory(sid: int) -> dict:
    """Memory of every process of the session: summed RSS (counts shared pages per process) and PSS."""
    rows = []
    for pid in session_pids(sid):
        rss, pss = memory_kib(pid)
        rows.append({"pid": pid, "title": cmdline(pid)[:60], "rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1)})
    return {"processes": len(rows), "rss_mib": round(sum(r["rss_mib"] for r in rows), 1),
            "pss_mib": round(sum(r["pss_mib"] for r in rows), 1), "per_process": rows}


def ranks(sid: int, tp: int = 1) -> list[dict]:
    """Worker processes of the session: pid, rank (from the title: pipeline stage x ``tp`` + TP rank)
    and kind (from the environment)."""
    found = []
    for pid in session_pids(sid):
        match = TITLE_RANK.search(cmdline(pid))
        if match and (match.group(1) or match.group(2)):
            rank = int(match.group(1) or 0) * tp + int(match.group(2) or 0)
            found.append({"pid": pid, "rank": rank, "kind": environ(pid).get(RANK_KIND)})
    return sorted(found, key=lambda r: r["rank"])


def pick_victim(sid: int, kind: str, rank: int | None, stock: bool, tp: int = 1) -> dict | None:
    candidates = [r for r in ranks(sid, tp) if stock or r["kind"] == kind]
    if rank is not None:
        candidates = [r for r in candidates if r["rank"] == rank]
    if not candidates:
        return None
    return candidates[0] if kind == "gpu" else candidates[-1]


# -- helpers -----------------------------------------------------------------------------------
def child_env(opts) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if opts.gloo_timeout:
        env["HETERO_SHIM_GLOO_TIMEOUT_S"] = str(opts.gloo_timeout)
    return env


def cli_flags(engine: dict) -> list[str]:
    flags = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the run exited ({proc.returncode}) before {what}:\n{tail(log)}")
        time.sleep(0.2)
    raise RuntimeError(f"no {what} within {timeout:.0f}s:\n{tail(log)}")


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def named_lines(log: Path, victim: dict) -> list[str]:
    """Log lines that say which worker or rank died."""
    patterns = (rf"Worker_TP{victim['rank']}\b.*(died|killed|exit)", rf"VllmWorker-{victim['rank']}\b.*died",
                rf"rank {victim['rank']}\b.*(died|dead|ended|exit)", rf"pid {victim['pid']}\b.*(died|dead|ended|exit)")
    return [line.strip()[:300] for line in log.read_text(errors="replace").splitlines()
            if any(re.search(p, line, re.I) for p in patterns)]


# -- phases ------------------------------------------------------------------------------------
def run_offline(opts, workdir: Path) -> dict:
    script = workdir / "fault_offline.py"
    script.write_text(OFFLINE)
    log = workdir / f"fault_{opts.phase}.log"
    engine = {**DEFAULT_ENGINE, **json.loads(opts.engine)}
    max_tokens = min(opts.max_tokens, engine.get("max_model_len", 256) - 8)
    args = [sys.executable, str(script), opts.model, str(opts.tp), "1" if opts.stock else "0", json.dumps(engine),
            str(opts.requests), str(max_tokens), "1" if opts.report_timeouts else "0"]
    env = child_env(opts)
    if opts.report_timeouts:
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {"phase": opts.phase, "log": str(log)}
    try:
        if opts.phase == "startup":
            at_log = opts.at_log or STARTUP_AT_LOG
            pattern = re.compile(at_log)
            wait_for(lambda: pattern.search(log.read_text(errors="replace")), opts.start_timeout, proc, log,
                     f"log line {at_log!r}")
        else:
            wait_for(lambda: "GENERATING" in log.read_text(), opts.start_timeout, proc, log, "generation")
            if opts.at_log:
                pattern = re.compile(opts.at_log)
                wait_for(lambda: pattern.search(log.read_text(errors="replace")), opts.start_timeout, proc, log,
                         f"log line {opts.at_log!r}")
            time.sleep(opts.delay)
        victim = wait_for(lambda: pick_victim(proc.pid, opts.victim, opts.rank, opts.stock, opts.tp), 60, proc, log,
                          f"a {opts.victim} rank")
        result["victim"] = victim
        result["ranks"] = ranks(proc.pid, opts.tp)
        os.kill(victim["pid"], getattr(signal, "SIG" + opts.signal))
        hit = time.monotonic()
        try:
            result["exit_code"] = proc.wait(timeout=opts.limit + 60)
        except subprocess.TimeoutExpired:
            result["exit_code"] = None
        result["seconds_to_exit"] = round(time.monotonic() - hit, 1)
        result["left_after_exit"] = wait_session_gone(proc.pid, 30)
    finally:
        kill_session(proc.pid)
    text = log.read_text(errors="replace")
    failed_line = next((l for l in text.splitlines() if l.startswith(("ENGINE FAILED", "RAISED"))), None)
    result["failure"] = failed_line
    result["named"] = named_lines(log, victim)
    timeouts = next((json.loads(l.split(" ", 1)[1]) for l in text.splitlines() if l.startswith("GLOO_TIMEOUTS ")), None)
    result["gloo_timeouts"] = timeouts  # per rank: {group: seconds}
    expected = "ENGINE FAILED" if opts.phase == "startup" else "RAISED"
    result["checks"] = {
        f"run failed ({expected})": bool(failed_line and failed_line.startswith(expected)) and result["exit_code"] == 3,
        f"exited within {opts.limit}s": result["exit_code"] is not None and result["seconds_to_exit"] <= opts.limit,
        "the dead rank is named in the log": bool(result["named"]),
        "no process left": not result["left_after_exit"],
    }
    if opts.report_timeouts:
        want = float(opts.gloo_timeout or GLOO_TIMEOUT_DEFAULT_S)
        result["checks"][f"every gloo group of every rank times out after {want:.0f} s"] = bool(timeouts) and all(
            value == want for rank in timeouts for value in rank.values())
    return result


def _request(port: int, body: dict, outcome: dict, started: threading.Event) -> None:
    """One completion request; a streamed one sets ``started`` at its first chunk. ``tokens``: the
    completion tokens the server reported (its usage figure), None when it reported none."""
    start = time.monotonic()
    if body.get("stream"):
        body = {**body, "stream_options": {"include_usage": True}}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        outcome.update(status=response.status, tokens=None)
        error = None
        if response.status != 200:
            error = response.read().decode(errors="replace")[:200]
        elif body.get("stream"):
            chunks = []
            for raw in response:  # line by line, as the server sends them
                line = raw.decode(errors="replace").strip()
                if line.startswith("data: "):
                    started.set()
                    chunks.append(line[len("data: "):])
            error = next((c[:200] for c in chunks if '"error"' in c), None)
            outcome["tokens"] = next((_usage(c) for c in reversed(chunks) if '"usage"' in c), None)
            outcome["complete"] = bool(chunks) and chunks[-1] == "[DONE]" and error is None
        else:
            outcome["tokens"] = _usage(response.read().decode(errors="replace"))
            outcome["complete"] = True
        outcome["error"] = error
    except (OSError, http.client.HTTPException) as exc:
        outcome.update(status=None, error=f"{type(exc).__name__}: {exc}"[:200])
    outcome["end"] = time.monotonic()
    outcome["seconds"] = round(outcome["end"] - start, 1)


def _usage(text: str) -> int | None:
    try:
        return int((json.loads(text).get("usage") or {})["completion_tokens"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def health(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None


def start_server(opts, log: Path, port: int) -> subprocess.Popen:
    engine = {**DEFAULT_ENGINE, **json.loads(opts.engine)}
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", opts.model,
              "--tensor-parallel-size", str(opts.tp), "--host", "127.0.0.1", "--port", str(port), *cli_flags(engine)]
    if not opts.stock:
        server = [sys.executable, "-m", "hetero_shim", *server, "--device", "heterogeneous"]
    with open(log, "w") as out:
        return subprocess.Popen(server, env=child_env(opts), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_server_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    wait_for(lambda: health(port) == 200, timeout, proc, log, "a healthy server")


def kill_while_serving(opts, proc: subprocess.Popen, port: int, log: Path) -> dict:
    """With requests in flight, hit the victim; watch the requests, /health and the server's exit."""
    result: dict = {}
    outcomes = [{} for _ in range(opts.requests)]
    max_tokens = min(opts.max_tokens, json.loads(opts.engine).get("max_model_len", DEFAULT_ENGINE["max_model_len"]) - 8)
    started = threading.Event()
    threads = [threading.Thread(target=_request, daemon=True, args=(port, {
        "model": opts.model, "prompt": f"Request {i}", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": i % 2 == 1}, outcomes[i], started)) for i in range(opts.requests)]
    # the victim is found before the requests start, so only --delay lies between the first chunk and
    # the hit; whether the engine still generates then is up to the caller (fewer sequences at once
    # than requests: the rest wait in the engine)
    victim = pick_victim(proc.pid, opts.victim, opts.rank, opts.stock, opts.tp)
    if victim is None:
        raise RuntimeError(f"no {opts.victim} rank found among {ranks(proc.pid, opts.tp)}")
    result["victim"], result["ranks"] = victim, ranks(proc.pid, opts.tp)
    for t in threads:
        t.start()
    started.wait(timeout=opts.start_timeout)  # generation has begun: the first streamed chunk arrived
    time.sleep(opts.delay)
    in_flight = [i for i, t in enumerate(threads) if t.is_alive()]
    os.kill(victim["pid"], getattr(signal, "SIG" + opts.signal))
    hit = time.monotonic()
    health_codes: list[tuple[float, int | None]] = []
    while proc.poll() is None and time.monotonic() - hit < opts.limit + 60:
        code = health(port)
        if not health_codes or health_codes[-1][1] != code:
            health_codes.append((round(time.monotonic() - hit, 1), code))
        time.sleep(0.25)
    exit_code = proc.poll()
    result["seconds_to_exit"] = round(time.monotonic() - hit, 1) if exit_code is not None else None
    result["exit_code"] = exit_code
    result["health"] = health_codes  # [(seconds after the hit, status or None = refused)]
    for t in threads:
        t.join(timeout=30)
    result["requests_hung"] = sum(t.is_alive() for t in threads)
    result["requests"] = outcomes
    result["in_flight_at_hit"] = len(in_flight)
    result["in_flight_failed"] = sum(1 for i in in_flight if outcomes[i].get("error"))
    # the client reads behind the engine (on 2 cores the API server streamed up to 5 s late), so a
    # request still open at the hit may have been finished by the engine before it: it must then
    # carry every token asked for; any other request open at the hit must fail
    result["in_flight_full"] = sum(1 for i in in_flight if not outcomes[i].get("error")
                                   and outcomes[i].get("complete") and outcomes[i].get("tokens") == max_tokens)
    for o in outcomes:
        o["end_after_hit_s"] = round(o.pop("end", hit) - hit, 2)
    result["requests_failed"] = sum(1 for o in outcomes if o.get("error"))
    result["requests_completed"] = sum(1 for o in outcomes if o.get("complete"))
    result["first_503_s"] = next((s for s, c in health_codes if c == 503), None)
    result["named"] = named_lines(log, victim)
    return result


def run_serve(opts, workdir: Path) -> dict:
    log = workdir / "fault_serve.log"
    port = free_port()
    proc = start_server(opts, log, port)
    result: dict = {"phase": "serve", "log": str(log)}
    try:
        wait_server_ready(proc, port, log, opts.start_timeout)
        result.update(kill_while_serving(opts, proc, port, log))
        result["left_after_exit"] = wait_session_gone(proc.pid, 30)
    finally:
        kill_session(proc.pid)
    result["checks"] = serve_checks(result, opts.limit)
    return result


def serve_checks(result: dict, limit: float) -> dict:
    return {
        "no in-flight request hung": result["requests_hung"] == 0,
        "the hit landed while generating: a request in flight at it failed": result["in_flight_failed"] > 0,
        "every request in flight at the hit failed or got all its tokens (none truncated, none lost silently)":
            result["in_flight_failed"] + result["in_flight_full"] == result["in_flight_at_hit"],
        "/health said 503 or the server was gone": result["first_503_s"] is not None or result["exit_code"] is not None,
        f"server exited by itself within {limit}s": result["exit_code"] is not None and result["seconds_to_exit"] <= limit,
        "the dead rank is named in the log": bool(result["named"]),
        "no process left": not result["left_after_exit"],
    }


def report(result: dict) -> None:
    shown = {k: v for k, v in result.items() if k not in ("requests", "ranks")}
    print("FAULT_RESULT " + json.dumps(shown), flush=True)
    victim = result.get("victim") or {}
    print(f"\nphase {result['phase']}: {victim.get('kind') or '?'} rank {victim.get('rank')} (pid {victim.get('pid')}) hit; "
          f"exit code {result.get('exit_code')} after {result.get('seconds_to_exit')} s")
    for line in result.get("named", [])[:3]:
        print(f"  log: {line}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--phase", choices=("startup", "generate", "serve"), required=True)
    parser.add_argument("--victim", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--rank", type=int, default=None, help="rank to hit (default: highest CPU / lowest GPU rank)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--signal", choices=("KILL", "STOP", "TERM"), default="KILL")
    parser.add_argument("--engine", default="{}", help="JSON of engine options over the defaults, e.g. '{\"dtype\": \"bfloat16\"}'")
    parser.add_argument("--requests", type=int, default=32, help="serve: requests in flight at the hit")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--delay", type=float, default=1.0,
                        help="seconds between the start of generation (serve: the first streamed chunk) and the hit")
    parser.add_argument("--at-log", default=None,
                        help=f"startup: hit when a log line matches (default {STARTUP_AT_LOG!r}); "
                        "generate: hit --delay s after a log line matches (default: after generation started)")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds the run may take to fail after the hit")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--gloo-timeout", type=int, default=None, help="sets HETERO_SHIM_GLOO_TIMEOUT_S for the run")
    parser.add_argument("--stock", action="store_true", help="run vLLM without the shim (reference behaviour)")
    parser.add_argument("--report-timeouts", action="store_true",
                        help="generate: read the timeout of each rank's gloo groups (world, TP) and check it")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the result here")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    workdir = Path(opts.workdir or os.environ.get("TMPDIR", "/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = run_serve(opts, workdir) if opts.phase == "serve" else run_offline(opts, workdir)
    result.update(model=opts.model, tp=opts.tp, signal=opts.signal, stock=opts.stock)
    return finish(result, opts.json, report)


def finish(result: dict, json_path: str | None, report_fn) -> int:
    """Write the result JSON (if asked), print the report and every check; on failure also the
    log's tail. Exit status: 0 when every check passed."""
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    report_fn(result)
    for check, passed in result["checks"].items():
        print(f"  {'PASS' if passed else 'FAIL'}  {check}")
    ok = all(result["checks"].values())
    if not ok:
        print(f"\nlog tail ({result['log']}):\n{tail(Path(result['log']))}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
