"""Every supported release's table resolves in that release's real wheel (manifests made
by scripts/check_tables.py from the PyPI wheels), with each parameter the wrappers read at the
position they read it from."""

import json
from pathlib import Path

import pytest

from hetero_shim import versions
from hetero_shim.errors import UnsupportedVllmVersion
from hetero_shim.patches import tables
from hetero_shim.patches.startup import worker_selection

DATA = Path(__file__).resolve().parents[1] / "data" / "vllm_symbols"


def manifest(release):
    path = DATA / f"{release}.json"
    assert path.exists(), f"no manifest for {release}: run scripts/check_tables.py --release {release}"
    data = json.loads(path.read_text())
    assert data["vllm_version"] == release
    return data["modules"]


def positional(symbol: dict) -> list[str]:
    """The parameters as a wrapt wrapper's ``args`` holds them: without self/cls, staticmethods as they are."""
    params = symbol["params"]
    bound = symbol["kind"] in ("method", "async_method") and not symbol.get("staticmethod")
    return params[1:] if bound else params


@pytest.mark.parametrize("release", tables.SUPPORTED)
def test_every_target_resolves_in_the_release_wheel(release):
    modules = manifest(release)
    for patch in tables.table(release):
        for site in dict.fromkeys((patch.module, *patch.sites())):
            module = modules.get(site)
            assert module and module["exists"], f"{release}: module {site} missing"
            symbol = module["symbols"].get(patch.name)
            assert symbol is not None, f"{release}: {site}:{patch.name} not in manifest"
            if patch.name.endswith(".__init__") and not symbol["defined"]:
                cls = module["symbols"][patch.name.rsplit(".", 1)[0]]
                assert "dataclass" in cls["decorators"], f"{release}: {patch.target} neither defined nor generated"
                assert not patch.params, f"{patch.target}: a generated __init__ has no positions to check"
                continue
            assert symbol["defined"], f"{release}: {site}:{patch.name} is not defined"
            if site != patch.module:
                assert symbol["kind"] == "import" and symbol["imported_from"] == patch.module
                continue
            assert symbol["kind"] in ("function", "method"), symbol
            missing = set(patch.params.positions) - set(symbol["params"])
            assert not missing, f"{release}: {patch.target} lacks parameters {missing}"


@pytest.mark.parametrize("release", tables.SUPPORTED)
def test_each_declared_position_matches_the_release_signature(release):
    """A wrapper reads a parameter by name or, when the caller passed it positionally, by the position
    its row declares: that position must hold that parameter in every release."""
    modules = manifest(release)
    checked = 0
    for patch in tables.table(release):
        if not patch.params:
            continue
        symbol = modules[patch.module]["symbols"][patch.name]
        order = positional(symbol)
        for name, position in patch.params.positions.items():
            found = order[position] if position < len(order) else None
            assert found == name, (
                f"{release}: {patch.target} has {found!r} at position {position}, not {name!r} "
                f"(parameters after self/cls: {order})"
            )
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("release", tables.SUPPORTED)
def test_cpu_worker_class_exists(release):
    module, _, cls = worker_selection.CPU_WORKER_CLS.rpartition(".")
    assert manifest(release)[module]["symbols"][cls]["kind"] == "class"


def test_each_patch_says_why_and_when_it_can_go():
    for release in tables.SUPPORTED:
        for patch in tables.table(release):
            assert patch.why and patch.remove_when and patch.upstream, patch.target


def test_enable_refuses_exactly_the_releases_without_a_table():
    """enable() checks the release against versions.SUPPORTED, without importing the tables: one list."""
    assert tables.SUPPORTED is versions.SUPPORTED
    assert list(versions.SUPPORTED) == sorted(versions.SUPPORTED, key=versions.release_key)
    assert all(tables.table(release) for release in versions.SUPPORTED)
    assert set(versions.RUN_FOR_REAL) <= set(versions.SUPPORTED)


def test_unknown_release_has_no_table():
    for release in ("0.25.1", "0.34.0"):
        with pytest.raises(UnsupportedVllmVersion, match=release):
            tables.table(release)


def test_wrappers_read_arguments_only_through_declared_params():
    """No wrapper reads ``args[i]`` or binds the signature itself: positions live in the rows' Params."""
    for concern in tables.CONCERNS:
        text = Path(concern.__file__).read_text()
        for pattern in ("args[0]", "args[1]", "args[2]", "inspect.signature", "argument(args"):
            assert pattern not in text, f"{concern.__name__} reads {pattern!r}; declare a Params beside its row"
