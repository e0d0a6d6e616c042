"""The patch ledger on throwaway modules: post-import application, aliases, no double
wrapping, restore by identity, refusal of a missing target."""

import importlib
import itertools
import sys

import pytest
import wrapt

from hetero_shim import run_state
from hetero_shim.errors import PatchTargetMissing
from hetero_shim.registry import Ledger, Patch

_counter = itertools.count()


def make_modules(tmp_path):
    """A target module and a module that did `from target import func`."""
    n = next(_counter)
    target, alias = f"fake_target_{n}", f"fake_alias_{n}"
    (tmp_path / f"{target}.py").write_text(
        "def func(x):\n    return x\n\nclass Box:\n    def get(self, x):\n        return x\n"
        "    @staticmethod\n    def make(x):\n        return x\n"
    )
    (tmp_path / f"{alias}.py").write_text(f"from {target} import func\n")
    sys.path.insert(0, str(tmp_path))
    return target, alias


def plus_one(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs) + 1


def patches(target, alias):
    return (
        Patch("t", target, "func", plus_one, "why", "when", aliases=(alias,)),
        Patch("t", target, "Box.get", plus_one, "why", "when"),
        Patch("t", target, "Box.make", plus_one, "why", "when"),
    )


def test_applied_on_import_and_restored_by_identity(tmp_path):
    target, alias = make_modules(tmp_path)
    ledger = Ledger()
    ledger.install(patches(target, alias))
    assert target not in sys.modules  # nothing imported by installing
    mod = importlib.import_module(target)
    alias_mod = importlib.import_module(alias)
    originals = {name: ledger.original(target, name) for name in ("func", "Box.get", "Box.make")}
    assert mod.func(1) == 2 and alias_mod.func(1) == 2
    assert mod.Box().get(1) == 2 and mod.Box.make(1) == 2
    assert ledger.remove_all() == []
    assert mod.func is originals["func"] and alias_mod.func is originals["func"]
    assert vars(mod.Box)["get"] is originals["Box.get"] and vars(mod.Box)["make"] is originals["Box.make"]
    assert mod.func(1) == 1 and mod.Box.make(1) == 1


def test_already_imported_module_is_patched_at_once_and_never_twice(tmp_path):
    target, alias = make_modules(tmp_path)
    mod = importlib.import_module(target)
    ledger = Ledger()
    ledger.install(patches(target, alias))
    ledger.install(patches(target, alias))  # a second enable()
    assert mod.func(1) == 2
    assert isinstance(mod.func, wrapt.FunctionWrapper)
    assert not isinstance(mod.func.__wrapped__, wrapt.FunctionWrapper)  # not double wrapped
    ledger.remove_all()
    ledger.install(patches(target, alias))  # enable / disable / enable
    assert mod.func(1) == 2 and not isinstance(mod.func.__wrapped__, wrapt.FunctionWrapper)


def test_missing_target_is_refused(tmp_path):
    target, _ = make_modules(tmp_path)
    ledger = Ledger()
    ledger.install((Patch("t", target, "gone", plus_one, "why", "when"),))
    with pytest.raises(PatchTargetMissing, match="gone"):
        importlib.import_module(target)


def test_optional_missing_target_is_reported(tmp_path):
    target, _ = make_modules(tmp_path)
    ledger = Ledger()
    ledger.install((Patch("t", target, "gone", plus_one, "why", "when", optional=True),))
    importlib.import_module(target)
    assert ledger.missing and "gone" in ledger.missing[0]


def test_describe_lists_applied_and_pending(tmp_path):
    target, alias = make_modules(tmp_path)
    ledger = Ledger()
    ledger.install(patches(target, alias))
    importlib.import_module(target)
    row = ledger.describe()[0]
    assert row["applied_in"] == [target] and row["pending"] == [alias]


def test_hetero_only_patch_waits_for_heterogeneous_mode(tmp_path, monkeypatch):
    """A per-step target stays vLLM's own function while the mode is off, and is wrapped once the
    process enters heterogeneous mode (imported before or after that)."""
    monkeypatch.delenv("HETERO_SHIM_DEVICE", raising=False)
    target, alias = make_modules(tmp_path)
    ledger = Ledger(gate=run_state.heterogeneous)
    ledger.install((Patch("t", target, "Box.get", plus_one, "why", "when", hetero_only=True),
                    Patch("t", target, "func", plus_one, "why", "when", aliases=(alias,))))
    mod = importlib.import_module(target)
    assert not isinstance(vars(mod.Box)["get"], wrapt.FunctionWrapper) and mod.Box().get(1) == 1
    assert mod.func(1) == 2  # the start-up kind of patch is applied at once
    assert ledger.describe()[0]["waiting_for_mode"] == [target]
    ledger.mode_entered()  # still off: nothing changes
    assert mod.Box().get(1) == 1
    monkeypatch.setenv("HETERO_SHIM_DEVICE", "heterogeneous")
    ledger.mode_entered()
    assert mod.Box().get(1) == 2 and ledger.describe()[0]["waiting_for_mode"] == []
    assert ledger.remove_all() == [] and mod.Box().get(1) == 1


def test_hetero_only_patch_applied_on_import_in_heterogeneous_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_SHIM_DEVICE", "heterogeneous")  # a worker process of a heterogeneous run
    target, _ = make_modules(tmp_path)
    ledger = Ledger(gate=run_state.heterogeneous)
    ledger.install((Patch("t", target, "Box.get", plus_one, "why", "when", hetero_only=True),))
    mod = importlib.import_module(target)
    assert mod.Box().get(1) == 2
    ledger.remove_all()


def test_describe_says_what_upstream_lacks(tmp_path):
    target, _ = make_modules(tmp_path)
    ledger = Ledger()
    ledger.install((Patch("t", target, "func", plus_one, "why", "when", upstream="one class for all"),))
    row = ledger.describe()[0]
    assert (row["why"], row["upstream"], row["remove_when"]) == ("why", "one class for all", "when")
    ledger.remove_all()
    assert ledger.describe() == []  # after disable() status() lists nothing as patched


def times_ten(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs) * 10


@pytest.mark.parametrize("imported_first", [False, True])
def test_two_concerns_wrap_one_target_in_table_order(tmp_path, imported_first):
    """expert_choice and expert_parallel both wrap vLLM 0.26's CPU routing function: the row installed
    first is the inner wrapper, each concern wraps once, and undo restores vLLM's function."""
    target, alias = make_modules(tmp_path)
    if imported_first:
        importlib.import_module(target)
    rows = (Patch("inner", target, "func", plus_one, "why", "when", aliases=(alias,)),
            Patch("outer", target, "func", times_ten, "why", "when", aliases=(alias,)))
    ledger = Ledger()
    ledger.install(rows)
    ledger.install(rows)  # a second enable(): neither concern wraps twice
    mod = importlib.import_module(target)
    alias_mod = importlib.import_module(alias)  # imported after both wrapped the primary: holds the outer wrapper
    assert mod.func(1) == 20 and alias_mod.func(1) == 20  # (1 + 1) * 10: plus_one runs first, inside
    assert not isinstance(mod.func.__wrapped__.__wrapped__, wrapt.FunctionWrapper)
    original = ledger.original(target, "func")
    assert not isinstance(original, wrapt.FunctionWrapper) and original(1) == 1
    assert [row["applied_in"] for row in ledger.describe()] == [[target, alias], [target, alias]]
    assert ledger.remove_all() == []
    assert mod.func is original and alias_mod.func is original and mod.func(1) == 1
