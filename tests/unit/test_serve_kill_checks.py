"""The checks after a rank is killed while serving (hetero_shim.testing.fault_check.serve_checks):
a request open at the hit must fail or carry every token; the hit must fail at least one."""

from hetero_shim.testing import fault_check

BASE = {"requests_hung": 0, "first_503_s": 1.0, "exit_code": 0, "seconds_to_exit": 8.0,
        "named": ["VllmWorker-1 died unexpectedly"], "left_after_exit": []}
FAILED_OR_FULL = "every request in flight at the hit failed or got all its tokens (none truncated, none lost silently)"
LANDED = "the hit landed while generating: a request in flight at it failed"


def checks(at_hit, failed, full):
    return fault_check.serve_checks({**BASE, "in_flight_at_hit": at_hit, "in_flight_failed": failed,
                                     "in_flight_full": full}, 30.0)


def test_open_requests_that_failed_or_were_full_pass():
    found = checks(at_hit=32, failed=20, full=12)
    assert all(found.values()), found


def test_a_request_open_at_the_hit_that_ended_short_without_error_fails():
    found = checks(at_hit=32, failed=20, full=11)
    assert not found[FAILED_OR_FULL] and found[LANDED]


def test_a_hit_after_the_engine_finished_everything_fails():
    found = checks(at_hit=29, failed=0, full=29)
    assert not found[LANDED] and found[FAILED_OR_FULL]


def test_usage_is_read_from_a_body_or_the_last_stream_chunk():
    assert fault_check._usage('{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 480}}') == 480
    assert fault_check._usage('{"choices": [{"text": "a"}], "usage": null}') is None
    assert fault_check._usage("not json") is None
