"""Benchmark hook (not shim code): where each vLLM worker's step time goes.

Put this folder first on PYTHONPATH of the engine process with BENCH_BREAKDOWN_DIR set (``bench/
run.py --breakdown`` does both); the shim's bootstrap sitecustomize chains to this one, so every
vLLM process of the engine runs it, and this one chains to any sitecustomize found after it.

In each worker process (``Worker.execute_model`` / ``sample_tokens`` of ``vllm.v1.worker.
gpu_worker``; ``CPUWorker`` inherits them, and is wrapped too if it ever overrides them):
- every ``execute_model`` call: ``{"rank", "start", "end", "tokens"}`` (time.monotonic) to
  DIR/<pid>.jsonl, the format of tests/integration/pp_trace (``bench/step_trace.py DIR`` reads it);
  every ``sample_tokens`` call to DIR/<pid>.sample.ndjson;
- for profile windows (BENCH_BREAKDOWN_PROFILE, comma-separated, taken in turn): "K:N", steps
  K .. K+N-1 counted over ``execute_model`` calls with scheduled tokens; "T@K:N", the same counted
  over the calls with exactly T tokens (default "22:8,16@4:8": in the harness's full workload,
  batch-1 then batch-16 decode steps of bench/engine.py's unmeasured pass at each batch size),
  ``torch.profiler`` (CPU; CUDA too on GPU ranks unless BENCH_BREAKDOWN_CUDA=0) with
  one marker per call; each op's self time goes to the category of its nearest categorised
  ancestor (itself included: the copies inside an all-reduce count as communication, the mm
  inside aten::linear as GEMM); ops under ``sample_tokens`` without a category of their own are
  sampling; "GPU hand-off" is the shim's ``hetero_shim::cpu_linear`` (a CPU stage's linear layer)
  less its CPU kernel: waiting for the rows the next stage's GPU rank computes, and the activations'
  copies through shared memory; the rest "other ops". Written to DIR/<pid>.worker.json when each window closes (the
  windows' steps together; ``top_ops`` of the first window, every window's under ``windows``).
  ``python/overhead`` (computed by bench/breakdown.py) = step wall - every op's self time.
A CPU stage's requests to the next stage's GPU rank are timed on both sides in other steps, without
the profiler (``hsbench_channel.py`` beside this file: DIR/<pid>.channel.json).
Collectives are marked (``comm::<method>``) by wrapping vLLM's ``GroupCoordinator`` and device
communicators (and the shim's ``HeteroCommunicator``) while the profiler runs.
In the engine core process, every ``EngineCore.step`` / ``step_with_batch_queue`` call:
``{"fn", "start", "end", "executed"}`` to DIR/<pid>.core.ndjson (time inside vs between steps).
Any failure of this hook is printed and switches it off; the engine runs on.
"""

from __future__ import annotations

import os
import re

ENV_DIR = "BENCH_BREAKDOWN_DIR"
ENV_PROFILE = "BENCH_BREAKDOWN_PROFILE"
ENV_CUDA = "BENCH_BREAKDOWN_CUDA"
DEFAULT_PROFILE = "22:8,16@4:8"
MARKER = "bench_step::"
COMM_PREFIX = "comm::"

#: (category, pattern on the lower-cased op name); the first match wins
CATEGORIES = (
    # a CPU stage's linear layer as the shim routes it: its CPU kernel below it stays GEMM
    ("GPU hand-off", re.compile(r"^hetero_shim::cpu_linear$")),
    # (aten::broadcast_tensors and the like are shape ops, not collectives)
    ("communication", re.compile(r"^comm::|^c10d::|^(?!aten::).*(all_reduce|allreduce|all_gather|allgather"
                                 r"|reduce_scatter|broadcast|gloo|nccl|barrier|shm_|_shm)"
                                 r"|(^|[:_.])(i?send|i?recv)(_|$)")),
    ("attention", re.compile(r"attention|attn|paged|reshape_and_cache|kv_cache|flash|scaled_dot_product|sdpa")),
    ("GEMM", re.compile(r"^aten::(linear|mm|addmm|matmul|bmm|baddbmm|_addmm_activation|mkldnn_linear|_mm_.*)$"
                        r"|onednn_mm|weight_packed_linear|gemm|scaled_mm|cublas|nvjet|cutlass|xmma|mkldnn_matmul")),
    ("norms", re.compile(r"rms_?norm|layer_?norm|group_norm")),
    ("activations", re.compile(r"silu|gelu|act_and_mul|relu|swiglu|sigmoid")),
    ("rotary", re.compile(r"rotary|(^|[:_])rope")),
    ("sampling", re.compile(r"sampl|top_?k|top_?p|argmax|multinomial|logprob")),
)
ORDER = ("GEMM", "attention", "norms", "activations", "rotary", "communication", "GPU hand-off", "sampling",
         "other ops", "python/overhead")


def categorize(name: str) -> str | None:
    """The category of an op or marker name (None: none; its time goes to its parent's category)."""
    low = name.lower()
    for category, pattern in CATEGORIES:
        if pattern.search(low):
            return category
    return None


def summarize(events, walls: dict[int, dict], top: int = 25) -> dict:
    """Per profiled step: ms per category (CPU self time, and device time where recorded) from
    a profiler's events (``FunctionEvent``s with ``cpu_parent`` links), using the step markers."""
    markers = {}
    for e in events:
        if e.name.startswith(MARKER):
            _, kind, step = e.name.split("::")
            markers[id(e)] = (kind, int(step))
    steps: dict[int, dict] = {}
    by_op: dict[str, list] = {}
    for e in events:
        if id(e) in markers or str(getattr(e, "device_type", "CPU")).rsplit(".", 1)[-1] not in ("CPU", "0"):
            continue
        category, node, owner = None, e, None
        while node is not None:
            if id(node) in markers:
                owner = markers[id(node)]
                break
            if category is None:
                category = categorize(node.name)
            node = node.cpu_parent
        if owner is None:
            continue
        kind, step = owner
        category = category or ("sampling" if kind == "sample" else "other ops")
        row = steps.setdefault(step, {"cpu_ms": {}, "device_ms": {}, "ops_ms": 0.0})
        cpu_ms = e.self_cpu_time_total / 1e3
        row["cpu_ms"][category] = row["cpu_ms"].get(category, 0.0) + cpu_ms
        row["ops_ms"] += cpu_ms
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0)
        if dev:
            row["device_ms"][category] = row["device_ms"].get(category, 0.0) + dev / 1e3
        entry = by_op.setdefault(e.name, [category, 0.0, 0])
        entry[1] += cpu_ms
        entry[2] += 1
    out = []
    for step, wall in sorted(walls.items()):
        row = steps.get(step, {"cpu_ms": {}, "device_ms": {}, "ops_ms": 0.0})
        out.append({"step": step, **wall, "ops_ms": round(row["ops_ms"], 4),
                    "cpu_ms": {k: round(v, 4) for k, v in row["cpu_ms"].items()},
                    "device_ms": {k: round(v, 4) for k, v in row["device_ms"].items()}})
    n = max(1, len(walls))
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]
    return {"steps": out, "top_ops": [{"name": k, "category": c, "ms_per_step": round(ms / n, 4), "calls_per_step":
                                       round(calls / n, 2)} for k, (c, ms, calls) in ops]}


def parse_windows(text: str | None) -> list[tuple[int | None, int, int]]:
    """(tokens or None for any count, first, count) of each window of BENCH_BREAKDOWN_PROFILE."""
    windows = []
    for spec in (text or DEFAULT_PROFILE).split(","):
        tokens, _, window = spec.strip().rpartition("@")
        first, _, count = window.partition(":")
        windows.append((int(tokens) if tokens else None, int(first), int(count or 8)))
    return windows


class WindowCounter:
    """Steps counted against ``windows`` ((tokens or None, first, count) each, parse_windows) taken
    in turn: :meth:`count` gives a step's index among the current window's steps, or None where the
    step does not count (other tokens, or every window done); :meth:`advance` moves to the next."""

    def __init__(self, windows: list[tuple[int | None, int, int]]) -> None:
        self.windows, self.window, self.seen = windows, 0, 0

    def current(self) -> tuple[int | None, int, int]:
        return self.windows[self.window]

    def count(self, tokens: int) -> int | None:
        if self.window >= len(self.windows):
            return None
        want = self.windows[self.window][0]
        if want is not None and tokens != want:
            return None
        self.seen += 1
        return self.seen - 1

    def advance(self) -> None:
        self.window, self.seen = self.window + 1, 0


class _Hook:
    """Per-process state of the hook (one worker per process; engine-core records too)."""

    def __init__(self, directory: str):
        import threading

        self.dir = directory
        self.pid = os.getpid()
        self.counter = WindowCounter(parse_windows(os.environ.get(ENV_PROFILE)))  # the profiled steps
        self.selected: list[int] = []  # its profiled steps (global step numbers)
        self.summaries: list[dict] = []
        self.cuda = os.environ.get(ENV_CUDA, "1") != "0"
        self.steps = 0  # execute_model calls with tokens so far
        self.current: int | None = None  # the step of the last execute_model (None: no tokens)
        self.saw_sample = False
        self.prof = None
        self.profiling = False
        self.broken = False
        self.walls: dict[int, dict] = {}
        self.meta: dict = {}
        self.local = threading.local()
        self._files: dict[str, object] = {}
        self.channel = None  # hsbench_channel.ChannelTimer, once installed

    # -- files
    def _write(self, suffix: str, record: dict) -> None:
        import json

        f = self._files.get(suffix)
        if f is None:
            os.makedirs(self.dir, exist_ok=True)
            f = self._files[suffix] = open(os.path.join(self.dir, f"{self.pid}{suffix}"), "a", buffering=1)
        f.write(json.dumps(record) + "\n")

    def _dump(self, extra: dict) -> None:
        import json

        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"{self.pid}.worker.json")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({**self.meta, **extra}, f, indent=1)
        os.replace(tmp, path)

    def _fail(self, where: str, exc: BaseException) -> None:
        import sys
        import traceback

        self.broken = True
        self.profiling = False
        print(f"[bench breakdown] pid {self.pid}: {where} failed, hook off: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        traceback.print_exc()
        try:
            self._dump({"error": f"{where}: {type(exc).__name__}: {exc}"})
        except OSError:
            pass

    # -- worker identity
    def describe(self, worker) -> None:
        if self.meta:
            return
        device = str(getattr(worker, "device", "?"))
        meta = {"pid": self.pid, "ppid": os.getppid(), "rank": getattr(worker, "rank", None),
                "local_rank": getattr(worker, "local_rank", None), "device": device,
                "worker_class": type(worker).__name__, "windows": [list(w) for w in self.counter.windows],
                "kind": os.environ.get("HETERO_SHIM_RANK_KIND") or ("gpu" if "cuda" in device else "cpu")}
        try:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            meta |= {"pp_stage": get_pp_group().rank_in_group, "pp_size": get_pp_group().world_size,
                     "tp_rank": get_tp_group().rank_in_group, "tp_size": get_tp_group().world_size}
        except Exception:  # noqa: BLE001 - identity is best effort
            pass
        try:
            import torch

            meta["torch_threads"] = torch.get_num_threads()
            meta["cpu_affinity"] = sorted(os.sched_getaffinity(0))
        except Exception:  # noqa: BLE001
            pass
        self.meta = meta
        if self.channel is not None:
            self.channel.meta = {k: meta.get(k) for k in ("pid", "ppid", "rank", "kind", "tp_rank", "pp_stage")}
        self._dump({"profile": None})

    # -- the profiler window
    def start(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        on_gpu = "cuda" in self.meta.get("device", "")
        if on_gpu and self.cuda and torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        try:
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()
        except Exception:  # noqa: BLE001 - CUDA tracing unavailable: CPU only
            if len(activities) == 1:
                raise
            self.prof = torch.profiler.profile(activities=activities[:1])
            self.prof.start()
            activities = activities[:1]
        self.meta["activities"] = [str(a).rsplit(".", 1)[-1] for a in activities]
        self.profiling = True

    def finish(self) -> None:
        import time

        if not self.profiling:
            return
        self.profiling = False
        t0 = time.monotonic()
        self.prof.stop()
        summary = summarize(self.prof.events(), self.walls)
        summary["analysis_s"] = round(time.monotonic() - t0, 3)
        summary["window"] = list(self.counter.current())
        self.prof, self.walls, self.selected = None, {}, []
        self.counter.advance()
        self.summaries.append(summary)
        first = self.summaries[0]
        self._dump({"profile": {"steps": [step for one in self.summaries for step in one["steps"]],
                                "top_ops": first["top_ops"], "analysis_s": round(sum(
                                    one["analysis_s"] for one in self.summaries), 3),
                                "windows": [{k: v for k, v in one.items() if k != "steps"} for one in self.summaries]}})

    def window_full(self) -> bool:
        return self.profiling and len(self.selected) == self.counter.current()[2]

    def last_profiled(self, step: int | None) -> bool:
        """``step`` is the current window's last step."""
        return self.window_full() and step == self.selected[-1]

    def select(self, step: int, tokens: int) -> None:
        """Count ``step`` for the current window and start profiling or select it when it is due."""
        index = self.counter.count(tokens)
        if index is None:
            return
        _, first, count = self.counter.current()
        if index == first and not self.profiling:
            self.start()
        if self.profiling and first <= index < first + count:
            self.selected.append(step)

    def marker(self, kind: str, step: int | None):
        import contextlib

        if not self.profiling or step is None or step not in self.selected:
            return contextlib.nullcontext()
        import torch

        return torch.profiler.record_function(f"{MARKER}{kind}::{step}")

    # -- wrappers
    def execute_model(self, wrapped, instance, args, kwargs):
        if self.broken or getattr(self.local, "depth", 0):
            return wrapped(*args, **kwargs)
        step = None
        try:
            self.describe(instance)
            scheduler_output = args[0] if args else kwargs.get("scheduler_output")
            tokens = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)
            if tokens:
                step = self.steps
                self.steps += 1
                if self.window_full():
                    self.finish()  # the last profiled step had no sample_tokens call after it
                self.select(step, tokens)
            self.current = step
            if self.channel is not None:
                self.channel.begin_step(step, tokens)
            marker = self.marker("execute", step)
        except Exception as exc:  # noqa: BLE001
            self._fail("execute_model (before)", exc)
            return wrapped(*args, **kwargs)

        def record(start: float, end: float) -> None:
            if self.channel is not None:
                self.channel.end_step()
            self._write(".jsonl", {"rank": self.meta.get("rank"), "start": start, "end": end, "tokens": tokens})
            if self.profiling and step is not None and step in self.selected:
                self.walls[step] = {"tokens": tokens, "execute_ms": round((end - start) * 1e3, 4),
                                    "sample_ms": 0.0, "wall_ms": round((end - start) * 1e3, 4)}
                if self.last_profiled(step) and not self.saw_sample:
                    self.finish()

        return self._timed("execute_model", marker, wrapped, args, kwargs, record)

    def sample_tokens(self, wrapped, instance, args, kwargs):
        if self.broken or getattr(self.local, "depth", 0):
            return wrapped(*args, **kwargs)
        step, self.current = self.current, None
        if step is not None:
            self.saw_sample = True
        try:
            marker = self.marker("sample", step)
        except Exception as exc:  # noqa: BLE001
            self._fail("sample_tokens (before)", exc)
            return wrapped(*args, **kwargs)

        def record(start: float, end: float) -> None:
            self._write(".sample.ndjson", {"step": step, "start": start, "end": end})
            if step is not None and step in self.walls:
                wall = self.walls[step]
                wall["sample_ms"] = round((end - start) * 1e3, 4)
                wall["wall_ms"] = round(wall["execute_ms"] + wall["sample_ms"], 4)
            if self.last_profiled(step):
                self.finish()

        return self._timed("sample_tokens", marker, wrapped, args, kwargs, record)

    def _timed(self, what: str, marker, wrapped, args, kwargs, record):
        """Call ``wrapped`` inside ``marker``, not re-entered by nested calls, then ``record(start, end)``;
        a failing record turns the hook off (``_fail``), never the call."""
        import time

        self.local.depth = 1
        start = time.monotonic()
        try:
            with marker:
                return wrapped(*args, **kwargs)
        finally:
            end = time.monotonic()
            self.local.depth = 0
            try:
                record(start, end)
            except Exception as exc:  # noqa: BLE001
                self._fail(f"{what} (after)", exc)

    def comm(self, wrapped, instance, args, kwargs):
        if not self.profiling:
            return wrapped(*args, **kwargs)
        import torch

        with torch.profiler.record_function(f"{COMM_PREFIX}{type(instance).__name__}.{wrapped.__name__}"):
            return wrapped(*args, **kwargs)

    def core_step(self, wrapped, instance, args, kwargs):
        import time

        start = time.monotonic()
        result = None
        try:
            result = wrapped(*args, **kwargs)
            return result
        finally:
            end = time.monotonic()
            if not self.broken:
                try:
                    executed = bool(result[1]) if isinstance(result, tuple) and len(result) > 1 else None
                    self._write(".core.ndjson", {"fn": wrapped.__name__, "start": start, "end": end,
                                                 "executed": executed})
                except Exception as exc:  # noqa: BLE001
                    self._fail("EngineCore step", exc)

    def at_exit(self) -> None:
        try:
            self.finish()
        except Exception as exc:  # noqa: BLE001
            self._fail("finish at exit", exc)


COMM_METHODS = ("all_reduce", "all_gather", "all_gatherv", "gather", "reduce_scatter", "reduce_scatterv", "broadcast",
                "broadcast_object", "broadcast_tensor_dict", "send_tensor_dict", "recv_tensor_dict",
                "isend_tensor_dict", "irecv_tensor_dict", "send", "recv", "barrier", "send_object", "recv_object")
COMM_CLASSES = (
    ("vllm.distributed.parallel_state", "GroupCoordinator"),
    ("vllm.distributed.device_communicators.base_device_communicator", "DeviceCommunicatorBase"),
    ("vllm.distributed.device_communicators.cpu_communicator", "CpuCommunicator"),
    ("vllm.distributed.device_communicators.cuda_communicator", "CudaCommunicator"),
    ("hetero_shim.collectives.communicator", "HeteroCommunicator"),
)


def _install(directory: str) -> None:
    import atexit

    import wrapt

    hook = _Hook(directory)
    atexit.register(hook.at_exit)

    def own(cls, name: str) -> bool:
        return name in vars(cls)

    def workers(module) -> None:
        worker = module.Worker
        for name, wrapper in (("execute_model", hook.execute_model), ("sample_tokens", hook.sample_tokens)):
            if own(worker, name):
                wrapt.wrap_function_wrapper(worker, name, wrapper)

    def cpu_workers(module) -> None:  # only if CPUWorker overrides them (the nesting guard avoids double counting)
        worker = getattr(module, "CPUWorker", None)
        for name, wrapper in (("execute_model", hook.execute_model), ("sample_tokens", hook.sample_tokens)):
            if worker is not None and own(worker, name):
                wrapt.wrap_function_wrapper(worker, name, wrapper)

    def comm_class(cls_name: str):
        def apply(module) -> None:
            cls = getattr(module, cls_name, None)
            for name in COMM_METHODS if cls is not None else ():
                if own(cls, name):
                    wrapt.wrap_function_wrapper(cls, name, hook.comm)
        return apply

    def core(module) -> None:
        cls = getattr(module, "EngineCore", None)
        for name in ("step", "step_with_batch_queue"):
            if cls is not None and own(cls, name):
                wrapt.wrap_function_wrapper(cls, name, hook.core_step)

    def guarded(fn, what: str):
        def apply(module) -> None:
            try:
                fn(module)
            except Exception as exc:  # noqa: BLE001
                hook._fail(f"wrapping {what}", exc)
        return apply

    import hsbench_channel  # beside this file, first on sys.path

    hook.channel = hsbench_channel.ChannelTimer(
        WindowCounter(parse_windows(os.environ.get(hsbench_channel.ENV_WINDOWS) or hsbench_channel.DEFAULT_WINDOWS)),
        os.path.join(directory, f"{os.getpid()}.channel.json"))
    hsbench_channel.install(hook.channel, wrapt.register_post_import_hook, guarded)
    wrapt.register_post_import_hook(guarded(workers, "Worker"), "vllm.v1.worker.gpu_worker")
    wrapt.register_post_import_hook(guarded(cpu_workers, "CPUWorker"), "vllm.v1.worker.cpu_worker")
    wrapt.register_post_import_hook(guarded(core, "EngineCore"), "vllm.v1.engine.core")
    for module, cls_name in COMM_CLASSES:
        wrapt.register_post_import_hook(guarded(comm_class(cls_name), cls_name), module)


def _chain_next_sitecustomize() -> None:
    """Run the sitecustomize that comes after this folder on sys.path (this file would hide it)."""
    import importlib.machinery
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.abspath(p or ".") for p in sys.path]
    if here not in paths:
        return
    bootstrap = os.path.join("hetero_shim", "_bootstrap")
    later = [p for p in sys.path[paths.index(here) + 1:]
             if os.path.abspath(p or ".") != here and not os.path.abspath(p or ".").endswith(bootstrap)]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", later)
    if spec is None or spec.loader is None or os.path.abspath(spec.origin or "") == os.path.abspath(__file__):
        return
    from importlib.util import module_from_spec

    module = module_from_spec(spec)
    spec.loader.exec_module(module)


if os.environ.get(ENV_DIR) and __name__ == "sitecustomize":
    try:
        _install(os.environ[ENV_DIR])
    except Exception as _exc:  # noqa: BLE001 - never stop the process over a benchmark hook
        import sys as _sys

        print(f"[bench breakdown] not installed: {type(_exc).__name__}: {_exc}", file=_sys.stderr)
if __name__ == "sitecustomize":
    _chain_next_sitecustomize()
