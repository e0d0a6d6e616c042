"""hetero_shim.testing.closeness: identical, near tie (accepted) and a real difference (rejected)."""

from hetero_shim.testing import closeness


def top(*positions):
    return [[[t, lp] for t, lp in pos] for pos in positions]


def test_identical_prompts_pass():
    v = closeness.compare({"tokens": [[1, 2, 3]]}, {"tokens": [[1, 2, 3]]})
    assert [x.status for x in v] == ["identical"] and v[0].ok


def test_a_near_tie_is_accepted_and_ends_the_prompt():
    ref = {"tokens": [[1, 2, 3]], "top": [top([(1, -0.1)], [(2, -0.70), (5, -0.70015)], [(3, -1.0)])]}
    got = {"tokens": [[1, 5, 9]], "top": [top([(1, -0.1)], [(5, -0.69), (2, -0.6901)], [(9, -1.0)])]}
    (v,) = closeness.compare(ref, got)
    assert v.status == "near tie" and v.position == 1 and v.ok  # later tokens are not compared
    assert "1.50e-04" in v.detail


def test_a_token_outside_the_other_runs_top_candidates_is_rejected():
    ref = {"tokens": [[1, 2]], "top": [top([(1, -0.1)], [(2, -0.1), (4, -3.0)])]}
    got = {"tokens": [[1, 7]], "top": [top([(1, -0.1)], [(7, -0.1), (2, -3.0)])]}
    (v,) = closeness.compare(ref, got)
    assert v.status == "differs" and not v.ok and v.position == 1


def test_without_candidates_any_difference_is_rejected():
    (v,) = closeness.compare({"tokens": [[1, 2]]}, {"tokens": [[1, 3]]})
    assert v.status == "differs" and "no top candidates" in v.detail


def test_length_and_prompt_count_differences_are_rejected():
    assert closeness.compare({"tokens": [[1, 2]]}, {"tokens": [[1]]})[0].status == "differs"
    assert not closeness.compare({"tokens": [[1], [2]]}, {"tokens": [[1]]})[0].ok


def test_summary_names_each_kind():
    ref = {"tokens": [[1], [2], [3]], "top": [top([(1, 0)]), top([(2, -0.5), (6, -0.5)]), top([(3, 0)])]}
    got = {"tokens": [[1], [6], [8]], "top": [top([(1, 0)]), top([(6, -0.5), (2, -0.5)]), top([(8, 0)])]}
    text = closeness.summary(closeness.compare(ref, got))
    assert text.startswith("1/3 identical, 1 near tie (p1@0") and "1 differs (p2@0" in text
