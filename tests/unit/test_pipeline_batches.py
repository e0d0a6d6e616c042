"""HETERO_SHIM_PIPELINE_BATCHES: the setting, and the engine core's batch queue after vLLM built it
(hetero_shim/patches/startup/pipeline_batches.py; the real engine: tests/integration/test_pipeline.py)."""

from __future__ import annotations

import types
from collections import deque

import pytest

from hetero_shim import settings
from hetero_shim.errors import HeteroConfigError
from hetero_shim.patches.startup import pipeline_batches


def _core(size: int):
    """What EngineCore.__init__ leaves: a queue of ``size`` batches, or none (one stage, no async)."""
    core = types.SimpleNamespace(batch_queue_size=size, batch_queue=deque(maxlen=size) if size > 1 else None)

    def init(*args, **kwargs):
        return None

    return core, init


@pytest.mark.parametrize(("value", "hetero", "size", "want"), [
    ("1", True, 2, 1), ("2", True, 4, 2), ("3", True, 2, 2), ("auto", True, 2, 2), ("", True, 2, 2),
    ("1", False, 2, 2), ("1", True, 1, 1),
])
def test_the_queue_is_cut_to_the_setting_in_heterogeneous_mode_only(monkeypatch, value, hetero, size, want):
    monkeypatch.setenv(settings.PIPELINE_BATCHES, value)
    monkeypatch.setattr(pipeline_batches.run_state, "heterogeneous", lambda: hetero)
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
