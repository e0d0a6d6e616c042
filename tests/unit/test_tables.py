"""Every supported release's table resolves in that release's real wheel (manifests made
by scripts/check_tables.py from the PyPI wheels), with the parameters the wrappers read."""

import json
from pathlib import Path

import pytest

from hetero_shim import versions
from hetero_shim.patches import tables

DATA = Path(__file__).resolve().parents[1] / "data" / "vllm_symbols"


def manifest(release):
    path = DATA / f"{release}.json"
    assert path.exists(), f"no manifest for {release}: run scripts/check_tables.py --release {release}"
    data = json.loads(path.read_text())
    assert data["vllm_version"] == release
    return data["modules"]


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
                continue
            assert symbol["defined"], f"{release}: {site}:{patch.name} is not defined"
            if site != patch.module:
                assert symbol["kind"] == "import" and symbol["imported_from"] == patch.module
                continue
            assert symbol["kind"] in ("function", "method"), symbol
            missing = set(patch.needs_params) - set(symbol["params"])
            assert not missing, f"{release}: {patch.target} lacks parameters {missing}"


@pytest.mark.parametrize("release", tables.SUPPORTED)
def test_cpu_worker_class_exists(release):
    module, _, cls = tables.CPU_WORKER_CLS.rpartition(".")
    assert manifest(release)[module]["symbols"][cls]["kind"] == "class"


def test_each_patch_says_why_and_when_it_can_go():
    for release in tables.SUPPORTED:
        for patch in tables.table(release):
            assert patch.why and patch.remove_when, patch.target


def test_enable_refuses_exactly_the_releases_without_a_table():
    """enable() checks the release against versions.SUPPORTED, without importing this table."""
    assert versions.SUPPORTED == tables.SUPPORTED == tuple(tables.TABLES)


def test_unknown_release_has_no_table():
    assert "0.25.1" not in tables.TABLES and "0.34.0" not in tables.TABLES
