"""Load on the OpenAI server in heterogeneous mode: many concurrent clients, mixed requests.

    python -m hetero_shim.testing.load_check MODEL [--tp 2] [--clients 64] [--per-client 4] [--engine JSON]
                                                [--then-kill cpu|gpu] [--json OUT]

Starts ``python -m hetero_shim python -m vllm.entrypoints.openai.api_server MODEL --device
heterogeneous --tensor-parallel-size TP ...`` and then:
1. reference: each distinct greedy and seeded request of the menu (--distinct of each) is sent
   once, one at a time, and its text kept;
2. load: --clients threads each send --per-client requests back to back: completions and chat,
   streamed or not, prompts of several lengths, max_tokens from --lengths (ignore_eos, so the
   length is exact), greedy / seeded temperature 0.8 top_p 0.9 / unseeded temperature 1.0 top_k 20;
3. checks: every request answered 200 with exactly max_tokens tokens and no error, every greedy
   text equals its sequential reference (seeded ones are compared and reported), host memory
   (RSS and PSS summed over the server's whole process tree) at start and end within the bound;
4. stop: SIGTERM, and no process of the tree may be left; or, with --then-kill, a rank is
   killed with requests in flight and the server must fail and exit as stock vLLM does
   (see hetero_shim/testing/fault_check.py).

Prints 'LOAD_RESULT {json}' and a table; exit status 0 when every check passed.
Stdlib and hetero_shim.testing only, besides the vLLM under test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from hetero_shim.testing import fault_check  # process tree, server start, rank kill

PROMPTS = [
    "Hello, my name is", "The capital of France is", "Once upon a time", "one two three",
    "The quick brown fox", "def add(a, b):", "A heterogeneous node has", "Tensor parallel ranks",
]


def menu(distinct: int, lengths: list[int], chat: bool, sampling: str) -> list[dict]:
    """``distinct`` request shapes of one sampling kind, varied in endpoint, prompt and length."""
    shapes = []
    for k in range(distinct):
        prompt = " ".join([PROMPTS[k % len(PROMPTS)]] * (1 + (k // len(PROMPTS)) % 3))
        shape = {"chat": chat and k % 4 == 3, "prompt": prompt, "max_tokens": lengths[k % len(lengths)]}
        if sampling == "greedy":
            shape["sampling"] = {"temperature": 0.0}
        elif sampling == "seeded":
            shape["sampling"] = {"temperature": 0.8, "top_p": 0.9, "seed": 1000 + k}
        else:
            shape["sampling"] = {"temperature": 1.0, "top_k": 20}
        shape["key"] = f"{sampling}-{k}"
        shapes.append(shape)
    return shapes


def plan_requests(clients: int, per_client: int, menus: dict[str, list[dict]]) -> list[list[dict]]:
    """Request n = client * per_client + j: half greedy, a quarter seeded, a quarter unseeded;
    streamed when (n // 2) is odd, so every shape is seen streamed and not."""
    plan = []
    for client in range(clients):
        row = []
        for j in range(per_client):
            n = client * per_client + j
            kind = ("greedy", "seeded", "greedy", "random")[n % 4]
            shape = menus[kind][(n // 4) % len(menus[kind])]
            row.append({**shape, "stream": (n // 2) % 2 == 1, "n": n})
        plan.append(row)
    return plan


def send(port: int, model: str, request: dict, timeout: float) -> dict:
    """One request; returns {'status', 'text', 'tokens', 'error', 'seconds'}."""
    body = {"model": model, "max_tokens": request["max_tokens"], "ignore_eos": True, **request["sampling"]}
    if request["chat"]:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": request["prompt"]}]
    else:
        path = "/v1/completions"
        body["prompt"] = request["prompt"]
    if request["stream"]:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    start = time.monotonic()
    out: dict = {"status": None, "text": None, "tokens": None, "error": None}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read().decode(errors="replace")
        out["status"] = response.status
        if response.status != 200:
            out["error"] = raw[:300]
        elif request["stream"]:
            _read_stream(raw, request["chat"], out)
        else:
            data = json.loads(raw)
            choice = data["choices"][0]
            out["text"] = choice["message"]["content"] if request["chat"] else choice["text"]
            out["tokens"] = data["usage"]["completion_tokens"]
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    out["seconds"] = time.monotonic() - start
    return out


def _read_stream(raw: str, chat: bool, out: dict) -> None:
    pieces, done = [], False
    # SSE events are separated by "\n" only: str.splitlines() would also split inside a JSON string
    # at U+0085, U+2028 or U+2029, which JSON leaves unescaped (a random-weight model emits them).
    for line in raw.split("\n"):
        line = line.rstrip("\r")
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        data = json.loads(payload)
        if "error" in data:
            out["error"] = payload[:300]
            return
        for choice in data.get("choices", []):
            pieces.append((choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or "")
        if data.get("usage"):
            out["tokens"] = data["usage"]["completion_tokens"]
    out["text"] = "".join(pieces)
    if not done:
        out["error"] = "stream ended without [DONE]"


class MemorySampler(threading.Thread):
    """Samples the server tree's memory every ``every`` seconds; keeps the peak."""

    def __init__(self, sid: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.sid, self.every, self.peak = sid, every, {"rss_mib": 0.0, "pss_mib": 0.0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            now = fault_check.tree_memory(self.sid)
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])


def summary(memory: dict) -> dict:
    return {k: memory[k] for k in ("processes", "rss_mib", "pss_mib")}


def run(opts) -> dict:
    workdir = Path(opts.workdir or os.environ.get("TMPDIR", "/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "load_server.log"
    port = fault_check.free_port()
    lengths = [int(x) for x in opts.lengths.split(",")]
    menus = {kind: menu(opts.distinct, lengths, not opts.no_chat, kind) for kind in ("greedy", "seeded", "random")}
    plan = plan_requests(opts.clients, opts.per_client, menus)
    result: dict = {"model": opts.model, "tp": opts.tp, "clients": opts.clients, "per_client": opts.per_client,
                    "log": str(log)}
    started = time.monotonic()
    proc = fault_check.start_server(opts, log, port)
    try:
        fault_check.wait_server_ready(proc, port, log, opts.start_timeout)
        result["start_seconds"] = round(time.monotonic() - started, 1)
        result["ranks"] = fault_check.ranks(proc.pid)
        result["memory_start"] = summary(fault_check.tree_memory(proc.pid))
        reference = {}
        for shape in menus["greedy"] + menus["seeded"]:
            got = send(port, opts.model, {**shape, "stream": False}, opts.request_timeout)
            if got["error"]:
                raise RuntimeError(f"reference request {shape['key']} failed: {got['error']}")
            reference[shape["key"]] = got["text"]
        sampler = MemorySampler(proc.pid)
        sampler.start()
        outcomes: list[list[dict]] = [[] for _ in plan]

        def client(i: int) -> None:
            for request in plan[i]:
                outcomes[i].append({**send(port, opts.model, request, opts.request_timeout), "request": request})

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(plan))]
        load_start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=opts.request_timeout * opts.per_client)
        result["load_seconds"] = round(time.monotonic() - load_start, 1)
        sampler.stop.set()
        sampler.join()
        result["clients_hung"] = sum(t.is_alive() for t in threads)
        time.sleep(opts.settle)
        result["memory_end"] = summary(fault_check.tree_memory(proc.pid))
        result["memory_peak"] = sampler.peak
        result.update(check_outcomes([o for row in outcomes for o in row], reference))
        if opts.then_kill:
            opts.victim = opts.then_kill
            result["kill"] = fault_check.kill_while_serving(opts, proc, port, log)
        else:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                result["exit_code"] = proc.wait(timeout=90)
            except Exception:
                result["exit_code"] = None
        result["left_after_exit"] = fault_check.wait_session_gone(proc.pid, 30)
    finally:
        fault_check.kill_session(proc.pid)
    result["checks"] = checks(result, opts)
    return result


def check_outcomes(outcomes: list[dict], reference: dict) -> dict:
    errors = [o for o in outcomes if o["error"] or o["status"] != 200]
    wrong_length = [o for o in outcomes if not o["error"] and o["tokens"] != o["request"]["max_tokens"]]
    greedy = [o for o in outcomes if o["request"]["key"].startswith("greedy") and not o["error"]]
    seeded = [o for o in outcomes if o["request"]["key"].startswith("seeded") and not o["error"]]
    greedy_diff = [o for o in greedy if o["text"] != reference[o["request"]["key"]]]
    seeded_diff = [o for o in seeded if o["text"] != reference[o["request"]["key"]]]
    latencies = sorted(o["seconds"] for o in outcomes)
    return {
        "requests": len(outcomes),
        "streamed": sum(o["request"]["stream"] for o in outcomes),
        "chat": sum(o["request"]["chat"] for o in outcomes),
        "errors": len(errors),
        "error_samples": [o["error"] for o in errors[:3]],
        "wrong_length": len(wrong_length),
        "greedy": len(greedy),
        "greedy_mismatch": len(greedy_diff),
        "greedy_mismatch_samples": [
            {"key": o["request"]["key"], "stream": o["request"]["stream"], "got": o["text"],
             "reference": reference[o["request"]["key"]]} for o in greedy_diff[:3]
        ],
        "seeded": len(seeded),
        "seeded_mismatch": len(seeded_diff),
        "latency_p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
        "latency_max_s": round(latencies[-1], 2) if latencies else None,
    }


def checks(result: dict, opts) -> dict:
    start, end = result.get("memory_start", {}), result.get("memory_end", {})
    growth = end.get("rss_mib", 0) - start.get("rss_mib", 0)
    allowed = max(opts.max_growth_mib, opts.max_growth_fraction * start.get("rss_mib", 0))
    result["rss_growth_mib"] = round(growth, 1)
    found = {
        "every request completed (200, exact length, no error)": result.get("requests") == opts.clients * opts.per_client
        and result.get("errors") == 0 and result.get("wrong_length") == 0 and result.get("clients_hung") == 0,
        "greedy outputs equal the sequential reference": result.get("greedy", 0) > 0 and result.get("greedy_mismatch") == 0,
        f"RSS growth {growth:.0f} MiB <= {allowed:.0f} MiB": "memory_end" in result and growth <= allowed,
    }
    if opts.require_seeded:
        found["seeded outputs equal the sequential reference"] = result.get("seeded_mismatch") == 0
    if opts.then_kill:
        kill = result.get("kill")
        if kill:
            kill["left_after_exit"] = result["left_after_exit"]
            found.update({f"after the kill: {k}": v for k, v in fault_check.serve_checks(kill, opts.limit).items()})
        else:
            found["kill ran"] = False
    else:
        found["server stopped on SIGTERM with nothing left"] = result.get("exit_code") is not None and not result.get("left_after_exit")
    return found


def report(result: dict) -> None:
    print("LOAD_RESULT " + json.dumps({k: v for k, v in result.items() if k != "ranks"}), flush=True)
    s, e, p = result.get("memory_start", {}), result.get("memory_end", {}), result.get("memory_peak", {})
    print(f"\n{result.get('requests')} requests from {result['clients']} clients in {result.get('load_seconds')} s "
          f"({result.get('streamed')} streamed, {result.get('chat')} chat); p50 {result.get('latency_p50_s')} s, "
          f"max {result.get('latency_max_s')} s; greedy {result.get('greedy')} ({result.get('greedy_mismatch')} differ), "
          f"seeded {result.get('seeded')} ({result.get('seeded_mismatch')} differ)")
    print(f"server tree memory (MiB): start RSS {s.get('rss_mib')} PSS {s.get('pss_mib')} ({s.get('processes')} processes); "
          f"end RSS {e.get('rss_mib')} PSS {e.get('pss_mib')}; peak RSS {p.get('rss_mib')} PSS {p.get('pss_mib')}")
    kill = result.get("kill")
    if kill:
        print(f"kill: {kill['victim']['kind']} rank {kill['victim']['rank']}; server exit {kill['exit_code']} after "
              f"{kill['seconds_to_exit']} s; /health {kill['health']}; in flight at the hit {kill['in_flight_at_hit']}, "
              f"of which failed {kill['in_flight_failed']}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--distinct", type=int, default=8, help="distinct greedy (and seeded, unseeded) request shapes")
    parser.add_argument("--lengths", default="4,16,32,48", help="max_tokens values, comma-separated")
    parser.add_argument("--no-chat", action="store_true", help="completions only (models without a chat template)")
    parser.add_argument("--engine", default="{}", help="JSON of engine options over fault_check.DEFAULT_ENGINE")
    parser.add_argument("--stock", action="store_true", help="run the server without the shim")
    parser.add_argument("--require-seeded", action="store_true", help="also require seeded texts to equal the reference")
    parser.add_argument("--max-growth-mib", type=float, default=512.0)
    parser.add_argument("--max-growth-fraction", type=float, default=0.25, help="of the start RSS, if larger")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the load before the end measurement")
    parser.add_argument("--then-kill", choices=("cpu", "gpu"), default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--signal", choices=("KILL", "STOP"), default="KILL")
    parser.add_argument("--requests", type=int, default=32, help="requests in flight when --then-kill hits")
    parser.add_argument("--max-tokens", type=int, default=200, help="their max_tokens")
    parser.add_argument("--delay", type=float, default=0.2, help="--then-kill: seconds between the first streamed chunk and the hit")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds the server may take to exit after the kill")
    parser.add_argument("--gloo-timeout", type=int, default=None)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    return fault_check.finish(run(opts), opts.json, report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
