"""Choosing the split's share while the CPU rank runs (hetero_shim/collectives/share_choice.py): pure
logic, fed the costs a host would give."""

from __future__ import annotations

import pytest

from hetero_shim.collectives.share_choice import ShareChooser, size_class, size_text

KINDS = ("low", "split", "wide")


def _run(chooser: ShareChooser, tokens: int, cost, steps: int) -> list[str]:
    """``steps`` steps of ``tokens`` tokens, each costing ``cost(kind)``; the kinds chosen."""
    chosen = []
    for _ in range(steps):
        kind = chooser.choose(tokens)
        chosen.append(kind)
        chooser.record(tokens, kind, cost(kind))
    return chosen


def test_step_sizes_are_classed_by_powers_of_two():
    assert [size_class(t) for t in (0, 1, 2, 3, 4, 7, 8, 15, 16, 64, 512)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]
    assert [size_text(t) for t in (1, 3, 4, 8, 16, 99)] == ["1", "2-3", "4-7", "8-15", "16 or more", "16 or more"]


@pytest.mark.parametrize("best", KINDS)
def test_each_share_is_tried_then_the_cheapest_kept(best):
    """The default's share first, then the others, each for one uncounted and ``trials`` counted
    steps; then the cheapest is kept."""
    chooser = ShareChooser(KINDS, default=1, trials=3, revisit=1000)
    costs = {kind: 0.030 for kind in KINDS} | {best: 0.020}
    chosen = _run(chooser, 1, costs.__getitem__, 12 + 20)
    assert chosen[:12] == ["split"] * 4 + ["low"] * 4 + ["wide"] * 4
    assert chooser.kept(1) == best and chosen[12:] == [best] * 20
    assert chooser.medians(1) == {kind: (0.020 if kind == best else 0.030) for kind in KINDS}
    assert chooser.medians(16) == {}  # no step of that size yet


def test_the_first_step_of_a_run_is_not_counted():
    """A share whose first step after a change is slow (the copies ahead were of the other rows) is
    judged by its later steps."""
    chooser = ShareChooser(KINDS, default=1, trials=2, revisit=1000)
    seen = {"last": None}

    def cost(kind):
        first = seen["last"] != kind
        seen["last"] = kind
        return {"low": 0.010, "split": 0.020, "wide": 0.030}[kind] + (1.0 if first else 0.0)

    _run(chooser, 1, cost, 9 + 1)
    assert chooser.kept(1) == "low"


def test_a_tie_keeps_the_default_and_sizes_are_chosen_apart():
    chooser = ShareChooser(KINDS, default=1, trials=2, revisit=1000)
    _run(chooser, 1, lambda kind: 0.02, 9 + 1)
    assert chooser.kept(1) == "split"
    assert chooser.kept(16) is None  # no 16-token step yet: its trials have not begun
    _run(chooser, 16, lambda kind: {"wide": 0.01}.get(kind, 0.02), 9 + 1)
    assert chooser.kept(16) == "wide" and chooser.kept(1) == "split"


def test_the_kept_share_and_its_neighbours_are_tried_again():
    """After ``revisit`` steps the kept share and its neighbours get fresh trials, so a host whose
    rates drifted gets the share that is cheapest now."""
    chooser = ShareChooser(KINDS, default=1, trials=2, revisit=5)
    _run(chooser, 1, {"low": 0.01, "split": 0.02, "wide": 0.03}.__getitem__, 9)
    assert chooser.kept(1) == "low"
    drifted = {"low": 0.03, "split": 0.01, "wide": 0.02}.__getitem__
    chosen = _run(chooser, 1, drifted, 5 + 6 + 1)
    assert chosen[:5] == ["low"] * 5  # kept until the revisit
    assert chosen[5:11] == ["low"] * 3 + ["split"] * 3  # low's neighbours: split only (no lower share)
    assert chooser.kept(1) == "split" and chosen[11] == "split"


def test_a_default_outside_the_kinds_is_refused():
    with pytest.raises(ValueError, match="default 3"):
        ShareChooser(KINDS, default=3)
