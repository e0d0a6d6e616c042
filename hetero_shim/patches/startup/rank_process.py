"""CPU-rank processes: each worker process learns its kind at spawn, and a CPU rank of a
node with GPUs takes vLLM's CPU platform before anything binds ``current_platform``.

Targets
- ``WorkerProc.make_worker_process`` (``vllm.v1.executor.multiproc_executor``): around the
  spawn of a CPU rank the engine core's environment gets ``HETERO_SHIM_RANK_KIND=cpu``; a GPU
  rank of a pipeline whose CPU stages come first gets the local rank of its device; with a
  CUDA build of vLLM also ``CUDA_VISIBLE_DEVICES=-1`` and the rank's OpenMP binding from the
  rank plan (vLLM's own OMP manager is inactive when the engine core's platform is CUDA);
  spawn copies it. With GPU and CPU ranks the engine core also confines itself, and tells each
  worker which cores to confine itself to (hetero_shim/affinity.py).
- ``resolve_current_platform_cls_qualname`` (``vllm.platforms``): in a CPU-rank process it
  answers vLLM's CPU platform, so every ``from vllm.platforms import current_platform``
  in that process gets the CPU platform.
Why: vLLM resolves one platform per node; a CPU rank of a GPU node would otherwise run as CUDA.
Remove when: vLLM supports per-rank platforms (not as of 0.33.0).
"""

from __future__ import annotations

import os

from hetero_shim import affinity, main_guard, run_state, settings, versions
from hetero_shim.arguments import Params
from hetero_shim.collectives import gemm_channel
from hetero_shim.logs import log
from hetero_shim.planning.plan import format_id_list
from hetero_shim.registry import Fact, Patch

WHY = "vLLM resolves one platform per node; CPU ranks of a GPU node need the CPU platform"
REMOVE_WHEN = "vLLM supports per-rank platforms"
UPSTREAM_PROCESS = "every worker starts with the engine core's environment: no per-rank kind, devices or cores"
UPSTREAM_PLATFORM = "the platform is found by probing the node's hardware"
UPSTREAM_PLATFORM_028 = UPSTREAM_PLATFORM + ", but `VLLM_TARGET_DEVICE=cpu` selects the CPU platform outright"
STALE_PLATFORM = ("from 0.28 `VLLM_TARGET_DEVICE=cpu` in a CPU rank's environment would select the CPU platform "
                  "without this patch; kept until that is run on a GPU node")
CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"
MULTIPROC = "vllm.v1.executor.multiproc_executor"
MAKE_WORKER_PROCESS = Params(local_rank=1, rank=2)  # a staticmethod: (vllm_config, local_rank, rank, ...)
SAME_ENVIRONMENT = Fact(MULTIPROC, "WorkerProc.make_worker_process", r"environ|\benv\b",
                        "make_worker_process sets a per-rank environment", present=False)
PLATFORM_PROBED = Fact("vllm.platforms", "resolve_current_platform_cls_qualname", r"builtin_platform_plugins",
                       "the platform is resolved by probing vLLM's built-in platform plugins")
NO_CPU_TARGET = Fact("vllm.platforms", "resolve_current_platform_cls_qualname", r'VLLM_TARGET_DEVICE == "cpu"',
                     "VLLM_TARGET_DEVICE=cpu selects the CPU platform outright", present=False)


def rows(release: str) -> tuple[Patch, ...]:
    explicit_cpu_target = versions.release_key(release) >= (0, 28, 0)
    return (
        Patch("CPU rank process", MULTIPROC, "WorkerProc.make_worker_process", spawn_with_rank_environment,
              why=WHY, remove_when=REMOVE_WHEN, upstream=UPSTREAM_PROCESS, tripwires=(SAME_ENVIRONMENT,),
              params=MAKE_WORKER_PROCESS),
        Patch("CPU rank process", "vllm.platforms", "resolve_current_platform_cls_qualname", cpu_platform_in_cpu_ranks,
              why=WHY, remove_when=REMOVE_WHEN,
              upstream=UPSTREAM_PLATFORM_028 if explicit_cpu_target else UPSTREAM_PLATFORM,
              tripwires=(PLATFORM_PROBED, NO_CPU_TARGET), stale=STALE_PLATFORM if explicit_cpu_target else ""),
    )


def rank_environment(rank: int) -> dict[str, str]:
    plan = run_state.plan()
    confine = affinity.confines(plan)
    if plan is None or plan.kind(rank) == "gpu":
        env = {run_state.RANK_KIND: "gpu"}
        if confine:
            env[settings.PROCESS_CPUS] = format_id_list(affinity.reserved_cpus(plan))
        return env
    env = {run_state.RANK_KIND: "cpu"}
    if not versions.is_cpu_build():  # the engine core runs the CUDA platform: bind here, hide the GPUs
        # "-1", not "": vLLM keeps Triton on when CUDA_VISIBLE_DEVICES is empty (it reads that as
        # Ray's transient state) and would run the sampler's Triton kernels on a CPU rank.
        env["CUDA_VISIBLE_DEVICES"] = "-1"
        if cpu_rank_compiles(plan):  # as vLLM's CPU platform sets them for its compiled model
            env.update({"TORCHINDUCTOR_COMPILE_THREADS": "1", "TORCHINDUCTOR_CPP_DYNAMIC_THREADS": "1",
                        # vLLM 0.26's ahead-of-time path failed there (H200: "uname_result_base.__new__()
                        # takes 6 positional arguments but 7 were given" in dynamo's frame compile)
                        "VLLM_USE_AOT_COMPILE": "0"})
        else:
            # vLLM wraps small CPU helpers in torch.compile (inductor: a C++ build, about a minute at
            # start-up); the CPU rank runs eagerly like the rest of a heterogeneous run.
            env["TORCHDYNAMO_DISABLE"] = "1"
        env.update(gpu_for_large_steps(plan, rank))
        cores = plan.cpu_lists[plan.cpu_index(rank)] if plan.cpu_lists else ()
        if cores:
            env.update(omp_environment(cores, plan))
            if confine:
                env[settings.PROCESS_CPUS] = format_id_list(cores)
            spin = ""
            if env.get("OMP_WAIT_POLICY") == "ACTIVE":
                bound = f"GOMP_SPINCOUNT={env['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in env else "without a bound"
                spin = (f"; its idle OpenMP threads spin ({bound}; {settings.CPU_OMP_WAIT}=runtime leaves the "
                        "wait to the OpenMP runtime)")
            log.info("hetero_shim: CPU rank %d bound to cores %s%s", rank, format_id_list(cores), spin)
    return env


def cpu_rank_compiles(plan) -> bool:
    """Whether the plan's CPU ranks compile their model (decided once, in the engine core, by
    :func:`cpu_compile_reason`)."""
    return plan is not None and bool(plan.cpu_compile)


def cpu_compile_reason(config, plan) -> str:
    """Why the CPU ranks of ``plan`` compile their model, or "" when they run eagerly.

    In scope: vLLM's CUDA build, pipeline stages of one rank each (their forward holds no collective;
    measured there only), GPU and CPU ranks, dense models (vLLM's CPU MoE path was not traced). Then
    HETERO_SHIM_CPU_RANK_COMPILE decides: "1" compiles, "0" does not, "auto" compiles when the engine
    itself compiles (the GPU stage does) and inductor finds a C++ compiler."""
    import shutil

    from vllm.config import CompilationMode

    from hetero_shim.model_support import num_experts

    mode = settings.cpu_rank_compile()
    if (mode == "off" or versions.is_cpu_build() or plan.pp_size < 2 or plan.world_size != plan.pp_size
            or not 0 < plan.gpu_ranks < plan.world_size):
        return ""
    if num_experts(config.model_config):
        log.info("hetero_shim: the CPU ranks run eagerly: compiling covers dense models only (this model has experts)")
        return ""
    if mode == "on":
        return f"{settings.CPU_RANK_COMPILE}=1"
    if config.compilation_config.mode == CompilationMode.NONE:
        return ""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        log.info("hetero_shim: the CPU ranks run eagerly: no C++ compiler (%s) for inductor on this host; install "
                 "one to compile them as the engine compiles its GPU stage", compiler)
        return ""
    return f"the engine compiles (dynamo once, inductor's C++ kernels by {compiler}; {settings.CPU_RANK_COMPILE}=0 turns it off)"


def gpu_for_large_steps(plan, rank: int) -> dict[str, str]:
    """The GPU a CPU rank's large-token linear layers may use (patches/per_step/cpu_gemm_on_gpu.py; by
    default in pipeline mode only): the next stage's GPU rank computes them where the CPU rank's
    stage is followed by a GPU stage (collectives/gemm_channel.py; this rank opens no GPU).
    Otherwise the GPU ranks' devices in turn, named as the engine core's CUDA_VISIBLE_DEVICES names
    them. The rank still starts with its GPUs hidden from Python (above); at its start only the CUDA
    driver is shown this one, and PyTorch's NVML-based availability check, which reads Python's
    environment, keeps telling vLLM's CPU code (and Triton) that there is no GPU."""
    if plan.gpu_ranks < 1 or not settings.cpu_gemm_on_gpu_wanted(pipeline=plan.pp_size > 1):
        return {}
    if settings.cpu_gemm_via() != "own" and gemm_channel.server_rank(plan, rank) is not None:
        return {settings.CPU_RANK_GPU: gemm_channel.NEXT_STAGE}  # no GPU in this process at all
    index = plan.cpu_index(rank) % plan.gpu_ranks
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    device = visible[index] if index < len(visible) else str(index)
    return {settings.CPU_RANK_GPU: device, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}


def large_steps_route(plan) -> str:
    """What the rank plan says about the CPU ranks' linear layers: where each CPU rank's large steps
    go (:func:`gpu_for_large_steps`) and, where the next stage's GPU rank serves it, how its small
    steps split; "" when every CPU rank computes them itself. Ranks with the same route share a line."""
    tokens = settings.cpu_gemm_on_gpu_tokens()
    served = f"steps of >= {tokens} tokens on the next stage's GPU rank (weights streamed from shared memory)"
    pct = settings.cpu_gemm_split_pct()
    if pct:
        large = settings.cpu_gemm_split_large_only()
        if settings.cpu_gemm_split_auto():
            share = (f"the leading rows of {'the large layers' if large else 'each layer'}, a share the CPU rank "
                     "measures at start-up,")
        elif settings.cpu_gemm_split_adapt():
            shares = settings.shares_text(settings.cpu_gemm_split_adapt_shares())
            share = (f"the leading rows of {'the large layers' if large else 'each layer'}, {shares} as the CPU rank "
                     "finds fastest per step size,")
        else:
            share = (f"the leading rows of the large layers, {pct} % of the stage's weights," if large else
                     f"the leading {pct} % of each layer's rows")
        queued = ", a step's requests queued ahead" if settings.cpu_gemm_queue_step() else ""
        wide = settings.cpu_gemm_split_wide()
        wider = f" ({wide[1]} % in steps of >= {wide[0]} tokens)" if wide else ""
        served += f"; smaller steps split: {share}{wider} there, the others here at the same time{queued}"
    routes: dict[str, list[int]] = {}
    for rank in plan.cpu_ranks:
        entry = gpu_for_large_steps(plan, rank).get(settings.CPU_RANK_GPU)
        if entry is not None:
            route = served if entry == gemm_channel.NEXT_STAGE else \
                f"steps of >= {tokens} tokens on GPU {entry} (the rank's own CUDA context)"
            routes.setdefault(route, []).append(rank)
    if len(routes) < 2:
        return next(iter(routes), "")
    return "; ".join(f"CPU rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {route}"
                     for route, ranks in routes.items())


#: The bound of "bounded" waiting (OMP_WAIT_POLICY=ACTIVE): libgomp's spin turns (12.5 ns each
#: measured on the CI machine's Xeon, so about 0.125 s) and Intel OpenMP's block time in ms: long
#: enough to span the gaps inside a pipeline's decode steps and between them, short enough that an
#: idle engine's CPU ranks sleep. Spin turns and block time set in the environment are kept.
SPIN_BOUND = {"GOMP_SPINCOUNT": "10000000", "KMP_BLOCKTIME": "100"}


def omp_wait(plan) -> str:
    """HETERO_SHIM_CPU_OMP_WAIT, "auto" resolved for ``plan``: "bounded" for the CPU stages of a
    pipeline with GPU stages whose cores are theirs alone (spinning made such a stage's own GEMM
    22-33 % faster in decode, docs/performance.md), unless the environment sets OMP_WAIT_POLICY
    itself; "runtime" otherwise."""
    wait = settings.cpu_omp_wait()
    if wait != "auto":
        return wait
    pipeline = plan is not None and plan.pp_size > 1 and plan.gpu_ranks > 0 and not plan.shared_cores
    return "bounded" if pipeline and "OMP_WAIT_POLICY" not in os.environ else "runtime"


def omp_environment(cores, plan) -> dict[str, str]:
    """OpenMP settings of a CPU rank on ``cores``: by default one place holding them all (threads
    may move among the rank's cores, as vLLM's generic OpenMP setup does); with
    HETERO_SHIM_CPU_THREAD_PLACES=core one place per core, thread i on core i (as vLLM's GNU and
    Intel OpenMP setups pin them); how idle threads wait: :func:`omp_wait`."""
    if settings.cpu_thread_places() == "core":
        env = {"OMP_PLACES": ",".join("{%d}" % c for c in cores), "OMP_PROC_BIND": "close"}
    else:
        env = {"OMP_PLACES": "{" + ",".join(map(str, cores)) + "}", "OMP_PROC_BIND": "true"}
    wait = omp_wait(plan)
    if wait != "runtime":
        env["OMP_WAIT_POLICY"] = "PASSIVE" if wait == "passive" else "ACTIVE"
    if wait == "bounded":
        env.update({k: os.environ.get(k, v) for k, v in SPIN_BOUND.items()})
    return {"OMP_NUM_THREADS": str(len(cores))} | env


_engine_core_confined = False


def confine_engine_core() -> None:
    """Before the first worker starts: the engine core moves to the reserved cores (once)."""
    global _engine_core_confined
    plan = run_state.plan()
    if _engine_core_confined or not affinity.confines(plan):
        return
    _engine_core_confined = True
    cpus = affinity.reserved_cpus(plan)
    if affinity.confine_this_process(cpus):
        log.info("hetero_shim: engine core and GPU-rank processes confined to reserved cores %s, off the CPU "
                 "ranks' cores (%s=0 leaves them free)", format_id_list(cpus), settings.CONFINE)


def spawn_with_rank_environment(wrapped, instance, args, kwargs):
    if not run_state.heterogeneous():
        return wrapped(*args, **kwargs)
    rank = MAKE_WORKER_PROCESS.get(args, kwargs, "rank")
    plan = run_state.plan()
    if plan is not None and plan.cpu_first and plan.kind(rank) == "gpu":
        # vLLM gives rank r the local rank r, i.e. cuda:r; with the CPU stages first the GPU ranks
        # are the top ranks, and their devices are 0 .. gpu_ranks-1
        args, kwargs = MAKE_WORKER_PROCESS.replace(args, kwargs, "local_rank", plan.gpu_index(rank))
    confine_engine_core()
    unguarded = os.environ.get(settings.UNGUARDED_MAIN) == "1"
    with settings.environ_set(rank_environment(rank)), main_guard.main_hidden(unguarded):
        return wrapped(*args, **kwargs)


def cpu_platform_in_cpu_ranks(wrapped, instance, args, kwargs):
    if run_state.current().cpu_rank:
        from hetero_shim.patches.per_step import cpu_gemm_on_gpu

        cpu_gemm_on_gpu.reveal_to_driver()
        return CPU_PLATFORM
    return wrapped(*args, **kwargs)
