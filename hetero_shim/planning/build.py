"""Building the rank plan of this node from what it offers and the user's settings.

The parent (where ``LLM(...)`` or ``vllm serve`` builds its engine config) decides the
rank plan once and publishes it (``run_state``); the engine core and the workers it
spawns inherit it, so every process agrees on which rank is a GPU or a CPU rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

from hetero_shim import run_state, settings
from hetero_shim.planning import node
from hetero_shim.planning.kv_budget import KvBudgets
from hetero_shim.planning.layer_split import LayerSplit, stage_kinds
from hetero_shim.planning.plan import (
    RankPlan,
    count_gpu_ranks,
    parse_bind_list,
    partition_cpus,
    plan_to_json,
    share_reserved,
)


def gpu_ranks_for(world_size: int, gpus_on_node: int) -> int:
    return count_gpu_ranks(world_size, gpus_on_node, settings.gpu_ranks_override())


def cores_to_reserve(gpu_ranks: int) -> int:
    """Cores kept off the CPU ranks: one for the engine core, and with GPU ranks one for the
    front end (the ``LLM`` or API-server process) and one per GPU rank. Measured on the H100
    (3B, PP=2): engine core 107 %, GPU rank 99 % (both busy-wait between steps) and the ``LLM``
    process 58 % of a core while the CPU rank worked (2026-11-24, e1196bc)."""
    override = settings.reserve_cores()
    if override is not None:
        return override
    return 2 + gpu_ranks if gpu_ranks else 1


def batches_in_flight(plan: RankPlan, wanted: int | None) -> tuple[int, str]:
    """How many micro-batches a pipeline keeps in flight, and why (0: vLLM's own, ``pp_size``).

    ``wanted``: ``HETERO_SHIM_PIPELINE_BATCHES`` (None: auto). vLLM keeps one micro-batch per stage
    in flight, which pays where the stages take equally long. A CPU stage streams its weights once
    per micro-batch and takes far longer than a GPU stage, so beside GPU stages auto keeps one
    micro-batch per CPU stage: a batch is then never split into micro-batches that each cost the
    CPU stage a full weight stream, and each CPU stage still has its own micro-batch."""
    if plan.pp_size < 2:
        return 0, ""
    if wanted is not None:
        return min(wanted, plan.pp_size), "HETERO_SHIM_PIPELINE_BATCHES"
    kinds = stage_kinds(plan.pp_size, plan.world_size // plan.pp_size, plan.gpu_ranks, plan.cpu_first)
    cpu = kinds.count("cpu")
    if 0 < cpu < plan.pp_size:
        return cpu, "automatic: one per CPU stage, beside GPU stages"
    return 0, ""


def build_plan(world_size: int, gpus_on_node: int, split: LayerSplit | None = None,
               kv_for: Callable[[RankPlan], KvBudgets] | None = None, cpu_first: bool = False,
               cpu_compile: Callable[[RankPlan], str] | None = None,
               cpu_gemm: Callable[[RankPlan], str] | None = None) -> RankPlan:
    """Make the rank plan for this node and publish it to child processes (``split``: pipeline mode;
    ``kv_for``: the CPU ranks' KV budgets for the plan's cores; ``cpu_compile``: why its CPU ranks
    compile their model, "" if they do not; ``cpu_gemm``: where their linear layers' large steps
    go, "" if they stay on the CPU)."""
    gpu_ranks = gpu_ranks_for(world_size, gpus_on_node)
    cpu_ranks = world_size - gpu_ranks
    allowed = node.allowed_cpus()
    bind = os.environ.get(settings.OMP_BIND, "auto")
    lists = parse_bind_list(bind, cpu_ranks, [c.id for c in allowed]) if cpu_ranks else []
    notes: list[str] = []
    reserved: list[int] = []
    if lists is None and bind.strip() == "nobind":
        lists = []
    shared: list[int] = []
    if lists is None:  # automatic: own cores per CPU rank, cores kept for the other processes
        cores = node.one_per_core(allowed)
        lists, reserved, notes = partition_cpus(cores, cpu_ranks, reserve=cores_to_reserve(gpu_ranks))
        if split is not None and 0 < gpu_ranks < world_size and reserved and settings.share_cores():
            lists, shared = share_reserved(lists, reserved, cores)
    pipeline = {} if split is None else dict(
        pp_size=len(split.partition), layers=split.partition, split_source=split.source)
    plan = RankPlan(world_size, gpu_ranks, tuple(tuple(x) for x in lists), tuple(reserved), tuple(notes), **pipeline,
                    cpu_first=cpu_first and 0 < gpu_ranks < world_size, shared_cores=tuple(shared))
    if cpu_gemm is not None and cpu_ranks:  # before the KV budgets: a route to a GPU holds the weights twice
        plan = replace(plan, cpu_gemm=cpu_gemm(plan))
    if kv_for is not None and cpu_ranks:
        kv = kv_for(plan)
        plan = replace(plan, kv_budgets=kv.per_rank, kv_source=kv.source, notes=plan.notes + kv.notes)
    if cpu_compile is not None and cpu_ranks:
        plan = replace(plan, cpu_compile=cpu_compile(plan))
    batches, why = batches_in_flight(plan, settings.pipeline_batches())
    if batches:
        plan = replace(plan, batches=batches, batches_source=why)
    run_state.publish_plan(plan_to_json(plan))
    return plan
