"""Pure-PyTorch stand-ins for the native ``torch.ops._C`` kernels that vLLM's CPU path calls.

The CUDA wheel of vLLM has none of the CPU kernels, yet a CPU rank there runs CpuPlatform,
CPUWorker and the CPU_ATTN backend. This module registers, through ``torch.library``, only
the ops that are missing (not defined at all, or defined with a CUDA kernel only), so that
dense decoder models (Llama, OPT; fp32, bf16) and unquantized MoE models (Mixtral, Qwen-MoE)
run with no native CPU kernel at all.

Every function below is the Python body of one op; the docstring names the vLLM 0.26.0 call
site it serves. Speed is not a goal: the attention loops over requests in plain torch.

Deliberately NOT provided: ``create_onednn_mm_handler`` / ``onednn_mm`` (0.26.0
``vllm/model_executor/layers/utils.py::dispatch_cpu_unquantized_gemm`` picks oneDNN only when
``_custom_ops._supports_onednn = hasattr(torch.ops._C, "create_onednn_mm_handler")`` is true,
and sgl-kernel ``weight_packed_linear`` only when VLLM_CPU_SGL_KERNEL=1; without them it uses
``torch.nn.functional.linear``). ``rms_norm`` / ``fused_add_rms_norm`` are not called on CPU in
0.26.0 (the ``vllm_c`` IR impl is CUDA-alike only; RMSNorm runs the native torch impl).
MoE (0.26.0 ``fused_moe/cpu_fused_moe.py``, chosen by ``UnquantizedFusedMoEMethod.
process_weights_after_loading`` on CpuPlatform): with ``VLLM_CPU_SGL_KERNEL=1`` on an AMX host
and bf16 weights it calls ``convert_weight_packed`` + ``fused_experts_cpu`` (SGLFusedMOE, whose
schemas differ between releases: not provided, so that path needs the native kernels); else
``CPUFusedMOE``: when ``prepack_moe_weight`` exists (and the sizes are multiples of 32) the
grouped GEMM ``prepack_moe_weight`` + ``cpu_fused_moe`` (same schemas 0.26.0 .. 0.33.0; provided
below, as a pair), otherwise vLLM's own pure-torch ``torch.ops.vllm.cpu_fused_moe_torch``
(F.linear per expert, no ``_C`` op). Routing (``select_experts``) is plain torch.
No vLLM import here: this module must load before vLLM's kernels are looked up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hetero_shim.errors import FallbackSchemaMismatch

logger = logging.getLogger(__name__)


# --- positional encoding / activations -------------------------------------------------------

def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False):
    """In-place RoPE on ``query`` / ``key`` ([T, H*head] or [T, H, head]).

    0.26.0: ``RotaryEmbedding.forward_cpu`` (rotary_embedding/base.py) -> ``ops.rotary_embedding``.
    ``cos_sin_cache`` is [max_pos, rot_dim] = [cos | sin]; the first ``rot_dim`` dims of each
    head rotate (NeoX halves or GPT-J interleaved). Like the native CPU kernel, it refuses
    ``rope_dim_offset != 0`` and ``inverse`` (used by DeepSeek-style scaling RoPE only).
    """
    if rope_dim_offset != 0 or inverse:
        raise NotImplementedError("hetero_shim CPU fallback rotary_embedding: rope_dim_offset != 0 and inverse "
                                  "are not supported on CPU (nor by vLLM's native CPU kernel)")
    positions = positions.flatten().long()
    num_tokens = positions.numel()
    rot_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions).float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (query, key):
        if x is None:
            continue
        part = x.view(num_tokens, -1, head_size)[..., :rot_dim]
        p = part.float()
        x1, x2 = p.chunk(2, dim=-1) if is_neox else (p[..., 0::2], p[..., 1::2])
        o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        rotated = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)
        part.copy_(rotated)


def silu_and_mul(out, input):
    """``out = silu(x[..., :d]) * x[..., d:]``.

    0.26.0: ``SiluAndMul.__init__`` (layers/activation.py) looks up ``torch.ops._C.silu_and_mul``
    on CPU (an AttributeError if undefined); ``forward_cpu`` calls it on POWERPC only.
    """
    d = input.shape[-1] // 2
    x = input.float()
    out.copy_(F.silu(x[..., :d]) * x[..., d:])


# --- worker / model runner / sampler ----------------------------------------------------------

def init_cpu_memory_env(node_ids):
    """0.26.0: ``CPUWorker.__init__`` (v1/worker/cpu_worker.py). Native: binds allocations to the
    NUMA node(s). The fallback does nothing (memory placement only, no effect on results)."""


def compute_slot_mapping_kernel_impl(query_start_loc, positions, block_table, slot_mapping, block_size):
    """slot[t] = block_table[req(t), pos(t) // block_size] * block_size + pos(t) % block_size.

    0.26.0: ``utils/cpu_triton_utils.py::_compute_slot_mapping_kernel_impl``, installed by
    ``CPUModelRunner`` in place of the Triton kernel of ``v1/worker/block_table.py``. Like the
    native CPU kernel (unlike the Triton one) it leaves the entries past the tokens untouched.
    """
    qsl = query_start_loc.long()
    first, last = int(qsl[0]), int(qsl[-1])
    counts = qsl[1:] - qsl[:-1]
    req = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    pos = positions[first:last].long()
    blocks = block_table[req, pos // block_size].long()
    slot_mapping[first:last] = blocks * block_size + pos % block_size


def greedy_argmax(logits):
    """Greedy sampling. Not called by 0.26.0 (its sampler uses ``logits.argmax``); called on CPU by
    ``Sampler.greedy_sample`` from 0.32.0 on, so provided for newer releases too."""
    return logits.argmax(dim=-1).view(-1)


# --- CPU_ATTN backend (v1/attention/backends/cpu_attn.py) -------------------------------------

def cpu_attn_has_isa(isa):
    """0.26.0: ``_riscv_supports_rvv`` only. The fallback kernels are ISA-agnostic and claim the
    portable paths only ("vec", "vec16"); the ``isa`` strings passed to the ops are ignored."""
    return isa in ("vec", "vec16")


def get_scheduler_metadata(num_req, num_heads_q, num_heads_kv, head_dim, seq_lens, dtype, query_start_loc,
                           casual, window_size, isa_hint, enable_kv_split, dynamic_causal, kv_cache_dtype="auto"):
    """0.26.0: ``CPUAttentionMetadataBuilder.build`` via ``ops.cpu_attn_get_scheduler_metadata``
    (12 args; 0.27+ also pass ``kv_cache_dtype``). Native: a work-partition plan. The fallback
    attention needs none, so this returns an opaque one-byte placeholder."""
    return torch.zeros(1, dtype=torch.int8)


def _check_kv_dtype(kv_cache_dtype):
    if kv_cache_dtype != "auto":
        raise NotImplementedError(f"hetero_shim CPU fallback: kv_cache_dtype={kv_cache_dtype!r} (FP8 KV cache) "
                                  "is not supported; use kv_cache_dtype='auto'")


def cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa,
                               k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"):
    """Scatter new K/V ([T, Hkv, head]) into the paged cache.

    0.26.0: ``CPUAttentionBackendImpl.forward`` / ``do_kv_cache_update`` and
    ``CpuPlatform.pack_kv_cache``. The cache tensor of ``get_kv_cache_shape`` is
    [blocks, Hkv, block_size, 2*head], viewed [blocks, Hkv, 2*block_size, head] and chunked on
    dim 2, so ``key_cache[b, h, o]`` holds the key of slot ``b*block_size + o``. Slot -1 = skip.
    """
    _check_kv_dtype(kv_cache_dtype)
    block_size = key_cache.shape[2]
    n = min(slot_mapping.shape[0], key.shape[0])
    slots = slot_mapping[:n].long()
    valid = slots >= 0
    slots = slots[valid]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, :, offsets] = key[:n][valid].to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value[:n][valid].to(value_cache.dtype)


def _gather(cache, blocks, length):
    """[Hkv, length, head] of one request from its blocks of a [blocks, Hkv, bs, head] cache."""
    x = cache[blocks]  # [nblk, Hkv, bs, head]
    return x.permute(1, 0, 2, 3).flatten(1, 2)[:, :length].float()


def cpu_attention_with_kv_cache(query, key_cache, value_cache, output, query_start_loc, seq_lens, scale, causal,
                                alibi_slopes, sliding_window_size, block_table, softcap, scheduler_metadata, s_aux,
                                dynamic_causal=None, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"):
    """Paged attention over the cache (prefill, chunked prefill and decode alike).

    0.26.0: ``CPUAttentionBackendImpl.forward``. Per request i its ``n`` queries are the last
    ``n`` of ``seq_lens[i]`` positions; GQA maps query head h to kv head ``h // (Hq/Hkv)``.
    Causal masking (per request from ``dynamic_causal`` when given), sliding window (a query at
    p sees keys in (p - window, p]), softcap ``c*tanh(s/c)`` when > 0, attention sinks
    ``s_aux`` (one extra logit per head in the softmax). Computed in fp32.
    """
    if alibi_slopes is not None:
        raise NotImplementedError("hetero_shim CPU fallback attention does not implement ALiBi")
    _check_kv_dtype(kv_cache_dtype)
    num_heads, block_size = query.shape[1], key_cache.shape[2]
    group = num_heads // key_cache.shape[1]
    out = output.view(output.shape[0], num_heads, -1)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, length in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        n = end - start
        if n == 0:
            continue
        blocks = block_table[i, : (length + block_size - 1) // block_size].long()
        k = _gather(key_cache, blocks, length).repeat_interleave(group, dim=0)  # [Hq, L, head]
        v = _gather(value_cache, blocks, length).repeat_interleave(group, dim=0)
        q = query[start:end].float().transpose(0, 1)  # [Hq, n, head]
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [Hq, n, L]
        if softcap and softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(length - n, length)[:, None]
        k_pos = torch.arange(length)[None, :]
        allowed = torch.ones(n, length, dtype=torch.bool)
        if bool(dynamic_causal[i]) if dynamic_causal is not None else causal:
            allowed &= k_pos <= q_pos
        if sliding_window_size is not None and sliding_window_size > 0:
            allowed &= k_pos > q_pos - sliding_window_size
        scores = scores.masked_fill(~allowed, float("-inf"))
        if s_aux is not None:
            sink = s_aux.float().view(num_heads, 1, 1).expand(num_heads, n, 1)
            probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :length]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v).transpose(0, 1).to(out.dtype)


# --- MoE (fused_moe/cpu_fused_moe.py CPUFusedMOE, grouped-GEMM path) ---------------------------

def prepack_moe_weight(weight, packed_weight, isa):
    """0.26.0: ``CPUFusedMOE.init_moe_grouped_gemm`` -> ``ops.cpu_prepack_moe_weight`` for w13
    [E, 2I, H] and w2 [E, H, I]. Native: an ISA-specific tiled layout of the same shape. The
    fallback keeps the plain layout (its ``cpu_fused_moe`` reads that), so the two are a pair."""
    packed_weight.copy_(weight)


def _moe_act(x, act):
    d = x.shape[-1] // 2
    if act == "silu":
        return F.silu(x[..., :d]) * x[..., d:]
    if act == "gelu":
        return F.gelu(x[..., :d]) * x[..., d:]
    if act == "gelu_tanh":
        return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]
    if act == "swigluoai":  # interleaved gate/up, as vLLM's _swigluoai_forward_native
        gate, up = x[..., ::2].clamp(max=7.0), x[..., 1::2].clamp(min=-7.0, max=7.0)
        return (up + 1) * (gate * torch.sigmoid(gate * 1.702))
    raise NotImplementedError(f"hetero_shim CPU fallback cpu_fused_moe: activation {act!r} is not supported "
                              "(silu, gelu, gelu_tanh, swigluoai)")


def cpu_fused_moe(output, input, w13, w2, w13_bias, w2_bias, topk_weights, topk_id, skip_weighted, act, isa):
    """``output = sum_k w[t,k] * (act(x_t @ w13[e].T + b13[e]) @ w2[e].T + b2[e])`` with e = topk_id[t,k].

    0.26.0: ``CPUFusedMOE.forward_grouped_gemm`` -> ``ops.cpu_fused_moe`` (weights from
    ``prepack_moe_weight`` above). ``skip_weighted``: the router weights were already applied to
    the input (top-1 only), so the expert outputs are summed unweighted. Expert ids outside
    [0, E) contribute nothing. Accumulated in fp32; the activation is rounded to the input dtype
    before the down projection, as the native kernel does.
    """
    num_tokens = topk_id.shape[0]
    num_experts = w13.shape[0]
    acc = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32)
    ids = topk_id.long()
    weights = topk_weights.float()
    x = input.reshape(num_tokens, -1)
    for e in torch.unique(ids).tolist():
        if e < 0 or e >= num_experts:
            continue
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = torch.matmul(x[tok].float(), w13[e].float().t())
        if w13_bias is not None:
            h += w13_bias[e].float()
        h = _moe_act(h, act).to(input.dtype).float()
        y = torch.matmul(h, w2[e].float().t())
        if w2_bias is not None:
            y += w2_bias[e].float()
        if not skip_weighted:
            y *= weights[tok, slot, None]
        acc.index_add_(0, tok, y)
    output.view(num_tokens, -1).copy_(acc)


# --- registration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class OpSpec:
    name: str
    schema: str  # without the name, as in the native TORCH_LIBRARY def
    fn: Callable
    key: str = "CPU"  # dispatch key for a new op; ops without tensor args use CompositeExplicitAutograd
    fake: Callable | None = None  # Meta kernel (shape only), for tracing / torch.compile
    # ops of one group are installed together or not at all: their data layouts must match
    # (a native prepack_moe_weight and a fallback cpu_fused_moe would not)
    group: str | None = None


def _no_op(*args, **kwargs):
    return None


OPS: tuple[OpSpec, ...] = (
    OpSpec("rotary_embedding", "(Tensor positions, Tensor! query, Tensor!? key, int head_size, Tensor cos_sin_cache, "
           "bool is_neox, int rope_dim_offset=0, bool inverse=False) -> ()", rotary_embedding, fake=_no_op),
    OpSpec("silu_and_mul", "(Tensor! out, Tensor input) -> ()", silu_and_mul, fake=_no_op),
    OpSpec("init_cpu_memory_env", "(SymInt[] node_ids) -> ()", init_cpu_memory_env, key="CompositeExplicitAutograd"),
    OpSpec("compute_slot_mapping_kernel_impl", "(Tensor query_start_loc, Tensor positions, Tensor block_table, "
           "Tensor(a3!) slot_mapping, SymInt block_size) -> ()", compute_slot_mapping_kernel_impl, fake=_no_op),
    OpSpec("greedy_argmax", "(Tensor logits) -> Tensor", greedy_argmax,
           fake=lambda logits: logits.new_empty(logits.shape[:-1], dtype=torch.long).view(-1)),
    OpSpec("cpu_attn_has_isa", "(str isa) -> bool", cpu_attn_has_isa, key="CompositeExplicitAutograd"),
    # 0.26.0 passes 12 args; 0.27+ add a defaulted kv_cache_dtype, so this schema serves both.
    OpSpec("get_scheduler_metadata", "(int num_req, int num_heads_q, int num_heads_kv, int head_dim, Tensor seq_lens, "
           "ScalarType dtype, Tensor query_start_loc, bool casual, int window_size, str isa_hint, "
           "bool enable_kv_split, Tensor? dynamic_causal, str kv_cache_dtype=\"auto\") -> Tensor",
           get_scheduler_metadata, fake=lambda *a, **k: torch.empty(1, dtype=torch.int8, device="meta")),
    OpSpec("cpu_attn_reshape_and_cache", "(Tensor key, Tensor value, Tensor(a2!) key_cache, Tensor(a3!) value_cache, "
           "Tensor slot_mapping, str isa, float k_scale=1., float v_scale=1., str kv_cache_dtype=\"auto\") -> ()",
           cpu_attn_reshape_and_cache, fake=_no_op),
    OpSpec("cpu_attention_with_kv_cache", "(Tensor query, Tensor key_cache, Tensor value_cache, Tensor(a3!) output, "
           "Tensor query_start_loc, Tensor seq_lens, float scale, bool causal, Tensor? alibi_slopes, "
           "SymInt sliding_window_size, Tensor block_table, float softcap, Tensor scheduler_metadata, Tensor? s_aux, "
           "Tensor? dynamic_causal, float k_scale=1., float v_scale=1., str kv_cache_dtype=\"auto\") -> ()",
           cpu_attention_with_kv_cache, fake=_no_op),
    OpSpec("prepack_moe_weight", "(Tensor weight, Tensor(a1!) packed_weight, str isa) -> ()", prepack_moe_weight,
           fake=_no_op, group="moe"),
    OpSpec("cpu_fused_moe", "(Tensor(a0!) output, Tensor input, Tensor w13, Tensor w2, Tensor? w13_bias, "
           "Tensor? w2_bias, Tensor topk_weights, Tensor topk_id, bool skip_weighted, str act, str isa) -> ()",
           cpu_fused_moe, fake=_no_op, group="moe"),
)

_LIBRARIES: list[torch.library.Library] = []  # registrations live as long as these objects
_SERVING_KEYS = ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd")


def _existing_schema(qualname: str):
    try:
        return torch._C._get_schema(qualname, "")
    except RuntimeError:
        return None


def _served(qualname: str) -> bool:
    """Defined with a kernel that serves CPU tensors."""
    return _existing_schema(qualname) is not None and any(
        torch._C._dispatch_has_kernel_for_dispatch_key(qualname, k) for k in _SERVING_KEYS)


def _arg_types(schema) -> list[str]:
    return [str(a.type) for a in schema.arguments]


def install(namespace: str = "_C", only: tuple[str, ...] | None = None) -> list[str]:
    """Register the fallback ops missing from ``torch.ops.<namespace>``; return their qualified names.

    An op not defined at all is defined (schema above) with the fallback as its kernel; an op
    defined without a CPU kernel (e.g. a CUDA-only one of the CUDA wheel) gets a CPU kernel
    only, after checking that its argument types match ours. Ops already served on CPU are left
    alone, so calling this after the native kernels loaded registers nothing. Idempotent.
    ``only`` restricts it to the named ops.
    """
    registered: list[str] = []
    fragment = impl = None
    served = {spec.group for spec in OPS if spec.group and _served(f"{namespace}::{spec.name}")}
    for spec in OPS:
        if only is not None and spec.name not in only:
            continue
        if spec.group in served:  # a native member of the group is there: keep the whole group native
            continue
        qualname = f"{namespace}::{spec.name}"
        existing = _existing_schema(qualname)
        if existing is None:
            if fragment is None:
                fragment = torch.library.Library(namespace, "FRAGMENT")
                _LIBRARIES.append(fragment)
            fragment.define(spec.name + spec.schema)
            fragment.impl(spec.name, spec.fn, spec.key)
            if spec.fake is not None:
                fragment.impl(spec.name, spec.fake, "Meta")
        elif _served(qualname):
            continue
        else:
            ours = _parsed_schema(spec)
            if _arg_types(existing) != _arg_types(ours):
                raise FallbackSchemaMismatch(f"hetero_shim CPU fallback: {qualname} is defined as {existing}, "
                                   f"which does not match the fallback's {ours}; refusing to add a CPU kernel")
            if impl is None:
                impl = torch.library.Library(namespace, "IMPL")
                _LIBRARIES.append(impl)
            impl.impl(spec.name, spec.fn, "CPU")
        registered.append(qualname)
    if registered:
        logger.info("hetero_shim: registered pure-PyTorch CPU fallbacks: %s", ", ".join(registered))
    return registered


def _parsed_schema(spec: OpSpec):
    return torch._C.parse_schema(spec.name + spec.schema)
