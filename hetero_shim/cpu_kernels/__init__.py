"""CPU kernels for vLLM's CPU path on a vLLM build that lacks them (the CUDA wheel)."""

from __future__ import annotations


def install_fallback() -> list[str]:
    """Register pure-PyTorch versions of the missing ``torch.ops._C`` CPU ops; return their names.

    Registers only what is absent (see :mod:`hetero_shim.cpu_kernels.fallback`); a no-op when
    vLLM's native CPU kernels are already loaded.
    """
    from hetero_shim.cpu_kernels import fallback

    return fallback.install()


__all__ = ["install_fallback"]
