"""Greedy outputs of two runs on the same weights, compared as vLLM's own model tests compare two
kernels (``check_logprobs_close``): equal up to the first token where they differ; there each run's
token must be among the other run's top candidates, and the comparison of that prompt ends (the two
continuations are different, equally valid texts). A token that the other run did not rank near the
top means a wrong activation, not rounding.

Used by the GPU tests, where CPU and GPU kernels round fp32 differently: a random-weight model has
nearly flat logits, so a near tie now and then goes either way. ``generate.py --logprobs K`` writes
the top-K candidates per position that this reads (``top``: per prompt, per position, ``[[token,
logprob], ...]``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    prompt: int
    #: "identical"; "near tie" (first difference with each token in the other's top-K: accepted);
    #: "differs" (a token outside the other's top-K, or no candidates to judge by: rejected)
    status: str
    position: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "differs"


def _candidates(top: list | None, position: int) -> dict[int, float]:
    if not top or position >= len(top) or top[position] is None:
        return {}
    return {int(token): float(logprob) for token, logprob in top[position]}


def compare_prompt(prompt: int, ref: list[int], got: list[int], ref_top: list | None, got_top: list | None) -> Verdict:
    """One prompt's verdict (see the module's docstring)."""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a == b:
            continue
        in_ref, in_got = _candidates(ref_top, i), _candidates(got_top, i)
        if b in in_ref and a in in_got:
            gap = abs(in_ref[a] - in_ref[b])
            return Verdict(prompt, "near tie", i, f"p{prompt}@{i}: {a} vs {b}, logprob gap {gap:.2e} in the reference")
        if not in_ref or not in_got:
            return Verdict(prompt, "differs", i, f"p{prompt}@{i}: {a} vs {b}, no top candidates to judge by")
        return Verdict(prompt, "differs", i, f"p{prompt}@{i}: {a} vs {b}, outside the other run's top {len(in_ref)}")
    if len(ref) != len(got):
        return Verdict(prompt, "differs", min(len(ref), len(got)), f"p{prompt}: {len(ref)} vs {len(got)} tokens")
    return Verdict(prompt, "identical")


def compare(ref: dict, got: dict) -> list[Verdict]:
    """Every prompt of two ``generate.py`` results (``tokens`` and, for near ties, ``top``)."""
    if len(ref["tokens"]) != len(got["tokens"]):
        return [Verdict(-1, "differs", None, f"{len(ref['tokens'])} vs {len(got['tokens'])} prompts")]
    ref_tops = ref.get("top") or [None] * len(ref["tokens"])
    got_tops = got.get("top") or [None] * len(got["tokens"])
    return [compare_prompt(i, list(a), list(b), rt, gt)
            for i, (a, b, rt, gt) in enumerate(zip(ref["tokens"], got["tokens"], ref_tops, got_tops))]


def summary(verdicts: list[Verdict]) -> str:
    """"8/8 identical" or "7/8 identical, 1 near tie (p6@5: ...)" and the rejected ones."""
    same = sum(v.status == "identical" for v in verdicts)
    text = f"{same}/{len(verdicts)} identical"
    for status in ("near tie", "differs"):
        found = [v.detail for v in verdicts if v.status == status]
        if found:
            text += f", {len(found)} {status} ({'; '.join(found)})"
    return text
