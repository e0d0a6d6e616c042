"""This process's heterogeneous run: the mode, the rank kind and the rank plan.

The environment is the channel to child processes (spawn copies it), so the run lives there:
``HETERO_SHIM_DEVICE`` (the mode), ``HETERO_SHIM_PLAN`` (the rank plan as JSON) and
``HETERO_SHIM_RANK_KIND`` (set by the engine core for each worker it starts). This module is
the one place that reads them for the patches and the one place the shim writes variables
through: :func:`set_env` records the value a variable had before the shim first set it, and
:func:`exit` puts every one back, so ``disable()`` ends the mode in this process and in every
process started after it.

Reading is parsed once per value: :func:`current` keeps the last parsed state and re-parses only
when one of the three variables changed, so per-step wrappers pay three dictionary lookups.
"""

from __future__ import annotations

import os
from hetero_shim import settings

#: Set by the engine core for each worker process it starts: "gpu" or "cpu".
RANK_KIND = settings.RANK_KIND

_saved: dict[str, str | None] = {}  # variable -> its value before the shim first set it (None: unset)
_on_enter: list = []  # callables, run by enter()
_cached_key: tuple | None = None
_cached: State | None = None


class State:
    """The run as one snapshot (a plain class: enable() must not import dataclasses)."""

    __slots__ = ("heterogeneous", "rank_kind", "plan")

    def __init__(self, heterogeneous: bool, rank_kind: str | None, plan) -> None:
        self.heterogeneous = heterogeneous
        self.rank_kind = rank_kind  # "gpu", "cpu" or None (not a worker of a heterogeneous run)
        self.plan = plan  # planning.plan.RankPlan, parsed from HETERO_SHIM_PLAN

    @property
    def mixed(self) -> bool:
        """Both GPU and CPU ranks: the cross-device machinery is needed."""
        plan = self.plan
        return self.heterogeneous and plan is not None and 0 < plan.gpu_ranks < plan.world_size

    @property
    def cpu_rank(self) -> bool:
        return self.heterogeneous and self.rank_kind == "cpu"


def current() -> State:
    """The run as the environment says now (parsed again only when it changed)."""
    global _cached_key, _cached
    env = os.environ
    key = (env.get(settings.DEVICE), env.get(settings.PLAN), env.get(RANK_KIND))
    if key != _cached_key or _cached is None:
        plan = None
        if key[1]:
            from hetero_shim.planning.plan import plan_from_json

            plan = plan_from_json(key[1])
        _cached = State(settings.heterogeneous(), key[2], plan)
        _cached_key = key
    return _cached


def heterogeneous() -> bool:
    return current().heterogeneous


def plan():
    return current().plan


def set_env(name: str, value: str | None) -> None:
    """Set (or with None, remove) a variable for this process and its children; exit() restores it."""
    if name not in _saved:
        _saved[name] = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def owned_variables() -> dict[str, str | None]:
    """Variables the shim set in this process, with the values they had before."""
    return dict(_saved)


def on_enter(callback) -> None:
    """Call ``callback`` each time this process enters heterogeneous mode (the ledger's held-back patches)."""
    if callback not in _on_enter:
        _on_enter.append(callback)


def enter() -> None:
    """Switch this process (and the processes it starts) into heterogeneous mode."""
    set_env(settings.DEVICE, settings.HETEROGENEOUS)
    for callback in list(_on_enter):
        callback()


def publish_plan(plan_json: str) -> None:
    set_env(settings.PLAN, plan_json)


def exit() -> list[str]:  # noqa: A001 - the pair of enter()
    """Put back every variable the shim set; return their names. The mode ends with them."""
    names = list(_saved)
    settings.restore_environ(_saved)
    _saved.clear()
    return names
