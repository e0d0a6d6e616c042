"""The rank plan: which tensor-parallel ranks run on GPUs, which on CPU cores, and which cores.

Pure logic, no vLLM and no torch: the patches feed it what vLLM measured about the node.
Ranks ``0 .. gpu_ranks-1`` are GPU ranks and the rest CPU ranks (vLLM numbers TP ranks first
inside a pipeline stage, so tensor parallelism keeps its rank 0 on a GPU). A pipeline whose CPU
stages come first (``cpu_first``: the GPU stages then hold the LM head and sample) has its GPU
ranks at the top instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hetero_shim.errors import HeteroConfigError


@dataclass(frozen=True, order=True)
class Cpu:
    """One logical CPU the process may run on."""

    node: int  # NUMA node
    id: int  # logical CPU id
    core: int = -1  # physical core id (-1: unknown)


@dataclass(frozen=True)
class RankPlan:
    world_size: int
    gpu_ranks: int
    cpu_lists: tuple[tuple[int, ...], ...] = ()  # cores of each CPU rank, in rank order
    reserved: tuple[int, ...] = ()  # cores left free (engine core, GPU ranks' processes)
    notes: tuple[str, ...] = field(default=(), compare=False)
    pp_size: int = 1  # pipeline mode: stage of rank r is r // (world_size // pp_size)
    layers: tuple[int, ...] = ()  # pipeline mode: layers per stage (VLLM_PP_LAYER_PARTITION)
    split_source: str = ""  # pipeline mode: where the layer split came from
    kv_budgets: tuple[int, ...] = ()  # KV cache bytes of each CPU rank, in CPU-rank order
    kv_source: str = ""  # where the CPU ranks' KV budgets came from
    cpu_first: bool = False  # pipeline mode: CPU stages first, GPU stages last (the GPU ranks are the top ranks)
    cpu_compile: str = ""  # CPU ranks beside GPU ranks: why they compile their model ("": they run eagerly)
    cpu_gemm: str = ""  # CPU ranks beside GPU ranks: where their linear layers' large steps go ("": here)
    batches: int = 0  # pipeline mode: micro-batches the engine core keeps in flight (0: vLLM's own, pp_size)
    batches_source: str = ""  # where that number came from
    shared_cores: tuple[int, ...] = ()  # reserved cores the CPU ranks' threads also run on (HETERO_SHIM_SHARE_CORES)

    @property
    def cpu_ranks(self) -> range:
        if self.cpu_first:
            return range(0, self.world_size - self.gpu_ranks)
        return range(self.gpu_ranks, self.world_size)

    def kind(self, rank: int) -> str:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} outside world size {self.world_size}")
        return "cpu" if rank in self.cpu_ranks else "gpu"

    def cpu_index(self, rank: int) -> int:
        """Position of a CPU rank among the CPU ranks (its cores in ``cpu_lists``, its KV budget)."""
        return rank - self.cpu_ranks.start

    def gpu_index(self, rank: int) -> int:
        """The CUDA device of a GPU rank (its position among the GPU ranks)."""
        return rank - (self.world_size - self.gpu_ranks if self.cpu_first else 0)

    def stage(self, rank: int) -> int:
        return rank // (self.world_size // self.pp_size)

    def describe(self) -> str:
        lines = [f"hetero_shim rank plan: {self.gpu_ranks} GPU rank(s) + {len(self.cpu_ranks)} CPU rank(s)"]
        if self.pp_size > 1:
            lines[0] += f", {self.pp_size} pipeline stages; layer split {','.join(map(str, self.layers))} ({self.split_source})"
        for rank in range(self.world_size):
            if self.kind(rank) == "gpu":
                line = f"  rank {rank}: GPU  cuda:{self.gpu_index(rank)}"
            else:
                cores = self.cpu_lists[self.cpu_index(rank)] if self.cpu_lists else ()
                line = f"  rank {rank}: CPU  cores {format_id_list(cores) or '(not bound)'}"
            if self.pp_size > 1 and self.layers:
                s = self.stage(rank)
                start = sum(self.layers[:s])
                line += f"  stage {s}: layers {start}-{start + self.layers[s] - 1} ({self.layers[s]})"
            if self.kind(rank) == "cpu" and self.kv_budgets:
                line += f"  KV cache {self.kv_budgets[self.cpu_index(rank)] / (1 << 30):.2f} GiB"
            lines.append(line)
        if self.reserved:
            shared = (f", shared with the CPU ranks' threads: {format_id_list(self.shared_cores)} (the processes "
                      "waiting for them sleep)") if self.shared_cores else ""
            lines.append(f"  reserved cores: {format_id_list(self.reserved)}{shared}")
        if self.kv_source:
            lines.append(f"  CPU ranks' KV cache: {self.kv_source}")
        if self.cpu_compile:
            lines.append(f"  CPU ranks compile their model: {self.cpu_compile}")
        if self.cpu_gemm:
            lines.append(f"  CPU ranks' linear layers: {self.cpu_gemm}")
        if self.batches:
            lines.append(f"  micro-batches in flight: {self.batches} ({self.batches_source})")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def count_gpu_ranks(world_size: int, gpus_on_node: int, override: int | None) -> int:
    """GPU ranks = the node's GPUs (or the override), at most the world size."""
    if world_size < 1:
        raise HeteroConfigError(f"tensor_parallel_size x pipeline_parallel_size must be at least 1, got {world_size}")
    if override is not None and override > gpus_on_node:
        raise HeteroConfigError(
            f"HETERO_SHIM_GPU_RANKS={override} asks for more GPU ranks than this node has GPUs ({gpus_on_node}); "
            f"set it to at most {gpus_on_node}, or unset it to use every GPU"
            + (" (0: every rank on the CPU)" if gpus_on_node else "")
        )
    wanted = gpus_on_node if override is None else override
    return min(wanted, world_size)


#: Linux builds support at most 8192 CPUs (CONFIG_NR_CPUS); ids at or above this are refused.
MAX_CPU_ID = 8192


def parse_id_list(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8] (the syntax of VLLM_CPU_OMP_THREADS_BIND's lists)."""
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise HeteroConfigError(f"{part!r} in CPU list {text!r} is not a CPU id or range like 0-3") from None
        if first < 0 or last < first:
            raise HeteroConfigError(f"{part!r} in CPU list {text!r} is not a valid range")
        if last >= MAX_CPU_ID:  # checked before the range is expanded: "0-999999999" is a typo, not a list
            raise HeteroConfigError(f"{part!r} in CPU list {text!r} names CPU ids beyond Linux's limit ({MAX_CPU_ID - 1})")
        ids.extend(range(first, last + 1))
    return ids


def format_id_list(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(ids):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_bind_list(text: str, cpu_ranks: int, allowed: Sequence[int]) -> list[list[int]] | None:
    """Validate a user bind string ('0-3|4-7') against the CPU ranks; None for 'auto'/'nobind'."""
    if text.strip() in ("auto", "nobind"):
        return None
    lists = [parse_id_list(part) for part in text.split("|")]
    if len(lists) != cpu_ranks:
        raise HeteroConfigError(
            f"VLLM_CPU_OMP_THREADS_BIND={text!r} names {len(lists)} CPU list(s) but the plan has "
            f"{cpu_ranks} CPU rank(s); give one list per CPU rank separated by '|', or 'auto'"
        )
    allowed_set = set(allowed)
    seen: dict[int, int] = {}
    for rank, ids in enumerate(lists):
        bad = sorted(set(ids) - allowed_set)
        if bad:
            raise HeteroConfigError(
                f"VLLM_CPU_OMP_THREADS_BIND={text!r}: CPU(s) {format_id_list(bad)} are not available to "
                f"this process (allowed: {format_id_list(allowed)})"
            )
        for i in ids:
            if i in seen and seen[i] != rank:
                raise HeteroConfigError(
                    f"VLLM_CPU_OMP_THREADS_BIND={text!r}: CPU {i} is given to two CPU ranks; "
                    "each core may serve one rank"
                )
            seen[i] = rank
    return lists


def partition_cpus(cpus: Sequence[Cpu], cpu_ranks: int, reserve: int) -> tuple[list[list[int]], list[int], list[str]]:
    """Give each CPU rank its own cores, sharing NUMA nodes round-robin when there are too few.

    ``cpus`` are the logical CPUs to hand out (one per physical core if the caller wants so);
    ``reserve`` cores are kept free for other processes when there are enough cores.
    Returns (cores of each CPU rank, reserved cores, notes for the plan).
    """
    notes: list[str] = []
    if cpu_ranks <= 0:
        return [], [], notes
    if len(cpus) < cpu_ranks:
        raise HeteroConfigError(
            f"{cpu_ranks} CPU rank(s) need at least {cpu_ranks} cores but this process may use "
            f"{len(cpus)} ({format_id_list([c.id for c in cpus])}); lower tensor_parallel_size or free more cores"
        )
    by_node: dict[int, list[Cpu]] = {}
    for cpu in sorted(cpus):
        by_node.setdefault(cpu.node, []).append(cpu)
    nodes = sorted(by_node)
    ranks_on: dict[int, list[int]] = {n: [] for n in nodes}
    for rank in range(cpu_ranks):
        ranks_on[nodes[rank % len(nodes)]].append(rank)
    if cpu_ranks > len(nodes):
        notes.append(
            f"{cpu_ranks} CPU ranks share {len(nodes)} NUMA node(s) round-robin; each rank gets its own cores"
        )
    for node in nodes:
        if len(by_node[node]) < len(ranks_on[node]):
            raise HeteroConfigError(
                f"NUMA node {node} has {len(by_node[node])} core(s) for {len(ranks_on[node])} CPU ranks; "
                "lower tensor_parallel_size or bind threads with VLLM_CPU_OMP_THREADS_BIND"
            )
    spare = {n: len(by_node[n]) - len(ranks_on[n]) for n in nodes}
    reserved: list[int] = []
    if reserve > sum(spare.values()):
        notes.append(f"too few cores to keep {reserve} free for other processes; keeping {sum(spare.values())}")
    for _ in range(min(reserve, sum(spare.values()))):
        # take the last core of the node with the most cores per rank left
        node = max(nodes, key=lambda n: (spare[n] > 0, len(by_node[n]) / max(1, len(ranks_on[n])), -n))
        reserved.append(by_node[node].pop().id)
        spare[node] -= 1
    lists: list[list[int]] = [[] for _ in range(cpu_ranks)]
    for node in nodes:
        ranks, pool = ranks_on[node], by_node[node]
        if not ranks:
            continue
        base, extra = divmod(len(pool), len(ranks))
        start = 0
        for i, rank in enumerate(ranks):
            size = base + (1 if i < extra else 0)
            lists[rank] = [c.id for c in pool[start : start + size]]
            start += size
    return lists, sorted(reserved), notes


def share_reserved(lists: list[list[int]], reserved: list[int], cpus: Sequence[Cpu]) -> tuple[list[list[int]], list[int]]:
    """The CPU ranks' cores with the reserved cores added (each to the rank with the fewest cores on
    its NUMA node; a core of a node without CPU ranks stays out), and the cores so shared."""
    node_of = {c.id: c.node for c in cpus}
    lists = [list(cores) for cores in lists]
    shared: list[int] = []
    for core in reserved:
        ranks = [i for i, cores in enumerate(lists) if any(node_of.get(c) == node_of.get(core) for c in cores)]
        if not ranks:
            continue
        lists[min(ranks, key=lambda i: (len(lists[i]), i))].append(core)
        shared.append(core)
    return [sorted(cores) for cores in lists], sorted(shared)


def plan_to_json(plan: RankPlan) -> str:
    import json

    return json.dumps(
        {"world_size": plan.world_size, "gpu_ranks": plan.gpu_ranks, "cpu_lists": plan.cpu_lists,
         "reserved": plan.reserved, "notes": plan.notes, "pp_size": plan.pp_size, "layers": plan.layers,
         "split_source": plan.split_source, "kv_budgets": plan.kv_budgets, "kv_source": plan.kv_source,
         "cpu_first": plan.cpu_first, "cpu_compile": plan.cpu_compile, "cpu_gemm": plan.cpu_gemm,
         "batches": plan.batches, "batches_source": plan.batches_source, "shared_cores": plan.shared_cores}
    )


def plan_from_json(text: str) -> RankPlan:
    import json

    data = json.loads(text)
    return RankPlan(
        world_size=data["world_size"],
        gpu_ranks=data["gpu_ranks"],
        cpu_lists=tuple(tuple(x) for x in data["cpu_lists"]),
        reserved=tuple(data["reserved"]),
        notes=tuple(data["notes"]),
        pp_size=data.get("pp_size", 1),
        layers=tuple(data.get("layers", ())),
        split_source=data.get("split_source", ""),
        kv_budgets=tuple(data.get("kv_budgets", ())),
        kv_source=data.get("kv_source", ""),
        cpu_compile=data.get("cpu_compile", ""),
        cpu_gemm=data.get("cpu_gemm", ""),
        cpu_first=data.get("cpu_first", False),
        batches=data.get("batches", 0),
        batches_source=data.get("batches_source", ""),
        shared_cores=tuple(data.get("shared_cores", ())),
    )

