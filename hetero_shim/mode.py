"""Heterogeneous mode as process state: switched on in the parent, read back in every child.

The parent (where ``LLM(...)`` or ``vllm serve`` builds its engine config) decides the
rank plan once and writes it to the environment; the engine core and the workers it
spawns inherit it, so every process agrees on which rank is a GPU or a CPU rank.
"""

from __future__ import annotations

import os

from hetero_shim import node, settings
from hetero_shim.layer_split import LayerSplit
from hetero_shim.plan import RankPlan, count_gpu_ranks, parse_bind_list, partition_cpus, plan_from_json, plan_to_json

PLAN = settings.PLAN
#: Set by the engine core for each worker process it starts: "gpu" or "cpu".
RANK_KIND = "HETERO_SHIM_RANK_KIND"


def enter() -> None:
    """Switch this process (and the processes it starts) into heterogeneous mode."""
    os.environ[settings.DEVICE] = settings.HETEROGENEOUS
    from hetero_shim import _api

    _api.heterogeneous_mode_entered()


def gpu_ranks_for(world_size: int, gpus_on_node: int) -> int:
    return count_gpu_ranks(world_size, gpus_on_node, settings.gpu_ranks_override())


def cores_to_reserve(gpu_ranks: int) -> int:
    """Cores kept off the CPU ranks: one for the engine core, and with GPU ranks one for the
    front end (the ``LLM`` or API-server process) and one per GPU rank. Measured on the H100
    (3B, PP=2): engine core 107 %, GPU rank 99 % (both busy-wait between steps) and the ``LLM``
    process 58 % of a core while the CPU rank worked (bench/results/2026-11-24-h100-run4/aff.txt)."""
    return 2 + gpu_ranks if gpu_ranks else 1


def build_plan(world_size: int, gpus_on_node: int, split: LayerSplit | None = None) -> RankPlan:
    """Make the rank plan for this node and publish it to child processes (``split``: pipeline mode)."""
    gpu_ranks = gpu_ranks_for(world_size, gpus_on_node)
    cpu_ranks = world_size - gpu_ranks
    allowed = node.allowed_cpus()
    bind = os.environ.get(settings.OMP_BIND, "auto")
    lists = parse_bind_list(bind, cpu_ranks, [c.id for c in allowed]) if cpu_ranks else []
    notes: list[str] = []
    reserved: list[int] = []
    if lists is None and bind.strip() == "nobind":
        lists = []
    elif lists is None:  # automatic: own cores per CPU rank, cores kept for the other processes
        lists, reserved, notes = partition_cpus(node.one_per_core(allowed), cpu_ranks, reserve=cores_to_reserve(gpu_ranks))
    pipeline = {} if split is None else dict(
        pp_size=len(split.partition), layers=split.partition, split_source=split.source)
    plan = RankPlan(world_size, gpu_ranks, tuple(tuple(x) for x in lists), tuple(reserved), tuple(notes), **pipeline)
    os.environ[PLAN] = plan_to_json(plan)
    return plan


def current_plan() -> RankPlan | None:
    raw = os.environ.get(PLAN)
    return plan_from_json(raw) if raw else None


def mixed() -> bool:
    """Heterogeneous mode with both GPU and CPU ranks (the cross-device machinery is needed)."""
    if not settings.heterogeneous():
        return False
    plan = current_plan()
    return plan is not None and 0 < plan.gpu_ranks < plan.world_size


def this_process_is_cpu_rank() -> bool:
    return settings.heterogeneous() and os.environ.get(RANK_KIND) == "cpu"
