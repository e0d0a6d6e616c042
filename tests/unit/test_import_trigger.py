"""import_trigger on throwaway packages: the callback runs once, before the package's code,
not on a mere probe; the package keeps its real loader; a failing callback fails the import
(and the next one); disarm cancels; an imported package runs the callback at once."""

import importlib
import importlib.util
import itertools
import sys
import types

import pytest

from hetero_shim import import_trigger

_counter = itertools.count()
EVENTS: list[str] = []
RECORD = "import trigger_events\ntrigger_events.EVENTS.append({what!r})\n"  # what the packages run


def make_package(tmp_path) -> str:
    """A package whose code records that it ran, and whether the callback had run before it."""
    name = f"fake_pkg_{next(_counter)}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        RECORD.format(what="package code") +
        "LOADER_TYPE = type(__loader__).__name__\n"
    )
    (pkg / "data.txt").write_text("hello")
    sys.path.insert(0, str(tmp_path))
    return name


def callback():
    EVENTS.append("callback")


@pytest.fixture(autouse=True)
def clean():
    EVENTS.clear()
    recorder = types.ModuleType("trigger_events")
    recorder.EVENTS = EVENTS
    sys.modules["trigger_events"] = recorder
    before = list(sys.meta_path)
    yield
    sys.meta_path[:] = before
    del sys.modules["trigger_events"]


def test_callback_runs_once_before_the_package_code(tmp_path):
    name = make_package(tmp_path)
    trigger = import_trigger.run_before_import(name, callback)
    assert trigger.armed and EVENTS == []
    module = importlib.import_module(name)
    assert EVENTS == ["callback", "package code"]
    assert not trigger.armed and trigger.fired
    assert module.LOADER_TYPE == "SourceFileLoader" and type(module.__spec__.loader).__name__ == "SourceFileLoader"
    assert importlib.resources.files(name).joinpath("data.txt").read_text() == "hello"
    del sys.modules[name]
    importlib.import_module(name)  # imported again (e.g. after a reload): the callback does not run again
    assert EVENTS == ["callback", "package code", "package code"]


def test_a_probe_does_not_fire(tmp_path):
    name = make_package(tmp_path)
    trigger = import_trigger.run_before_import(name, callback)
    assert importlib.util.find_spec(name) is not None  # what libraries do to see what is installed
    assert EVENTS == [] and trigger.armed
    importlib.import_module(name)
    assert EVENTS == ["callback", "package code"]


def test_disarm_cancels(tmp_path):
    name = make_package(tmp_path)
    trigger = import_trigger.run_before_import(name, callback)
    trigger.disarm()
    assert not trigger.armed
    importlib.import_module(name)
    assert EVENTS == ["package code"]


def test_imported_package_runs_the_callback_at_once(tmp_path):
    name = make_package(tmp_path)
    importlib.import_module(name)
    assert import_trigger.run_before_import(name, callback) is None
    assert EVENTS == ["package code", "callback"]


def test_failing_callback_fails_this_import_and_the_next(tmp_path):
    name = make_package(tmp_path)

    def broken():
        raise RuntimeError("patch table broken")

    trigger = import_trigger.run_before_import(name, broken)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="patch table broken"):
            importlib.import_module(name)
        assert name not in sys.modules and trigger.armed
    assert EVENTS == []


def test_missing_package_is_not_found_and_stays_armed(tmp_path):
    name = f"fake_pkg_{next(_counter)}"
    trigger = import_trigger.run_before_import(name, callback)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)
    assert trigger.armed
    (tmp_path / f"{name}.py").write_text(RECORD.format(what="package code"))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    importlib.import_module(name)  # installed later: the finders after the trigger still find it
    assert EVENTS == ["callback", "package code"]


def test_submodules_and_other_packages_are_left_alone(tmp_path):
    name = make_package(tmp_path)
    (tmp_path / name / "sub.py").write_text(RECORD.format(what="sub"))
    other = make_package(tmp_path)
    import_trigger.run_before_import(name, callback)
    importlib.import_module(other)
    assert EVENTS == ["package code"]
    importlib.import_module(f"{name}.sub")
    assert EVENTS == ["package code", "callback", "package code", "sub"]


def test_old_style_loader_runs_the_callback_when_found():
    """A loader without exec_module cannot be preceded: the callback runs when the spec is found."""
    name = f"fake_pkg_{next(_counter)}"

    class LegacyLoader:
        def load_module(self, fullname):
            EVENTS.append("package code")
            module = sys.modules[fullname] = types.ModuleType(fullname)
            return module

    class LegacyFinder:
        def find_spec(self, fullname, path=None, target=None):
            return importlib.util.spec_from_loader(fullname, LegacyLoader()) if fullname == name else None

    sys.meta_path.append(LegacyFinder())
    import_trigger.run_before_import(name, callback)
    with pytest.warns(ImportWarning):
        importlib.import_module(name)
    assert EVENTS == ["callback", "package code"]
