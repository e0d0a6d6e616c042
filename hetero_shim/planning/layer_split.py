"""Pipeline mode: which stages run on GPUs, and how many layers each stage holds.

Pure logic, no vLLM and no torch. vLLM numbers ranks DP x PP x TP, so stage ``s`` holds ranks
``s*tp .. s*tp+tp-1``. By default the CPU stages come first and the GPU stages last
(``cpu_first``, see ``plan.py``): the last stage computes the LM head and samples, and the
first only looks its tokens up in the embedding table, so with the GPU last the CPU stages
stream nothing but their layers; ``HETERO_SHIM_STAGE_ORDER=gpu-first`` puts the GPU stages first. The split is handed to vLLM as its own
``VLLM_PP_LAYER_PARTITION`` ("4,2,2": layers per stage, in stage order), which
``vllm.distributed.utils.get_pp_indices`` reads in every worker (0.26.0 .. 0.33.0).

Where the split comes from, first match wins:
1. ``VLLM_PP_LAYER_PARTITION`` set by the user (validated here);
2. ``hetero_gpu_layers=N`` / ``--hetero-gpu-layers N``: N layers on the GPU stages;
3. automatic with GPU stages: as many layers as fit in one GPU's budget (``fit_gpu_layers``);
4. automatic without GPU stages: vLLM's even split (``even_partition``).
Layers of the GPU stages and of the CPU stages are each spread evenly over their stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetero_shim import settings
from hetero_shim.errors import HeteroConfigError, InvalidLayerCost

PARTITION_ENV = settings.PP_LAYER_PARTITION
GIB = 1 << 30


@dataclass(frozen=True)
class LayerSplit:
    partition: tuple[int, ...]  # layers per pipeline stage, stage 0 first
    source: str  # where the split came from, in words (printed in the rank plan)

    @property
    def env_value(self) -> str:
        return ",".join(map(str, self.partition))

    def layer_range(self, stage: int) -> tuple[int, int]:
        start = sum(self.partition[:stage])
        return start, start + self.partition[stage]


def parse_gpu_layers(value: object) -> int:
    """Validate ``hetero_gpu_layers=`` / ``--hetero-gpu-layers``: a whole number of layers, 1 or more."""
    if isinstance(value, bool):
        value = repr(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value < 1:
        raise HeteroConfigError(
            f"hetero_gpu_layers={value!r} is not supported: give a whole number of layers (1 or more) for the "
            "GPU stage, or leave it out for the automatic split"
        )
    return value


def stage_kinds(pp: int, tp: int, gpu_ranks: int, cpu_first: bool = False) -> tuple[str, ...]:
    """'gpu' or 'cpu' per stage; a stage whose TP group would mix both kinds is refused. The GPU
    ranks are the low ranks, or with ``cpu_first`` the high ones."""
    kinds = []
    world = pp * tp
    lo, hi = (world - gpu_ranks, world) if cpu_first else (0, gpu_ranks)
    for stage in range(pp):
        first, last = stage * tp, stage * tp + tp - 1
        if lo <= first and last < hi:
            kinds.append("gpu")
        elif last < lo or first >= hi:
            kinds.append("cpu")
        else:
            raise HeteroConfigError(
                f"pipeline_parallel_size={pp} with tensor_parallel_size={tp} and {gpu_ranks} GPU rank(s) would put "
                f"GPU and CPU ranks in stage {stage} (ranks {first}-{last}); pipeline mode runs whole stages on GPUs "
                f"or on CPUs: use a tensor_parallel_size that divides the GPU ranks ({gpu_ranks}), e.g. "
                "tensor_parallel_size=1, or pipeline_parallel_size=1 for heterogeneous tensor parallelism"
            )
    return tuple(kinds)


def even_partition(layers: int, stages: int) -> tuple[int, ...]:
    """vLLM's default (``get_pp_indices`` without the variable): the remainder goes to the stages
    before the last one, counting back from the second to last."""
    base, extra = divmod(layers, stages)
    parts = [base] * stages
    for i in range(2, extra + 2):
        parts[-i] += 1
    return tuple(parts)


def spread(layers: int, stages: int) -> tuple[int, ...]:
    """``layers`` over ``stages`` as evenly as possible, earlier stages taking the remainder."""
    base, extra = divmod(layers, stages)
    return tuple(base + (1 if i < extra else 0) for i in range(stages))


def parse_partition(text: str, layers: int, stages: int) -> tuple[int, ...]:
    """Validate a user's ``VLLM_PP_LAYER_PARTITION`` against the model and the pipeline size."""
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise HeteroConfigError(
            f"{PARTITION_ENV}={text!r} is not a comma-separated list of layer counts like '6,2'"
        ) from None
    if len(parts) != stages:
        raise HeteroConfigError(
            f"{PARTITION_ENV}={text!r} names {len(parts)} stage(s) but pipeline_parallel_size={stages}"
        )
    if sum(parts) != layers:
        raise HeteroConfigError(
            f"{PARTITION_ENV}={text!r} sums to {sum(parts)} layers but the model has {layers}"
        )
    if min(parts) < 1:
        raise HeteroConfigError(f"{PARTITION_ENV}={text!r}: every stage needs at least one layer")
    return parts


def fit_gpu_layers(budget: int, fixed: int, per_layer: int) -> int:
    """How many layers fit in ``budget`` bytes after ``fixed`` bytes (embeddings, activations, ...)."""
    if per_layer <= 0:
        raise InvalidLayerCost(f"per_layer must be positive; got {per_layer}")
    return max(0, (budget - fixed) // per_layer)


def choose_split(
    layers: int,
    kinds: tuple[str, ...],
    gpu_layers: int | None = None,
    user_partition: str | None = None,
    fits: int | None = None,
    fit_detail: str = "",
) -> LayerSplit:
    """The split for a pipeline of ``kinds`` (from ``stage_kinds``) over ``layers`` layers.

    ``fits``: layers that fit on one GPU stage (automatic split with GPU stages; None: unknown).
    """
    pp = len(kinds)
    if pp > layers:
        raise HeteroConfigError(
            f"pipeline_parallel_size={pp} is larger than the model's {layers} layer(s); each stage needs a layer"
        )
    if user_partition is not None:
        parts = parse_partition(user_partition, layers, pp)
        note = f" (hetero_gpu_layers={gpu_layers} not used)" if gpu_layers is not None else ""
        return LayerSplit(parts, f"{PARTITION_ENV} set by the user{note}")
    lead = kinds.count("gpu")
    if lead == pp:
        if gpu_layers is not None and gpu_layers != layers:
            raise HeteroConfigError(
                f"hetero_gpu_layers={gpu_layers}: every pipeline stage runs on a GPU here, so all {layers} layers "
                "do; leave hetero_gpu_layers out"
            )
        return LayerSplit(even_partition(layers, pp), "vLLM's even split (every stage on a GPU)")
    no_gpu = lead == 0
    lead = max(lead, 1)  # without GPU stages, hetero_gpu_layers sizes stage 0 (all-CPU pipeline mode)
    rest = pp - lead
    if gpu_layers is not None:
        where = "stage 0 (no GPU on this node: it runs on CPU)" if no_gpu else f"{lead} GPU stage(s)"
        if gpu_layers > layers:
            raise HeteroConfigError(f"hetero_gpu_layers={gpu_layers} is more than the model's {layers} layers")
        if gpu_layers < lead or layers - gpu_layers < rest:
            raise HeteroConfigError(
                f"hetero_gpu_layers={gpu_layers} leaves {layers - gpu_layers} of the model's {layers} layers for "
                f"{rest} CPU stage(s) and {gpu_layers} for {lead} GPU stage(s); every stage needs at least one: "
                f"use {lead} to {layers - rest}"
            )
        if fits is not None and gpu_layers > fits * lead:
            raise HeteroConfigError(
                f"hetero_gpu_layers={gpu_layers} does not fit: {fits * lead} layer(s) fit in the GPU budget "
                f"({fit_detail}); lower hetero_gpu_layers or raise gpu_memory_utilization"
            )
        return LayerSplit(_assemble(kinds, no_gpu, spread(gpu_layers, lead), spread(layers - gpu_layers, rest)),
                          f"hetero_gpu_layers={gpu_layers} on {where}")
    if no_gpu or fits is None:
        return LayerSplit(even_partition(layers, pp), "automatic: vLLM's even split (no GPU stage)" if no_gpu
                          else "automatic: vLLM's even split (GPU budget unknown)")
    if fits < 1:
        raise HeteroConfigError(
            f"automatic split: not one layer fits in the GPU budget ({fit_detail}); raise gpu_memory_utilization, "
            "lower kv_cache_memory_bytes/max_model_len, or give hetero_gpu_layers"
        )
    on_gpu = min(fits * lead, layers - rest)
    return LayerSplit(_assemble(kinds, no_gpu, spread(on_gpu, lead), spread(layers - on_gpu, rest)),
                      f"automatic: {on_gpu} layer(s) on {lead} GPU stage(s), {fits} fit per GPU ({fit_detail})")


def _assemble(kinds: tuple[str, ...], no_gpu: bool, gpu: tuple[int, ...], cpu: tuple[int, ...]) -> tuple[int, ...]:
    """Layers per stage in stage order, from the GPU stages' and the CPU stages' shares (without GPU
    stages, stage 0 takes the "GPU" share)."""
    if no_gpu:
        return gpu + cpu
    gpu_it, cpu_it = iter(gpu), iter(cpu)
    return tuple(next(gpu_it) if kind == "gpu" else next(cpu_it) for kind in kinds)
