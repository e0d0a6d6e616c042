"""The benchmark models: random-weight Llama-architecture checkpoints (bf16, safetensors, the
tokenizer of hetero_shim.testing.tiny_models), written on the machine that runs them.

    python bench/models.py 1b 3b [--cache DIR]     # prints NAME PATH per model; weights made on the GPU if any

Shapes are those of public Llama releases (weights random, vocabulary 128256):
1b ~ Llama-3.2-1B (1.24 B params, 2.3 GiB), 3b ~ Llama-3.2-3B (3.21 B, 6.0 GiB),
8b ~ Llama-3.1-8B (8.03 B, 15.0 GiB); ``mini`` (68 M, mostly embeddings) is for smoke tests;
``toy`` is tiny_models' tiny Llama (fp32) used by the tests. Written once per cache directory.

``moe`` is a Qwen3-MoE-shaped mixture of experts (hetero_shim.testing.arch_models.write_moe): Qwen3-30B-A3B's
layer shapes (hidden 2048, 32 query / 4 KV heads of 128, experts of 768, QK-norm, vocabulary 151936) with
16 layers of 32 experts, top-4: 3.34 B params (2.42 B in the experts), 6.2 GiB bf16, about 0.9 B active per
token. ``moe-mini`` (the same shapes, 2 layers of 8 experts, vocabulary 32000: 0.24 B, 0.45 GiB) is for smoke tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hetero_shim.testing import arch_models, tiny_models  # noqa: E402

_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
PRESETS = {
    "mini": dict(_LLAMA3, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, tie_word_embeddings=True),
    "1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
_QWEN3_MOE = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                  num_attention_heads=32, num_key_value_heads=4, head_dim=128, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=8192, decoder_sparse_step=1, mlp_only_layers=[],
                  norm_topk_prob=True, tie_word_embeddings=False)
MOE_PRESETS = {  # name -> (arch_models family, config)
    "moe": ("qwen3_moe", dict(_QWEN3_MOE, num_hidden_layers=16, num_experts=32, num_experts_per_tok=4)),
    "moe-mini": ("qwen3_moe", dict(_QWEN3_MOE, vocab_size=32000, num_hidden_layers=2, num_experts=8,
                                   num_experts_per_tok=2)),
}
NAMES = ("toy", *PRESETS, *MOE_PRESETS)


def get(name: str, cache: Path | None = None) -> Path:
    """The model directory for ``name`` (a preset, ``toy``, or an existing local model directory)."""
    if name == "toy":
        return tiny_models.get(tiny_models.TINY_LLAMA, cache)
    if name in PRESETS:
        return tiny_models.get_llama(PRESETS[name], dtype="bfloat16", seed=0, cache=cache)
    if name in MOE_PRESETS:
        family, config = MOE_PRESETS[name]
        return arch_models.get_moe(family, config, dtype="bfloat16", seed=0, cache=cache)
    if (Path(name) / "config.json").exists():
        return Path(name)
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(NAMES)} or a local model directory")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--cache", type=Path, default=None, help=f"default {tiny_models.DEFAULT_CACHE}")
    opts = parser.parse_args()
    for name in opts.names:
        start = time.monotonic()
        try:
            path = get(name, opts.cache)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"{name} {path} ({time.monotonic() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
