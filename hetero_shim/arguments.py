"""Reading and replacing a wrapped call's arguments, by position or by name.

A wrapt wrapper sees ``(args, kwargs)`` as the caller passed them, so a parameter may arrive
either way (dd-trace-py's ``get_argument_value`` idea). A patch declares the parameters its
wrapper reads once, as :class:`Params` beside its ledger row (``Patch(..., params=...)``), and
the wrapper reads them through it; ``tests/unit/test_tables.py`` checks every declared
position against each supported release's signature. A position counts the parameters as
wrapt passes them: after ``self``/``cls`` for methods and classmethods (wrapt strips the bound
instance), from the first parameter for functions and staticmethods. Missing without a default
is an error naming the parameter.
"""

from __future__ import annotations

_MISSING = object()


def argument(args: tuple, kwargs: dict, position: int, name: str, default=_MISSING):
    if name in kwargs:
        return kwargs[name]
    if position < len(args):
        return args[position]
    if default is _MISSING:
        raise TypeError(f"the wrapped call has no argument {name!r} (position {position})")
    return default


def with_argument(args: tuple, kwargs: dict, position: int, name: str, value) -> tuple[tuple, dict]:
    """(args, kwargs) with the argument replaced where the caller put it (by name when absent)."""
    if name not in kwargs and position < len(args):
        return args[:position] + (value,) + args[position + 1:], kwargs
    return args, {**kwargs, name: value}


class Params:
    """The parameters a wrapper reads, by name and position: ``Params(num_tokens=0, intermediate_tensors=1)``."""

    __slots__ = ("positions",)

    def __init__(self, **positions: int) -> None:
        self.positions = positions

    def get(self, args: tuple, kwargs: dict, name: str, default=_MISSING):
        return argument(args, kwargs, self.positions[name], name, default)

    def replace(self, args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
        return with_argument(args, kwargs, self.positions[name], name, value)

    def __bool__(self) -> bool:
        return bool(self.positions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and self.positions == other.positions

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.positions.items())))

    def __repr__(self) -> str:
        return "Params(" + ", ".join(f"{k}={v}" for k, v in self.positions.items()) + ")"


NO_PARAMS = Params()  # a wrapper that reads no argument
