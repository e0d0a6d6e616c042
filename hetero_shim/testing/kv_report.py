"""Read the KV cache agreement line the shim logs in the engine core (see kv_cache_agreement)."""

from __future__ import annotations

import re

_LINE = re.compile(r"hetero_shim: KV cache budgets: (?P<ranks>.*?); (?P<per_block>\d+) B per block; "
                   r"agreed num_blocks=(?P<blocks>[\d,]+)")
_RANK = re.compile(r"rank (\d+) \((\w+|\?)\) (\d+) B")


def parse(log_text: str) -> dict | None:
    """{'budgets': {rank: bytes}, 'kinds': {rank: kind}, 'per_block': int, 'blocks': [int]} or None."""
    found = list(_LINE.finditer(log_text))
    if not found:
        return None
    m = found[-1]
    ranks = _RANK.findall(m["ranks"])
    return {
        "budgets": {int(r): int(b) for r, _, b in ranks},
        "kinds": {int(r): k for r, k, _ in ranks},
        "per_block": int(m["per_block"]),
        "blocks": [int(b) for b in m["blocks"].split(",")],
    }


def smallest_budget_wins(report: dict) -> bool:
    """The agreed block count is what the smallest budget holds (one value for every rank)."""
    expected = min(report["budgets"].values()) // report["per_block"]
    return report["blocks"] == [expected]
