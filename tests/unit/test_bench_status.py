"""The harness's row status: a configuration stopped by its own --timeout and one stopped because
the harness's --deadline ran out are told apart."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import run  # noqa: E402

PLAN = {"name": "hetero-pp2"}


def outcome(**kw) -> dict:
    return {"values": {"start_s": 80.0, "decode_b1_tok_s": 18.7}, "interrupted": False, "timed_out": True} | kw


def test_a_deadline_cut_is_not_reported_as_a_timeout():
    status, reason = run.classify(PLAN, outcome(cut_by_deadline=True))
    assert status == "deadline"
    assert "--deadline" in reason and "decode_b1_tok_s" in reason


def test_the_configuration_own_limit_is_a_timeout():
    status, reason = run.classify(PLAN, outcome(cut_by_deadline=False))
    assert status == "timeout"
    assert "--timeout" in reason and "start_s" in reason


def test_finished_rows_are_ok_whatever_the_limit():
    assert run.classify(PLAN, outcome(timed_out=False, cut_by_deadline=True,
                                      values={"done": True}))[0] == "ok"
