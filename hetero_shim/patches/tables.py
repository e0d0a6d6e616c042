"""Per-release patch tables, assembled from the concern modules' own rows.

Each concern module (one per fix, grouped by when it applies: ``startup/`` and ``per_step/``)
exports ``rows(release)``: its ledger rows for that release, each with its target, wrapper, why,
what upstream lacks, when it can go, the parameters its wrapper reads and its compat tripwires.
This module only puts them together for the releases ``versions.SUPPORTED`` lists (the one list);
any other release has no table. It is imported when vLLM is, not by enable().
The targets of every table are checked against the real wheel of that release
(``scripts/check_tables.py``, manifests in ``tests/data/vllm_symbols/``), and the README's patch
and release tables are generated from the rows (``scripts/gen_readme_tables.py``).
"""

from __future__ import annotations

from hetero_shim import versions
from hetero_shim.errors import UnsupportedVllmVersion
from hetero_shim.patches.per_step import (
    cpu_gemm_on_gpu,
    expert_choice,
    expert_parallel,
    pipeline_buffers,
    pipeline_transfer,
    sampling_sync,
)
from hetero_shim.patches.startup import (
    communicators,
    cpu_rank_kernels,
    cpu_worker_env,
    device_option,
    dist_backend,
    kv_cache_agreement,
    pipeline_batches,
    queue_waits,
    rank_process,
    start_method,
    worker_death,
    worker_selection,
)
from hetero_shim.registry import Patch

#: The concern modules, in the order their rows are installed (where two wrap one target, the earlier
#: is the inner wrapper: expert_choice before expert_parallel, whose CPU-routing wrapper maps the ids
#: that expert_choice made rank 0's).
CONCERNS = (
    kv_cache_agreement,
    device_option,
    worker_selection,
    start_method,
    dist_backend,
    cpu_worker_env,
    rank_process,
    worker_death,
    pipeline_batches,
    queue_waits,
    cpu_rank_kernels,
    communicators,
    sampling_sync,
    pipeline_transfer,
    pipeline_buffers,
    expert_choice,
    expert_parallel,
    cpu_gemm_on_gpu,
)
SUPPORTED = versions.SUPPORTED


def table(release: str) -> tuple[Patch, ...]:
    """Every row of every concern for ``release``; an unsupported release has none."""
    if release not in SUPPORTED:
        raise UnsupportedVllmVersion(f"no patch table for vLLM {release}; tables exist for {', '.join(SUPPORTED)}")
    return tuple(row for concern in CONCERNS for row in concern.rows(release))
