"""enable() before vLLM is imported imports neither vLLM nor what patching needs (wrapt, asyncio,
importlib.metadata, the patch table); importing vLLM afterwards installs the table before any
vLLM code runs; disable() before that import leaves vLLM stock. The same for a child process
under the bootstrap sitecustomize. And bench/enable_cost.py runs (timings are not checked)."""

from __future__ import annotations

import json
import sys
import textwrap

import procs

BOOTSTRAP = str(procs.REPO / "hetero_shim" / "_bootstrap")
#: What enable() must leave unimported until vLLM is imported (measured: it imports 7 small modules).
HEAVY = ("vllm", "torch", "wrapt", "asyncio", "importlib.metadata", "logging", "dataclasses",
         "hetero_shim.patches.tables", "hetero_shim.registry")

COMMON = textwrap.dedent(
    f"""
    import importlib, json, sys
    HEAVY = {HEAVY!r}
    def heavy_imported(before=()):
        return sorted(m for m in HEAVY if m in sys.modules and m not in before)
    def wrapped(site, name):
        import wrapt
        parent, attr, _ = wrapt.resolve_path(importlib.import_module(site), name)
        return isinstance(vars(parent)[attr], wrapt.FunctionWrapper)
    def triggers():
        return [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "BeforeImport"]
    def report(**values):
        print("RESULT " + json.dumps(values), flush=True)
    """
)

ENABLE_THEN_IMPORT = COMMON + textwrap.dedent(
    """
    before = set(sys.modules)
    import hetero_shim
    status = hetero_shim.enable()
    after_enable = heavy_imported(before)
    waiting = status["waiting_for_vllm"] and status["enabled"] and status["patches"] == []
    armed = triggers()
    import vllm.engine.arg_utils
    status = hetero_shim.status()
    applied = sum(bool(p["applied_in"]) for p in status["patches"])
    args_wrapped = wrapped("vllm.engine.arg_utils", "EngineArgs.__init__")
    original = hetero_shim._api._ledger.original("vllm.engine.arg_utils", "EngineArgs.__init__")
    hetero_shim.disable()
    from vllm.engine.arg_utils import EngineArgs
    report(after_enable=after_enable, waiting=waiting, armed=armed, after_import=triggers(),
           still_waiting=status["waiting_for_vllm"], applied=applied, args_wrapped=args_wrapped,
           restored=vars(EngineArgs)["__init__"] is original)
    """
)


def result(proc) -> dict:
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-4000:]
    assert "Error in sitecustomize" not in proc.stdout, proc.stdout[-4000:]
    return json.loads(line[len("RESULT "):])


def test_enable_imports_nothing_heavy_and_vllm_import_installs_the_table():
    out = result(procs.run_python(["-c", ENABLE_THEN_IMPORT], timeout=240))
    assert out["after_enable"] == [], out
    assert out["waiting"] and out["armed"] == ["BeforeImport"], out
    assert out["after_import"] == [] and not out["still_waiting"], out  # the finder is gone once it fired
    assert out["applied"] >= 5 and out["args_wrapped"], out
    assert out["restored"], out


DISABLE_BEFORE_IMPORT = COMMON + textwrap.dedent(
    """
    import hetero_shim
    if sys.argv[1] == "api":
        hetero_shim.enable(); hetero_shim.disable(); hetero_shim.disable()
    started_under_shim = "hetero_shim" in sys.modules and bool(triggers())
    hetero_shim.disable()
    left = triggers()
    import vllm.engine.arg_utils
    report(left=left, started_under_shim=started_under_shim,
           args_wrapped=wrapped("vllm.engine.arg_utils", "EngineArgs.__init__"),
           enabled=hetero_shim.status()["enabled"])
    """
)


def test_disable_before_vllm_import_leaves_vllm_stock():
    """After enable()+disable(), and in a bootstrap child that disables before importing vLLM:
    no finder is left and vLLM imports unpatched."""
    api = result(procs.run_python(["-c", DISABLE_BEFORE_IMPORT, "api"], timeout=240))
    assert api == {"left": [], "started_under_shim": False, "args_wrapped": False, "enabled": False}, api
    child = result(procs.run_python(["-c", DISABLE_BEFORE_IMPORT, "child"], timeout=240,
                                    HETERO_SHIM_ENABLE="1", PYTHONPATH=f"{BOOTSTRAP}:{procs.REPO}"))
    assert child == {"left": [], "started_under_shim": True, "args_wrapped": False, "enabled": False}, child


BOOTSTRAP_CHILD = COMMON + textwrap.dedent(
    """
    shim = "hetero_shim" in sys.modules
    at_start = heavy_imported()
    armed = triggers()
    if shim:
        import vllm.engine.arg_utils
        import hetero_shim
        report(shim=shim, at_start=at_start, armed=armed, enabled=hetero_shim.status()["enabled"],
               args_wrapped=wrapped("vllm.engine.arg_utils", "EngineArgs.__init__"))
    else:
        report(shim=shim, at_start=at_start, armed=armed)
    """
)


def test_bootstrap_child_pays_for_the_import_only_until_vllm_is_imported(tmp_path):
    """A process under the bootstrap (as vLLM's workers are): with the switch on, hetero_shim is
    imported and waits for vLLM without importing wrapt & co; vLLM's import then patches it.
    With the switch unset, the bootstrap does not even import hetero_shim. Both times the
    user's own sitecustomize (later on the path) still runs."""
    (tmp_path / "sitecustomize.py").write_text("print('USER SITECUSTOMIZE RAN', flush=True)\n")
    path = f"{BOOTSTRAP}:{procs.REPO}:{tmp_path}"
    on = procs.run_python(["-c", BOOTSTRAP_CHILD], timeout=240, HETERO_SHIM_ENABLE="1", PYTHONPATH=path)
    assert result(on) == {"shim": True, "at_start": [], "armed": ["BeforeImport"], "enabled": True,
                          "args_wrapped": True}, on.stdout[-4000:]
    off = procs.run_python(["-c", BOOTSTRAP_CHILD], timeout=60, PYTHONPATH=path)
    assert result(off) == {"shim": False, "at_start": [], "armed": []}, off.stdout
    assert "USER SITECUSTOMIZE RAN" in on.stdout and "USER SITECUSTOMIZE RAN" in off.stdout


def test_enable_cost_bench_runs(tmp_path):
    out = tmp_path / "enable_cost.json"
    proc = procs.run([sys.executable, str(procs.REPO / "bench" / "enable_cost.py"), "-n", "3", "--out", str(out)],
                     procs.python_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]
    data = json.loads(out.read_text())
    assert set(data["cases"]) == {"baseline", "import", "enable", "wrapt"}
    assert all(len(case["runs_ms"]) == 3 for case in data["cases"].values())
    assert data["cases"]["enable"]["heavy_imported"] == [], data["cases"]["enable"]
    assert "wrapt" in data["cases"]["wrapt"]["heavy_imported"]  # the check sees an import when there is one
    assert isinstance(data["target_met"], bool) and ("MET" in proc.stdout.splitlines()[-1])
