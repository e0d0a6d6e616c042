"""enable(), disable(), status(): the public switch, idempotent, reversible, observable."""

from __future__ import annotations

import os
import sys
import threading
from hetero_shim import settings
from hetero_shim.errors import HeteroConfigError

from hetero_shim.logs import log

BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")

_lock = threading.RLock()
_ledger = None  # registry.Ledger, created on first enable()
_state: dict = {"table": None, "reason": None, "env_before": None}


def _get_ledger():
    global _ledger
    if _ledger is None:
        from hetero_shim.registry import Ledger

        _ledger = Ledger()
    return _ledger


def _propagate_to_children() -> dict:
    """Put the bootstrap on PYTHONPATH so that every spawned Python process activates too."""
    before = {k: os.environ.get(k) for k in (settings.ENABLE, "PYTHONPATH")}
    os.environ[settings.ENABLE] = "1"
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if BOOTSTRAP_DIR not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *paths])
    return before


def enable(*, propagate: bool = True) -> dict:
    """Patch vLLM (now for imported modules, on import for the rest). Harmless when repeated.

    Raises :class:`~hetero_shim.errors.UnsupportedVllmVersion` before anything is patched
    when the installed vLLM release has no table. With ``propagate`` (the default) child
    processes, including those vLLM spawns, activate the shim themselves.
    """
    from hetero_shim import versions
    from hetero_shim.patches import tables

    with _lock:
        ledger = _get_ledger()
        if ledger.active:
            log.debug("hetero_shim.enable(): already enabled")
            return status()
        settings.check_environment()
        release, reason = versions.choose_table(tables.SUPPORTED)
        _warn_if_an_engine_runs()
        _state.update(table=release, reason=reason)
        if propagate and _state["env_before"] is None:
            _state["env_before"] = _propagate_to_children()
        ledger.install(tables.table(release))
        return status()


def running_engines() -> list[str]:
    """Engine-core processes vLLM has already started from this process (they stay unpatched)."""
    if "vllm" not in sys.modules:
        return []
    import multiprocessing

    return [f"{c.name} (pid {c.pid})" for c in multiprocessing.active_children() if c.name.startswith("EngineCore")]


def _warn_if_an_engine_runs() -> None:
    """enable() after vLLM started an engine: that engine keeps running stock (its processes
    were started without the shim, and patching cannot reach them); engines made afterwards are
    patched. Not an error, because nothing breaks, but never silent."""
    engines = running_engines()
    if engines:
        log.warning(
            "hetero_shim.enable(): vLLM already started an engine in this process (%s); it keeps running "
            "without the shim. Engines created from now on are patched; call enable() before creating "
            "LLM/AsyncLLM to run them all under the shim.", ", ".join(engines)
        )


def disable() -> dict:
    """Restore every original vLLM function and stop child processes from activating."""
    with _lock:
        ledger = _get_ledger()
        not_restored = ledger.remove_all()
        if not_restored:
            log.warning("hetero_shim.disable(): re-wrapped by someone else, left in place: %s", not_restored)
        if _state["env_before"] is not None:
            settings.restore_environ(_state["env_before"])
            _state["env_before"] = None
        return status()


def status() -> dict:
    """What is patched, for which vLLM release, and the rank plan of heterogeneous mode."""
    from hetero_shim import mode, versions

    found = versions.installed()
    ledger = _ledger
    plan = None
    try:
        plan = mode.current_plan()
    except ValueError:
        pass
    return {
        "enabled": bool(ledger and ledger.active),
        "vllm": f"{found.distribution} {found.version}" if found else None,
        "table": _state["table"],
        "table_reason": _state["reason"],
        "heterogeneous": os.environ.get(settings.DEVICE) == settings.HETEROGENEOUS,
        "plan": plan.describe() if plan else None,
        "cpu_kernels": _cpu_kernels_configured() if plan and plan.world_size > plan.gpu_ranks else None,
        "patches": ledger.describe() if ledger else [],
        "missing": list(ledger.missing) if ledger else [],
    }


def _cpu_kernels_configured() -> str:
    from hetero_shim.patches.cpu_kernels import configured

    return configured()


def activate_from_env() -> None:
    """Used by sitecustomize: when HETERO_SHIM_ENABLE=1, enable the shim once vLLM is imported.

    Processes that never import vLLM pay for one import hook and nothing else. A setting the
    shim cannot read ends the process with one line on stderr and exit status 2.
    """
    try:
        if not settings.activation_requested():
            return
        settings.check_environment()
    except HeteroConfigError as exc:
        # One line and exit status 2, like the launcher: a bad setting must not start vLLM
        # half-patched, and an exception here would print Python's "Fatal Python error" page.
        sys.stderr.write(f"hetero_shim: {exc}\n")
        sys.stderr.flush()
        os._exit(2)
    dump_every = settings.hang_dump_seconds()
    if dump_every:
        import faulthandler

        faulthandler.dump_traceback_later(dump_every, repeat=True)
    if settings.heterogeneous():
        # A process of a heterogeneous run (engine core, worker): patch before anything of vLLM
        # is imported, so that e.g. a CPU rank resolves vLLM's CPU platform from the start, and
        # take the cores the engine core gave this worker before torch's OpenMP runtime loads.
        from hetero_shim import affinity

        affinity.confine_from_environment()
        enable(propagate=False)
        return
    import wrapt

    def _on_vllm_import(_module):
        enable(propagate=False)

    if "vllm" in sys.modules:
        enable(propagate=False)
    else:
        wrapt.register_post_import_hook(_on_vllm_import, "vllm")
