"""GPU memory a pipeline stage needs per decoder layer, for the automatic GPU/CPU layer split.

Reads what vLLM's engine config already knows (duck-typed: model path, dtype, shapes, cache
settings) and the checkpoint's safetensors headers (only the JSON header of each file, no
weights). An estimate, deliberately on the safe side:
- weights: the largest decoder layer of the checkpoint at the run's dtype (from the hf config
  if there are no local safetensors files), divided by the stage's TP size;
- KV cache: ``max_model_len`` tokens per layer (vLLM needs room for one full-length request),
  or ``kv_cache_memory_bytes`` as a fixed amount when the user set it;
- fixed: every non-layer weight except ``lm_head`` (the embedding of a first stage, or the same
  size of LM head on a last one), plus 1 GiB for the CUDA context and allocator slack (1.5 GiB
  when the stage compiles and captures CUDA graphs: their workspaces and memory pools), plus
  activations of ``max_num_batched_tokens``. Measured on the GPU machine (3B, bf16): a compiled,
  graph-captured engine peaked at 2.8 GiB beyond its weights and KV cache, stock offload alike;
- a CPU stage followed by this GPU stage, whose large steps' linear layers this stage's rank computes
  (``HETERO_SHIM_CPU_GEMM_ON_GPU``, collectives/gemm_channel.py): its weight buffers, a step's input
  and output pieces, slack, ``served_gpu_bytes`` (0.15-0.16 GiB at 3B and 8B shapes, 2048 tokens, the
  default two buffers);
- other CPU stages that run their large steps' linear layers on this GPU themselves
  (``HETERO_SHIM_CPU_GEMM_VIA=own``): per CPU rank a CUDA context and buffers for pieces of
  weight (the one in use and ``HETERO_SHIM_CPU_GEMM_AHEAD`` on their way; ``HETERO_SHIM_CPU_GEMM_CHUNK_MIB``
  each, or the largest weight), ``cpu_rank_gpu_bytes``.
  Measured on the GPU machine (bf16, 1 CPU stage, buffers of the largest weight): the engine's peak
  rose by 0.96 GiB (3B shapes) and 1.21 GiB (8B) when the CPU stage opened the GPU, i.e. 0.77 GiB
  besides the buffers at both sizes.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from hetero_shim import settings
from hetero_shim.planning.layer_split import GIB

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class GpuLayerCosts:
    budget: int  # bytes the GPU stage may use
    fixed: int  # bytes needed whatever the number of layers
    per_layer_weights: int
    per_layer_kv: int  # 0 when kv_cache_memory_bytes is part of ``fixed``
    how: str  # where the numbers came from

    def fits(self, with_kv: bool = True) -> int:
        per = self.per_layer_weights + (self.per_layer_kv if with_kv else 0)
        return max(0, (self.budget - self.fixed) // max(1, per))

    def describe(self) -> str:
        kv = f" + KV {self.per_layer_kv / GIB:.3f}" if self.per_layer_kv else ""
        return (f"budget {self.budget / GIB:.1f} GiB, fixed {self.fixed / GIB:.2f} GiB, per layer "
                f"{self.per_layer_weights / GIB:.3f}{kv} GiB; {self.how}")


def checkpoint_numels(model_dir: str) -> tuple[dict[int, int], int] | None:
    """(elements per decoder layer, elements outside the layers except lm_head) from safetensors headers."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    per_layer: dict[int, int] = {}
    other = 0
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            match = _LAYER.search(name)
            if match:
                per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0) + numel
            elif "lm_head" not in name:
                other += numel
    return per_layer, other


def config_numels(hf) -> tuple[int, int]:
    """(elements of one decoder layer, of the embeddings) from an hf config, gated MLP assumed."""
    h = hf.hidden_size
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or h // heads
    kv = getattr(hf, "num_key_value_heads", None) or heads
    inter = getattr(hf, "intermediate_size", None) or getattr(hf, "ffn_dim", None) or 4 * h
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    return attn + 3 * h * inter + 4 * h, hf.vocab_size * h + getattr(hf, "max_position_embeddings", 0) * h


#: a CPU rank's CUDA context, cuBLAS, activations and allocator slack on the GPU it streams its large
#: steps to (measured: 0.77 GiB besides the weight buffers, 3B and 8B shapes, 2048-token steps)
CPU_RANK_CONTEXT = 790 << 20


def _weight_slot(hf, elem: int) -> tuple[int, int, int]:
    """(hidden size, MLP width, bytes of one weight buffer): the chunk size or, when smaller or chunks
    are off, the largest linear weight (a gated MLP's fused gate and up projection)."""
    h = hf.hidden_size
    inter = getattr(hf, "intermediate_size", None) or getattr(hf, "ffn_dim", None) or 4 * h
    largest = 2 * h * inter * elem
    chunk = settings.cpu_gemm_chunk_bytes()
    return h, inter, largest if chunk is None else min(chunk, largest)


def weight_buffers() -> int:
    """GPU buffers a weight stream holds: the pieces copied ahead and the one in use."""
    return settings.cpu_gemm_ahead() + 1


def cpu_rank_gpu_bytes(hf, elem: int) -> int:
    """GPU memory one CPU rank holds while it runs its large steps' linear layers there: its context
    and its weight buffers."""
    return CPU_RANK_CONTEXT + weight_buffers() * _weight_slot(hf, elem)[2]


#: a GPU rank's allocator slack for computing the previous CPU stage's large steps. Measured on the
#: GPU machine (bf16, 2048-token steps), the peak rose by 0.145 GiB (3B shapes) and 0.13 GiB (8B) over
#: the same stage without them: the buffers below plus at most ~10 MiB
SERVED_SLACK = 16 << 20


def served_gpu_bytes(hf, elem: int, max_tokens: int) -> int:
    """GPU memory a GPU rank holds while it computes the previous CPU stage's large steps
    (collectives/gemm_channel.py): its weight buffers (which small steps' splits share), a step's
    input at its widest (the MLP's down projection) and two pieces of output, and allocator slack. No
    context: the rank has one."""
    h, inter, slot = _weight_slot(hf, elem)
    piece_out = max_tokens * min(2 * inter * elem, slot // h)
    return SERVED_SLACK + weight_buffers() * slot + max_tokens * inter * elem + 2 * piece_out


def cpu_ranks_on_each_gpu(kinds: tuple[str, ...]) -> tuple[int, int]:
    """For a pipeline of stage kinds ("gpu"/"cpu"): (CPU ranks that open each GPU themselves for their
    large steps, shared in turn; CPU ranks whose large steps each GPU rank computes: a CPU stage
    followed by a GPU stage is served by that stage's ranks). (0, 0) when HETERO_SHIM_CPU_GEMM_ON_GPU
    keeps them on the CPU."""
    if not settings.cpu_gemm_on_gpu_wanted(pipeline=True) or "gpu" not in kinds:
        return 0, 0
    served = 0
    if settings.cpu_gemm_via() != "own":
        served = sum(1 for s, kind in enumerate(kinds[:-1]) if kind == "cpu" and kinds[s + 1] == "gpu")
    own = kinds.count("cpu") - served
    return -(-own // kinds.count("gpu")), min(served, 1)


def gpu_layer_costs(vllm_config, total_gpu_memory: int, cpu_ranks_on_gpu: int = 0,
                    served_on_gpu: int = 0) -> GpuLayerCosts:
    """``cpu_ranks_on_gpu``: CPU ranks that open this GPU for their large steps; ``served_on_gpu``:
    CPU ranks whose large steps this GPU's rank computes (both charged to its budget)."""
    model, cache, par, sched = (vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config,
                                vllm_config.scheduler_config)
    elem = _itemsize(model.dtype)
    tp = par.tensor_parallel_size
    numels = checkpoint_numels(str(model.model))
    if numels and numels[0]:
        layer, other = max(numels[0].values()), numels[1]
        how = "weights from the safetensors headers"
    else:
        layer, other = config_numels(model.hf_text_config)
        how = "weights estimated from the model config"
    hf = model.hf_text_config
    activations = sched.max_num_batched_tokens * max(hf.hidden_size, getattr(hf, "intermediate_size", 0) or 0) * elem
    context = GIB if model.enforce_eager else GIB + GIB // 2
    fixed = context + other * elem + 4 * activations
    kv_elem = elem if cache.cache_dtype in (None, "auto") else _itemsize(cache.cache_dtype)
    per_token = 2 * model.get_num_kv_heads(par) * model.get_head_size() * kv_elem
    per_layer_kv = per_token * model.max_model_len
    if getattr(cache, "kv_cache_memory_bytes", None):
        fixed += cache.kv_cache_memory_bytes
        per_layer_kv = 0
        how += f"; KV cache kv_cache_memory_bytes={cache.kv_cache_memory_bytes}"
    else:
        how += f"; KV cache for max_model_len={model.max_model_len} tokens per layer"
    if cpu_ranks_on_gpu:
        streaming = cpu_ranks_on_gpu * cpu_rank_gpu_bytes(hf, elem)
        fixed += streaming
        how += f"; {cpu_ranks_on_gpu} CPU rank(s) computing large steps here {streaming / GIB:.2f} GiB"
    if served_on_gpu:
        serving = served_on_gpu * served_gpu_bytes(hf, elem, sched.max_num_batched_tokens)
        fixed += serving
        how += f"; the previous CPU stage's large steps computed here {serving / GIB:.2f} GiB"
    budget = int(cache.gpu_memory_utilization * total_gpu_memory)
    return GpuLayerCosts(budget, fixed, layer * elem // tp, per_layer_kv, how)


def decoder_weight_copies(plan) -> float:
    """How many times a CPU rank's host memory holds its decoder layers' weights: once, or where its
    linear layers' large steps go to a GPU (``plan.cpu_gemm``), twice (vLLM's CPU kernels keep their
    own copy where they pack, the plain weights stay in shared memory for the GPU), plus the rows after a decode
    split's larger share (HETERO_SHIM_CPU_GEMM_SPLIT_WIDE, adapt's 60 %), which have a CPU kernel of
    their own."""
    if not plan.cpu_gemm:
        return 1.0
    _, _, larger = settings.cpu_gemm_split_other_shares()
    return 2.0 + ((100 - larger) / 100 if larger else 0.0)



def copies_note(copies: float) -> str:
    """How the KV budgets' messages say the decoder layers were counted (:func:`decoder_weight_copies`):
    "" where once; the larger share's rows with what saves them, since the default split holds them."""
    if copies <= 1:
        return ""
    note = (f"their decoder layers counted {copies:g} times: vLLM's CPU kernels' copy, and the plain weights in "
            "shared memory for the GPU")
    if copies > 2:
        note += (f", and the rows after the split's larger share (a fixed {settings.CPU_GEMM_SPLIT}, e.g. "
                 f"{settings.CPU_GEMM_SPLIT_MIDDLE_PCT}, without {settings.CPU_GEMM_SPLIT_WIDE} holds them once)")
    return note

def cpu_rank_needs(vllm_config, plan) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(bytes of weights, KV bytes per token) of each CPU rank of ``plan``, in CPU-rank order.

    A rank of pipeline stage s holds that stage's layers (the embeddings on the first stage, the
    LM head, a copy when the embeddings are tied, on the last), all divided by the TP size; the
    layers as many times as :func:`decoder_weight_copies` says."""
    model, cache, par = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    elem = _itemsize(model.dtype)
    hf = model.hf_text_config
    numels = checkpoint_numels(str(model.model))
    if numels and numels[0]:
        per_layer, other = max(numels[0].values()), numels[1]
    else:
        per_layer, other = config_numels(hf)
    head = hf.vocab_size * hf.hidden_size
    kv_elem = elem if cache.cache_dtype in (None, "auto") else _itemsize(cache.cache_dtype)
    per_token_layer = 2 * model.get_num_kv_heads(par) * model.get_head_size() * kv_elem
    layers = plan.layers or (model.get_total_num_hidden_layers(),)
    tp = plan.world_size // plan.pp_size
    copies = decoder_weight_copies(plan)
    weights, per_token = [], []
    for rank in plan.cpu_ranks:
        stage = plan.stage(rank)
        numel = int(layers[stage] * per_layer * copies) + (other if stage == 0 else 0) + \
            (head if stage == len(layers) - 1 else 0)
        weights.append(numel * elem // tp)
        per_token.append(layers[stage] * per_token_layer)
    return tuple(weights), tuple(per_token)


def _itemsize(dtype) -> int:
    import torch

    if isinstance(dtype, str):
        name = {"half": "float16", "float": "float32", "fp8": "float8_e4m3fn"}.get(dtype, dtype)
        name = "float8_e4m3fn" if name.startswith("fp8") else name
        dtype = getattr(torch, name, torch.float16)
    return torch.empty((), dtype=dtype).element_size()
