"""The fused GPU all-reduce kernel (hetero_shim.collectives.fused_kernel): its source compiles with
NVRTC for the GPUs it may meet, and loading it never raises (it is optional).

The compile test needs libnvrtc (the CUDA builds of torch install it; on a CPU-only machine:
``pip install nvidia-cuda-nvrtc`` puts it where the loader looks). Running the kernel needs a
GPU: bench/allreduce.py --gpu-rank checks its sums, bits and back-to-back use on the H100."""

import pytest

from hetero_shim.collectives import fused_kernel as fused


def _nvrtc_or_skip():
    try:
        return fused._nvrtc()
    except OSError as e:
        pytest.skip(f"no libnvrtc here: {e}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_source_compiles(arch):
    _nvrtc_or_skip()
    cubin = fused.compile_cubin(arch)
    assert cubin[:4] == b"\x7fELF"
    for name in fused.KERNELS.values():
        assert name.encode() in cubin


def test_compile_error_carries_the_log():
    _nvrtc_or_skip()
    with pytest.raises(OSError, match="could not compile.*undefined_thing"):
        fused.compile_cubin("sm_90", source='extern "C" __global__ void k() { undefined_thing(); }')


def test_load_reports_why_instead_of_raising(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (6, 1))
    kernels, why = fused.load(0)
    assert kernels is None and "sm_61" in why
