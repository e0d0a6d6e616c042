"""Expert parallelism on CPU ranks: a CPU rank computes only the experts it holds.

Targets vLLM's unquantized CPU MoE, which takes ``expert_map`` and ignores it:
- 0.26.0 .. 0.27.1: ``CPUFusedMOE.__call__`` and ``SGLFusedMOE.__call__``
  (``fused_moe/cpu_fused_moe.py``), which route with that module's ``select_experts``;
- 0.28.0 .. 0.29.0: ``CPUUnquantizedExperts.apply`` (``fused_moe/experts/cpu_moe.py``, monolithic),
  which routes with its own ``_select_experts``;
- 0.30.0 .. 0.33.0: ``CPUUnquantizedExperts.apply`` (modular), which is handed the routed ids.
With ``enable_expert_parallel`` a rank holds ``num_experts / ep_size`` experts, indexed locally,
while the router picks global expert ids; the CPU kernels index their local weights with the
global ids (out-of-bounds reads in the native kernel, wrong experts in the torch path). Here the
routed ids pass through ``expert_map`` (global id -> local id, -1 where another rank holds the
expert): ids of other ranks' experts get weight 0 and a valid local id, so the rank's output is
the sum over its own experts, which the MoE layer's all-reduce adds up across the group, as the
GPU ranks' kernels (which honour ``expert_map``) do.
Not for ``apply_router_weight_on_input`` models (Llama 4): their weight is applied to the input
before the experts run, so a zero weight cannot remove another rank's expert; those are refused
with expert parallelism (``model_support``).
Runs every step, so it is ``hetero_only``.
Remove when: vLLM's CPU MoE honours ``expert_map`` (not as of 0.33.0).
"""

from __future__ import annotations

import contextvars

from hetero_shim import run_state, versions
from hetero_shim.arguments import Params
from hetero_shim.registry import Fact, Patch

WHY = "vLLM's CPU MoE indexes a rank's local experts with global expert ids under expert parallelism"
REMOVE_WHEN = "vLLM's CPU MoE honours expert_map"
UPSTREAM = "the unquantized CPU MoE takes expert_map and never reads it"

CPU_FUSED_MOE = "vllm.model_executor.layers.fused_moe.cpu_fused_moe"
CPU_MOE = "vllm.model_executor.layers.fused_moe.experts.cpu_moe"
#: the calls' positions of expert_map (and of the routed ids where the call is handed them)
CALL_026 = Params(expert_map=9)  # (layer, x, use_grouped_topk, top_k, router_logits, renormalize, ...)
APPLY_028 = Params(expert_map=6)  # (hidden_states, w1, w2, router_logits, activation, global_num_experts, ...)
APPLY_030 = Params(topk_weights=4, topk_ids=5, expert_map=8)  # (output, hidden_states, w1, w2, ...)

#: the expert map of the MoE call in progress in this process (layouts that route inside the call)
_expert_map: contextvars.ContextVar = contextvars.ContextVar("hetero_shim_expert_map", default=None)


def _takes_and_ignores(module: str, symbol: str) -> Fact:
    """The fact that makes the patch necessary: ``symbol`` has an expert_map parameter and its body
    never mentions it again."""
    return Fact(module, symbol, r"\n\s+expert_map[^\n]*\n(?![\s\S]*expert_map)",
                f"{symbol} takes expert_map and never reads it")


def rows(release: str) -> tuple[Patch, ...]:
    key = versions.release_key(release)
    common = dict(concern="expert parallelism on CPU ranks", why=WHY, remove_when=REMOVE_WHEN, upstream=UPSTREAM,
                  hetero_only=True)
    if key < (0, 28, 0):
        return (
            Patch(module=CPU_FUSED_MOE, name="CPUFusedMOE.__call__", wrapper=remember_expert_map(CALL_026),
                  params=CALL_026, tripwires=(_takes_and_ignores(CPU_FUSED_MOE, "CPUFusedMOE.__call__"),), **common),
            Patch(module=CPU_FUSED_MOE, name="SGLFusedMOE.__call__", wrapper=remember_expert_map(CALL_026),
                  params=CALL_026, tripwires=(_takes_and_ignores(CPU_FUSED_MOE, "SGLFusedMOE.__call__"),), **common),
            Patch(module=CPU_FUSED_MOE, name="select_experts", wrapper=local_experts_of_routing,
                  tripwires=(_takes_and_ignores(CPU_FUSED_MOE, "CPUFusedMOE.__call__"),), **common),
        )
    if key < (0, 30, 0):
        return (
            Patch(module=CPU_MOE, name="CPUUnquantizedExperts.apply", wrapper=remember_expert_map(APPLY_028),
                  params=APPLY_028, tripwires=(_takes_and_ignores(CPU_MOE, "CPUUnquantizedExperts.apply"),), **common),
            Patch(module=CPU_MOE, name="CPUUnquantizedExperts._select_experts", wrapper=local_experts_of_routing,
                  tripwires=(_takes_and_ignores(CPU_MOE, "CPUUnquantizedExperts.apply"),), **common),
        )
    return (
        Patch(module=CPU_MOE, name="CPUUnquantizedExperts.apply", wrapper=local_experts_in_apply, params=APPLY_030,
              tripwires=(_takes_and_ignores(CPU_MOE, "CPUUnquantizedExperts.apply"),), **common),
    )


_announced = False


def to_local(topk_weights, topk_ids, expert_map):
    """Routed (weights, global ids) -> (weights, local ids) of this rank's experts: another rank's
    expert gets weight 0 and a local id that no other slot of the same token uses (vLLM's pure-PyTorch
    CPU MoE, 0.26-0.27.1, counts a token's experts with a scatter that assumes distinct ids; two
    slots on one id would lose a row and fail with a shape mismatch)."""
    global _announced
    mine = int((expert_map >= 0).sum())
    if not _announced:
        _announced = True
        from hetero_shim.logs import log

        log.info("hetero_shim: expert parallelism: this CPU rank computes %d of %d experts", mine, expert_map.numel())
    local = expert_map[topk_ids.long()]
    theirs = local < 0
    ids = local.clamp(min=0).long()
    if mine >= ids.shape[-1] and bool(theirs.any()):
        ids = _distinct_for_theirs(ids.reshape(-1, ids.shape[-1]), theirs.reshape(ids.shape), mine).view(ids.shape)
    return topk_weights.masked_fill(theirs, 0), ids.to(topk_ids.dtype)


def _distinct_for_theirs(ids, theirs, experts: int):
    """``ids`` [tokens, k] with the slots ``theirs`` given the lowest local ids their token leaves free."""
    import torch

    tokens, k = ids.shape
    used = torch.zeros(tokens, experts + 1, dtype=torch.bool)  # the last column takes the slots to fill
    used.scatter_(1, torch.where(theirs, experts, ids), True)
    used = used[:, :experts].contiguous()
    rows = torch.arange(tokens)
    for j in range(k):
        fill = theirs[:, j]
        if bool(fill.any()):
            free = (~used).to(torch.int8).argmax(dim=1)  # exists: experts >= k
            ids[:, j] = torch.where(fill, free, ids[:, j])
            used[rows[fill], free[fill]] = True
    return ids


def remember_expert_map(params: Params):
    """Wrapper of a CPU MoE call that routes inside: its expert_map is kept for the routing it calls."""

    def wrapper(wrapped, instance, args, kwargs):
        expert_map = params.get(args, kwargs, "expert_map", None)
        if expert_map is None or not run_state.heterogeneous():
            return wrapped(*args, **kwargs)
        token = _expert_map.set(expert_map)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _expert_map.reset(token)

    return wrapper


def local_experts_of_routing(wrapped, instance, args, kwargs):
    """The CPU MoE's routing, inside a call with an expert map: local ids and weights."""
    topk_weights, topk_ids = wrapped(*args, **kwargs)
    expert_map = _expert_map.get()
    if expert_map is None:
        return topk_weights, topk_ids
    return to_local(topk_weights, topk_ids, expert_map)


def local_experts_in_apply(wrapped, instance, args, kwargs):
    """The CPU experts' apply, handed global ids and an expert map: local ids and weights instead."""
    expert_map = APPLY_030.get(args, kwargs, "expert_map", None)
    if expert_map is None or not run_state.heterogeneous():
        return wrapped(*args, **kwargs)
    weights, ids = to_local(APPLY_030.get(args, kwargs, "topk_weights"), APPLY_030.get(args, kwargs, "topk_ids"),
                            expert_map)
    args, kwargs = APPLY_030.replace(args, kwargs, "topk_weights", weights)
    args, kwargs = APPLY_030.replace(args, kwargs, "topk_ids", ids)
    return wrapped(*args, **kwargs)
