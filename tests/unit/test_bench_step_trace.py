"""bench/step_trace.py: a two-stage pipeline's per-stage times from the workers' step traces."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import step_trace  # noqa: E402


def _steps(rank: int, periods_ms: list[float], stage0_ms: float, stage1_ms: float) -> list[dict]:
    """One token per step; stage 0 works ``stage0_ms``, stage 1 ends ``stage1_ms`` after it."""
    out, t = [], 0.0
    for period in periods_ms:
        start, end = t, t + stage0_ms / 1e3
        if rank == 1:
            end += stage1_ms / 1e3
        out.append({"rank": rank, "start": start, "end": end, "tokens": 1})
        t += period / 1e3
    return out


def test_pipeline_breakdown_medians_and_the_periods_tail():
    periods = [30.0] * 16 + [60.0, 70.0, 80.0, 90.0]  # a slow tail moves the mean, not the median
    first, last = _steps(0, periods, 25.0, 2.0), _steps(1, periods, 25.0, 2.0)
    row = step_trace.pipeline_breakdown(first, last)[1]
    assert row["steps"] == 20
    assert row["stage0_ms"] == 25.0 and row["stage1_work_ms"] == 2.0 and row["gap_ms"] == 3.0
    assert row["period_ms"] == 30.0  # the last step has no next start: 19 periods, the 90 ms one not among them
    assert row["period_p90_ms"] == 60.0  # index int(0.9 * 18) = 16 of the 19 sorted


def test_p90_takes_the_sorted_value_at_index_int_09_n_minus_1():
    assert step_trace.p90([5.0]) == 5.0
    assert step_trace.p90([float(v) for v in range(10, 0, -1)]) == 9.0
    assert step_trace.p90([float(v) for v in range(1, 21)]) == 18.0
    assert step_trace.pipeline_breakdown([], []) == {}
