"""The one helper wrappers read their wrapped call's arguments through: by name or position."""

import pytest

from hetero_shim.arguments import NO_PARAMS, Params

SYNC = Params(num_tokens=0, intermediate_tensors=1)


def test_read_by_position_or_name():
    assert SYNC.get((7, "t"), {}, "num_tokens") == 7
    assert SYNC.get((), {"num_tokens": 7}, "num_tokens") == 7
    assert SYNC.get((7,), {"intermediate_tensors": "t"}, "intermediate_tensors") == "t"


def test_missing_argument_names_it_unless_defaulted():
    with pytest.raises(TypeError, match="'intermediate_tensors' \\(position 1\\)"):
        SYNC.get((7,), {}, "intermediate_tensors")
    assert SYNC.get((7,), {}, "intermediate_tensors", None) is None


def test_replace_where_the_caller_put_it():
    assert SYNC.replace((7, "t", True), {}, "intermediate_tensors", "u") == ((7, "u", True), {})
    assert SYNC.replace((7,), {"intermediate_tensors": "t"}, "intermediate_tensors", "u") == \
        ((7,), {"intermediate_tensors": "u"})
    assert SYNC.replace((7,), {}, "intermediate_tensors", "u") == ((7,), {"intermediate_tensors": "u"})


def test_params_compare_and_hash_as_their_positions():
    assert Params(a=0, b=1) == Params(b=1, a=0) and hash(Params(a=0, b=1)) == hash(Params(b=1, a=0))
    assert not NO_PARAMS and SYNC
    with pytest.raises(KeyError):
        SYNC.get((1,), {}, "undeclared")
