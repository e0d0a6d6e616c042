"""Micro-batches in flight: the rank plan's choice (planning.build.batches_in_flight, the setting
HETERO_SHIM_PIPELINE_BATCHES) and the engine core's batch queue after vLLM built it
(hetero_shim/patches/startup/pipeline_batches.py; the real engine: tests/integration/test_pipeline.py)."""

from __future__ import annotations

import types
from collections import deque

import pytest

from hetero_shim import settings
from hetero_shim.errors import HeteroConfigError
from hetero_shim.patches.startup import pipeline_batches
from hetero_shim.planning.build import batches_in_flight
from hetero_shim.planning.plan import RankPlan, plan_from_json, plan_to_json


def _pipeline(pp: int, tp: int, gpu_ranks: int, cpu_first: bool = True) -> RankPlan:
    return RankPlan(world_size=pp * tp, gpu_ranks=gpu_ranks, pp_size=pp, layers=(2,) * pp,
                    cpu_first=cpu_first and 0 < gpu_ranks < pp * tp)


@pytest.mark.parametrize(("pp", "tp", "gpus", "cpu_first", "want"), [
    (2, 1, 1, True, 1),  # CPU stage + GPU stage: one batch
    (2, 1, 1, False, 1),  # GPU stage first: the same
    (3, 1, 1, True, 2),  # two CPU stages + one GPU stage: one batch for each CPU stage
    (4, 2, 2, True, 3),  # TP=2 stages: three CPU stages beside one GPU stage
    (2, 1, 0, True, 0),  # all-CPU: vLLM's own
    (2, 1, 2, True, 0),  # all-GPU: vLLM's own
    (1, 2, 1, True, 0),  # no pipeline
])
def test_auto_keeps_one_batch_per_cpu_stage_beside_gpu_stages(pp, tp, gpus, cpu_first, want):
    plan = _pipeline(pp, tp, gpus, cpu_first)
    batches, why = batches_in_flight(plan, None)
    assert batches == want
    assert ("one per CPU stage" in why) == bool(want)


@pytest.mark.parametrize(("pp", "gpus", "wanted", "want"), [(2, 1, 1, 1), (2, 1, 2, 2), (2, 1, 5, 2), (2, 0, 1, 1),
                                                            (1, 0, 1, 0)])
def test_the_setting_caps_the_batches_in_any_pipeline(pp, gpus, wanted, want):
    batches, why = batches_in_flight(_pipeline(pp, 1, gpus), wanted)
    assert batches == want
    assert why == ("HETERO_SHIM_PIPELINE_BATCHES" if want else "")


def test_the_plan_carries_and_prints_the_choice():
    plan = RankPlan(world_size=2, gpu_ranks=1, pp_size=2, layers=(3, 5), cpu_first=True, batches=1,
                    batches_source="automatic: one per CPU stage, beside GPU stages")
    assert plan_from_json(plan_to_json(plan)) == plan
    assert "micro-batches in flight: 1 (automatic" in plan.describe()
    assert "micro-batches" not in _pipeline(2, 1, 0).describe()


def _core(size: int):
    """What EngineCore.__init__ leaves: a queue of ``size`` batches, or none (one stage, no async)."""
    core = types.SimpleNamespace(batch_queue_size=size, batch_queue=deque(maxlen=size) if size > 1 else None)

    def init(*args, **kwargs):
        return None

    return core, init


@pytest.mark.parametrize(("planned", "hetero", "size", "want"), [
    (1, True, 2, 1), (2, True, 4, 2), (3, True, 2, 2), (0, True, 2, 2), (None, True, 2, 2),
    (1, False, 2, 2), (1, True, 1, 1),
])
def test_the_queue_is_cut_to_the_plan_in_heterogeneous_mode_only(monkeypatch, planned, hetero, size, want):
    if planned is None:
        monkeypatch.delenv(settings.PLAN, raising=False)
    else:
        plan = RankPlan(world_size=2, gpu_ranks=1, pp_size=2, layers=(1, 1), batches=planned, batches_source="test")
        monkeypatch.setenv(settings.PLAN, plan_to_json(plan))
    if hetero:
        monkeypatch.setenv(settings.DEVICE, settings.HETEROGENEOUS)
    else:
        monkeypatch.delenv(settings.DEVICE, raising=False)
    core, init = _core(size)
    pipeline_batches.limit_batches_in_flight(init, core, (), {})
    assert core.batch_queue_size == want
    assert (core.batch_queue is None) == (size == 1)  # vLLM's own step keeps running where it had no queue
    if core.batch_queue is not None:
        assert core.batch_queue.maxlen == want


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_value_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(settings.PIPELINE_BATCHES, value)
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_PIPELINE_BATCHES=.* must be auto or a whole number"):
        settings.check_environment()
