"""KV cache agreement: GPU and CPU ranks describe the same KV cache once their layouts are set aside.

Targets ``get_kv_cache_configs`` (``vllm.v1.core.kv_cache_utils``; ``kv_cache_planning`` from
0.33) as called by the engine core (``vllm.v1.engine.core`` imports it by name). It merges the
workers' KV cache specs and asserts they are equal. A GPU attention backend and vLLM's CPU
attention backend lay their pages out differently, which only the per-worker field
``indexes_kv_by_block_stride`` records; in heterogeneous mode that field is set to False on
every spec (the conservative value: no page padding, no cross-layer layout) before merging.
Any other difference (block size, heads, dtype) is refused with the fields named. vLLM then
takes the smaller capacity: num_blocks is the minimum over the workers. Each rank's budget
and the agreed number of blocks are logged ("hetero_shim: KV cache ..."), because the
budgets come from different settings on GPU and CPU ranks (see ``hetero_shim.planning.kv_budget``).
Why: vLLM assumes one attention backend per TP group.
Remove when: vLLM merges specs of workers with different attention backends (not as of 0.33.0).
"""

from __future__ import annotations

import dataclasses

from hetero_shim import run_state, versions
from hetero_shim.arguments import Params
from hetero_shim.errors import HeteroConfigError
from hetero_shim.logs import log
from hetero_shim.registry import Fact, Patch

WHY = "GPU and CPU attention backends record different page layouts in otherwise equal KV cache specs"
REMOVE_WHEN = "vLLM merges KV cache specs of workers with different attention backends"
UPSTREAM = "the engine core merges every worker's KV cache specs and asserts they are equal"
UPSTREAM_LAYOUT = UPSTREAM + "; attention specs record the backend's page layout (`indexes_kv_by_block_stride`)"
LAYOUT_FIELDS = ("indexes_kv_by_block_stride",)
GET_KV_CACHE_CONFIGS = Params(kv_cache_specs=1, available_memory=2)


def rows(release: str) -> tuple[Patch, ...]:
    """get_kv_cache_configs lives in kv_cache_utils up to 0.32 and in kv_cache_planning from 0.33, where the
    specs are merged (and asserted equal) by get_global_kv_cache_groups beside it; the page layout field
    exists up to 0.28."""
    key = versions.release_key(release)
    module = "vllm.v1.core.kv_cache_planning" if key >= (0, 33, 0) else "vllm.v1.core.kv_cache_utils"
    merge = "get_global_kv_cache_groups" if key >= (0, 33, 0) else "get_kv_cache_configs"
    tripwires = (Fact(module, merge, r"assert merged_kv_cache_specs\[layer_name\] == layer_spec",
                      "the workers' KV cache specs are merged and asserted equal, layer by layer"),)
    if key <= (0, 28, 0):
        tripwires += (Fact("vllm.v1.kv_cache_interface", "AttentionSpec", r"^\s+indexes_kv_by_block_stride\s*:",
                           "attention specs record the backend's page layout"),)
    return (
        Patch("KV cache agreement", module, "get_kv_cache_configs", agree_on_kv_cache, why=WHY, remove_when=REMOVE_WHEN,
              upstream=UPSTREAM_LAYOUT if key <= (0, 28, 0) else UPSTREAM, tripwires=tripwires,
              aliases=("vllm.v1.engine.core",), params=GET_KV_CACHE_CONFIGS),
    )


def _normalized(spec):
    if not dataclasses.is_dataclass(spec):
        return spec
    names = {f.name for f in dataclasses.fields(spec)}
    return dataclasses.replace(spec, **{f: False for f in LAYOUT_FIELDS if f in names})


def _differences(a, b) -> list[str]:
    if type(a) is not type(b):
        return [f"type {type(a).__name__} != {type(b).__name__}"]
    return [
        f"{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}"
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def agree_on_kv_cache(wrapped, instance, args, kwargs):
    if not run_state.heterogeneous():
        return wrapped(*args, **kwargs)
    specs = GET_KV_CACHE_CONFIGS.get(args, kwargs, "kv_cache_specs")
    if run_state.current().mixed:
        specs = _normalized_layouts(specs)
        args, kwargs = GET_KV_CACHE_CONFIGS.replace(args, kwargs, "kv_cache_specs", specs)
    configs = wrapped(*args, **kwargs)
    _log_agreement(GET_KV_CACHE_CONFIGS.get(args, kwargs, "available_memory", None), specs, configs)
    return configs


def _normalized_layouts(workers: list[dict]) -> list[dict]:
    specs = [{name: _normalized(s) for name, s in worker.items()} for worker in workers]
    first: dict = {}
    for rank, worker in enumerate(specs):
        for name, spec in worker.items():
            if name in first and first[name] != spec:
                raise HeteroConfigError(
                    f"KV cache of layer {name} differs between rank 0 and rank {rank} beyond their layouts: "
                    + "; ".join(_differences(first[name], spec))
                )
            first.setdefault(name, spec)
    return specs


def _log_agreement(budgets, specs, configs) -> None:
    """One line the checks read: each rank's budget, rank 0's bytes per block, the blocks agreed."""
    plan = run_state.plan()
    per_block = sum(getattr(s, "page_size_bytes", 0) for s in specs[0].values()) if specs else 0
    ranks = ", ".join(
        f"rank {r} ({plan.kind(r) if plan else '?'}) {b} B" for r, b in enumerate(budgets or [])
    )
    blocks = sorted({c.num_blocks for c in configs or () if hasattr(c, "num_blocks")})
    log.info("hetero_shim: KV cache budgets: %s; %d B per block; agreed num_blocks=%s (the smallest budget wins)",
             ranks, per_block, ",".join(map(str, blocks)))
