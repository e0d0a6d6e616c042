"""Reading and replacing a wrapped call's arguments, by position or by name.

A wrapt wrapper sees ``(args, kwargs)`` as the caller passed them, so a parameter may arrive
either way; patches name both (the position counts the parameters after ``self``/``cls``, as
wrapt strips the bound instance). Missing without a default is an error naming the parameter.
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
