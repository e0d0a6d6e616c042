"""What a CPU stage's wait for the next stage's GPU rank is made of, from the request timings of
bench/breakdown/hsbench_channel.py (DIR/<pid>.channel.json of the CPU rank and of the GPU rank).

Each request, on one clock: the CPU rank publishes it (``start`` ends), computes its own rows,
begins to wait (``wait``), sees the answer, joins the rows (``finish`` ends); the GPU rank picks it
up (``serve`` begins), queues the copies and GEMMs (``queue``), waits for its GPU and answers
(``serve`` ends). The wait is cut into the phases of the GPU rank it overlaps:

- pick-up: published .. picked up (the GPU rank's loop noticing the request);
- prepare: picked up .. queuing begins (reading the request, the activations to the GPU);
- queue: the host queuing the pieces' copies and GEMMs;
- GPU: queued .. answered (its synchronize: copies, GEMMs and the rows back to shared memory);
- notice: answered .. the CPU rank saw it.

A server without ``queue`` records (the CPU stand-in of tests) has one phase, "serve", instead of
prepare, queue and GPU. A request the server queued before it came (``HETERO_SHIM_CPU_GEMM_QUEUE_STEP``:
no ``serve`` record, the GPU rank's host is not involved) has one phase, "queued": published .. the
CPU rank saw the answer. Stdlib only.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

PHASES = ("pick-up", "prepare", "queue", "GPU", "serve", "notice", "queued")


def load(trace_dir: Path) -> list[dict]:
    """Every DIR/<pid>.channel.json: {meta..., "windows", "records"}."""
    out = []
    for path in sorted(Path(trace_dir).glob("*.channel.json")):
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return out


def _by_request(records: list, what: str) -> dict[int, list]:
    """Records of ``what`` by request number (the client numbers its requests once, 1, 2, ...)."""
    return {r[1]: r for r in records if r[0] == what}


def requests(client: list, server: list) -> list[dict]:
    """One dict per request timed on both sides (matched by request number): the stamps (seconds)
    and its phases' intervals."""
    starts, waits, finishes = (_by_request(client, w) for w in ("start", "wait", "finish"))
    serves = _by_request(server, "serve")
    served_steps = {r[2] for r in serves.values()}
    queues = sorted((r for r in server if r[0] == "queue"), key=lambda r: r[4])
    aheads = [r for r in server if r[0] == "ahead"]
    out = []
    for key, start in sorted(starts.items(), key=lambda kv: kv[1][4]):
        wait, finish, serve = waits.get(key), finishes.get(key), serves.get(key)
        if wait is None:
            continue
        if serve is None and start[2] not in served_steps:  # the server did not time this step
            continue
        published = start[5]
        if serve is None:  # queued by the server before it came
            phases = {"queued": (published, wait[5])}
        else:
            phases = _served_phases(published, wait, serve, queues, aheads)
        out.append({"step": start[2], "request": key, "tokens": start[3], "published": published,
                    "wait": (wait[4], wait[5]), "joined": finish[5] if finish else wait[5], "phases": phases})
    return out


def _served_phases(published: float, wait: list, serve: list, queues: list, aheads: list) -> dict:
    """The phases of a request the server picked up: pick-up, then prepare, queue and GPU (or one
    "serve" without ``queue`` records), then notice."""
    picked = serve[4]
    # a serve that queued the step's later requests answered before it queued them
    answered = min([a[4] for a in aheads if picked <= a[4] <= serve[5]] + [serve[5]])
    inside = [q for q in queues if picked <= q[4] and q[5] <= answered]
    if inside:
        first, last = inside[0][4], inside[-1][5]
        phases = {"pick-up": (published, picked), "prepare": (picked, first), "queue": (first, last),
                  "GPU": (last, answered)}
    else:
        phases = {"pick-up": (published, picked), "serve": (picked, answered)}
    phases["notice"] = (answered, wait[5])
    return phases


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def summarize(client: list, server: list) -> dict[int, dict]:
    """Per token count: ms per step of the wait, of the CPU's own work between publishing and
    waiting, and of the join; the wait's ms per step in each phase; each phase's median length."""
    by_tokens: dict[int, list[dict]] = {}
    for req in requests(client, server):
        by_tokens.setdefault(req["tokens"], []).append(req)
    out = {}
    for tokens, reqs in sorted(by_tokens.items()):
        steps = len({r["step"] for r in reqs})
        waited = sum(r["wait"][1] - r["wait"][0] for r in reqs)
        own = sum(max(0.0, r["wait"][0] - r["published"]) for r in reqs)
        joined = sum(r["joined"] - r["wait"][1] for r in reqs)
        in_wait = {p: 0.0 for p in PHASES}
        lengths: dict[str, list[float]] = {}
        for r in reqs:
            for name, span in r["phases"].items():
                in_wait[name] += _overlap(span, r["wait"])
                lengths.setdefault(name, []).append(max(0.0, span[1] - span[0]))
        out[tokens] = {
            "steps": steps, "requests_per_step": round(len(reqs) / steps, 1),
            "wait_ms": round(waited * 1e3 / steps, 3), "own_ms": round(own * 1e3 / steps, 3),
            "join_ms": round(joined * 1e3 / steps, 3),
            "wait_in_ms": {p: round(v * 1e3 / steps, 3) for p, v in in_wait.items() if p in lengths},
            "median_us": {p: round(statistics.median(v) * 1e6, 1) for p, v in lengths.items()},
        }
    return out


def pairs(timings: list[dict]) -> list[tuple[dict, dict]]:
    """(CPU rank's, GPU rank's) timings of each channel, matched by TP rank (one pair per TP rank)."""
    clients = [t for t in timings if any(r[0] == "start" for r in t["records"])]
    servers = [t for t in timings if any(r[0] == "serve" for r in t["records"])]
    out = []
    for c in clients:
        match = [s for s in servers if s.get("tp_rank") == c.get("tp_rank")] or servers[:1]
        if match:
            out.append((c, match[0]))
    return out


def text(summary: dict[int, dict]) -> list[str]:
    lines = []
    for tokens, row in summary.items():
        phases = " | ".join(f"{p} {v:.2f}" for p, v in row["wait_in_ms"].items())
        medians = ", ".join(f"{p} {v:.0f}" for p, v in row["median_us"].items())
        lines.append(f"    channel {tokens} tok x {row['steps']} steps, {row['requests_per_step']} requests a step: "
                     f"waits {row['wait_ms']:.2f} ms/step ({phases}); own work {row['own_ms']:.2f}, "
                     f"join {row['join_ms']:.2f}; phase medians us: {medians}")
    return lines
