"""Compat tripwires (vllm-spyre's habit): every patch row names facts about upstream's source
that make it necessary; the manifests (scripts/check_tables.py, from each release's wheel) record
whether each fact's pattern occurs. A fact that no longer holds means upstream changed: the patch
may be dead for that release and should be removed (or its fact restated after a mere refactor).
A row marked ``stale`` (upstream has the fix, the patch is kept for the reason it gives) must be
backed by a fact that indeed fails."""

import json
from pathlib import Path

import pytest

from hetero_shim.patches import tables

DATA = Path(__file__).resolve().parents[1] / "data" / "vllm_symbols"


def found(modules: dict, fact) -> bool | None:
    """Whether the manifest saw the fact's pattern in its symbol; None if it was not recorded."""
    symbol = modules.get(fact.module, {}).get("symbols", {}).get(fact.symbol)
    if symbol is None or not symbol.get("defined"):
        return None
    return symbol.get("contains", {}).get(fact.pattern)


def failed_facts(release: str, modules: dict) -> tuple[list[str], list[str]]:
    """(stale patches, facts the manifest does not record) for one release's table."""
    stale, unrecorded = [], []
    for patch in tables.table(release):
        broken = []
        for fact in patch.tripwires:
            seen = found(modules, fact)
            if seen is None:
                unrecorded.append(f"{fact.where} /{fact.pattern}/ ({patch.concern})")
            elif seen != fact.present:
                broken.append(f"{fact.where} {'no longer' if fact.present else 'now'} matches /{fact.pattern}/: "
                              f"{'not ' if fact.present else ''}true that {fact.meaning}")
        if patch.stale:
            if not broken and patch.tripwires:
                stale.append(f"vLLM {release}: patch {patch.concern} ({patch.target}) is marked stale "
                             f"but every tripwire still holds; drop the mark")
        elif broken:
            stale.append(f"vLLM {release}: patch {patch.concern} ({patch.target}) is stale and can be removed for "
                         f"this release (or its fact restated if upstream only moved code): " + "; ".join(broken))
    return stale, unrecorded


@pytest.mark.parametrize("release", tables.SUPPORTED)
def test_every_patch_is_still_needed(release):
    path = DATA / f"{release}.json"
    assert path.exists(), f"no manifest for {release}: run scripts/check_tables.py --release {release}"
    stale, unrecorded = failed_facts(release, json.loads(path.read_text())["modules"])
    assert not unrecorded, f"vLLM {release}: facts missing from the manifest (run scripts/check_tables.py): " + \
        ", ".join(unrecorded)
    assert not stale, "\n".join(stale)


def test_every_patch_has_a_tripwire():
    for release in tables.SUPPORTED:
        for patch in tables.table(release):
            assert patch.tripwires, f"{release}: {patch.target} names no fact about upstream that makes it needed"
            for fact in patch.tripwires:
                assert fact.meaning and fact.pattern, fact


def test_a_changed_upstream_fires_the_tripwire(tmp_path):
    """The check itself: a manifest whose fact flipped names the stale patch and the release."""
    release = tables.SUPPORTED[-1]
    modules = json.loads((DATA / f"{release}.json").read_text())["modules"]
    patch = next(p for p in tables.table(release) if p.concern == "worker selection")
    fact = patch.tripwires[0]
    modules[fact.module]["symbols"][fact.symbol]["contains"][fact.pattern] = not fact.present
    stale, _ = failed_facts(release, modules)
    assert len(stale) == 1
    assert f"vLLM {release}: patch worker selection ({patch.target}) is stale and can be removed" in stale[0]
