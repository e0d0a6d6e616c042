"""The patch ledger: apply a release's table with wrapt post-import hooks, and undo it.

A :class:`Patch` names its target as strings (module, dotted qualname) and carries one
wrapt wrapper ``(wrapped, instance, args, kwargs)``. A post-import hook applies it when
the module is imported, or at once if it already is. Modules that bound the target with
``from module import name`` are listed as ``aliases`` and wrapped too. Every wrap is
recorded with the original it replaced (first original wins) so :func:`remove_all`
restores each one by identity, in reverse order. Two concerns may wrap one target: the row
installed first (the earlier in the table) is the inner wrapper; one concern never wraps a target
twice. A ``hetero_only`` patch (a target vLLM calls every step) waits until the process is in
heterogeneous mode (:meth:`Ledger.mode_entered`).

Each row also says why it exists, what upstream lacks, when it can go and which facts about
upstream's source (:class:`Fact`, the compat tripwires) must still hold for it to be needed.
The rows live in their concern modules (``hetero_shim/patches/``); ``patches/tables.py``
assembles them per release and the README's tables are generated from them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from hetero_shim.arguments import NO_PARAMS, Params
from hetero_shim.errors import PatchTargetMissing
from hetero_shim.logs import log


@dataclass(frozen=True)
class Fact:
    """A compat tripwire: what upstream's source says today that makes a patch necessary.

    ``pattern`` is a regular expression searched (``re.MULTILINE``) in the source of ``symbol``
    (a dotted qualname in ``module``); the fact holds while the pattern is found, or, with
    ``present=False``, while it is not. ``scripts/check_tables.py`` records per release whether
    it is found (``tests/data/vllm_symbols/``) and ``tests/unit/test_tripwires.py`` fails when a
    fact no longer holds: upstream changed, and the patch may be dead for that release.
    """

    module: str  # "vllm.v1.worker.worker_base"
    symbol: str  # "WorkerWrapperBase.init_worker"
    pattern: str  # r"resolve_obj_by_qualname\(\s*parallel_config\.worker_cls"
    meaning: str  # what the match says about upstream, in words
    present: bool = True

    @property
    def where(self) -> str:
        return f"{self.module}:{self.symbol}"


@dataclass(frozen=True)
class Patch:
    """One row of the ledger: a target, its wrapper, why it exists and when it can go."""

    concern: str  # one of the fixes, e.g. "worker selection"
    module: str  # "vllm.v1.worker.worker_base"
    name: str  # "WorkerWrapperBase.init_worker"
    wrapper: Callable = field(compare=False)  # wrapt signature: (wrapped, instance, args, kwargs)
    why: str = ""
    remove_when: str = ""
    #: what upstream has or lacks in the supported releases, e.g. "one worker class for all ranks"
    upstream: str = ""
    #: facts about upstream's source that must hold for the patch to be needed (checked per release)
    tripwires: tuple[Fact, ...] = ()
    #: non-empty: a tripwire has fired for this release (upstream has the fix) and the patch is kept
    #: anyway, for the reason given; the tripwire test then checks that a fact indeed fails
    stale: str = ""
    aliases: tuple[str, ...] = ()  # modules holding `from module import name` copies
    optional: bool = False  # a missing target is warned about instead of raising
    #: the parameters the wrapper reads, by name and position (checked against every release's signature)
    params: Params = NO_PARAMS
    #: The target runs every engine step (sampling, pipeline sends) and the wrapper does nothing
    #: outside heterogeneous mode: it is applied only once this process is in heterogeneous mode,
    #: so that vLLM without it runs its per-step code unwrapped (no cost per step when the mode is off).
    hetero_only: bool = False
    #: False: only the ``aliases`` are wrapped, the defining module keeps vLLM's own function (for a
    #: fix that one caller needs, e.g. spawn for the workers but not for the engine core)
    wrap_primary: bool = True

    @property
    def target(self) -> str:
        return f"{self.module}:{self.name}"

    def sites(self) -> tuple[str, ...]:
        return (self.module, *self.aliases) if self.wrap_primary else self.aliases


@dataclass
class _Applied:
    patch: Patch
    site: str
    parent: object
    attribute: str
    original: object  # the raw attribute (descriptor included) that was replaced
    handle: object  # the wrapt FunctionWrapper now in its place


class Ledger:
    """What this process has patched. One instance lives in :mod:`hetero_shim._api`."""

    def __init__(self, gate: Callable[[], bool] = lambda: True) -> None:
        #: whether this process is in heterogeneous mode now: ``hetero_only`` patches wait for it
        self.gate = gate
        self.active = False
        self.patches: tuple[Patch, ...] = ()
        self.applied: dict[tuple[str, str], _Applied] = {}
        self.missing: list[str] = []
        self.waiting_for_mode: set[tuple[str, str]] = set()  # hetero_only patches of imported modules
        self._hooked: set[str] = set()

    # -- applying -------------------------------------------------------------------
    def install(self, patches: tuple[Patch, ...]) -> None:
        import wrapt

        self.patches = patches
        self.active = True
        for site in dict.fromkeys(s for p in patches for s in p.sites()):
            if site in self._hooked:  # hooks cannot be unregistered: register once per process
                if site in sys.modules:
                    self._on_import(sys.modules[site])
                continue
            self._hooked.add(site)
            wrapt.register_post_import_hook(self._on_import, site)

    def _on_import(self, module) -> None:
        if not self.active:
            return
        heterogeneous = self.gate()
        for patch in self.patches:
            if module.__name__ in patch.sites():
                if patch.hetero_only and not heterogeneous:
                    self.waiting_for_mode.add((module.__name__, patch.name))
                    continue
                self._apply(patch, module)

    def mode_entered(self) -> None:
        """This process switched heterogeneous mode on: apply the hetero_only patches it held back."""
        if not self.active or not self.gate():
            return
        sites = sorted({site for site, _ in self.waiting_for_mode})
        self.waiting_for_mode.clear()
        for site in sites:
            self._on_import(sys.modules[site])

    def _apply(self, patch: Patch, module) -> None:
        import wrapt

        key = (module.__name__, patch.name, patch.concern)
        if key in self.applied:
            return  # one concern never wraps a target twice
        try:
            parent, attribute, original = wrapt.resolve_path(module, patch.name)
        except (AttributeError, wrapt.PathResolutionError):
            message = f"{module.__name__}:{patch.name} ({patch.concern}) is not in the installed vLLM"
            if patch.optional or module.__name__ != patch.module:
                self.missing.append(message)
                log.warning("hetero_shim: %s; skipped", message)
                return
            raise PatchTargetMissing(message + "; the patch table does not match this release") from None
        ours = self._wrapper_of(patch.concern, original)
        if ours is not None:  # an alias imported after the primary was wrapped holds our wrapper(s)
            self.applied[key] = _Applied(patch, module.__name__, parent, attribute, ours.original, ours.handle)
            return
        handle = wrapt.wrap_function_wrapper(parent, attribute, patch.wrapper)
        self.applied[key] = _Applied(patch, module.__name__, parent, attribute, original, handle)

    def _wrapper_of(self, concern: str, obj) -> _Applied | None:
        """The entry of ``concern``'s wrapper within ``obj`` when ``obj`` is one of our wrappers (those of
        several concerns on one target are nested: each entry's original is the next one inside)."""
        while True:
            entry = next((e for e in self.applied.values() if e.handle is obj), None)
            if entry is None or entry.patch.concern == concern:
                return entry
            obj = entry.original

    # -- undoing --------------------------------------------------------------------
    def remove_all(self) -> list[str]:
        """Restore every original; return the targets that someone else had re-wrapped."""
        self.active = False
        not_restored = []
        for key in reversed(list(self.applied)):
            entry = self.applied.pop(key)
            if vars(entry.parent).get(entry.attribute) is entry.handle:
                setattr(entry.parent, entry.attribute, entry.original)
            else:
                not_restored.append(f"{entry.site}:{entry.patch.name}")
        self.patches = ()  # nothing is patched now: describe() lists no rows
        self.missing.clear()
        self.waiting_for_mode.clear()
        return not_restored

    # -- queries ----------------------------------------------------------------------
    def original(self, site: str, name: str):
        """vLLM's own ``name`` in ``site`` (under every concern's wrapper), or None if it is not wrapped."""
        entry = next((e for (s, n, _), e in self.applied.items() if s == site and n == name), None)
        return entry.original if entry else None

    def describe(self) -> list[dict]:
        rows = []
        for patch in self.patches:
            applied = [s for s in patch.sites() if (s, patch.name, patch.concern) in self.applied]
            rows.append(
                {
                    "concern": patch.concern,
                    "target": patch.target,
                    "applied_in": applied,
                    "pending": [s for s in patch.sites() if s not in applied and s not in sys.modules],
                    "waiting_for_mode": [s for s in patch.sites() if (s, patch.name) in self.waiting_for_mode],
                    "why": patch.why,
                    "upstream": patch.upstream,
                    "remove_when": patch.remove_when,
                }
            )
        return rows
