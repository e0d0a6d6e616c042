"""What the node offers: the CPUs this process may use, their NUMA nodes and physical cores.

Read from Linux sysfs and the process affinity mask, the same sources vLLM uses, so the
plan is made the same way in every release. Stdlib only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hetero_shim.planning.plan import Cpu

SYS_CPU = Path("/sys/devices/system/cpu")


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def numa_node(cpu_id: int) -> int:
    """The NUMA node of a logical CPU (0 when sysfs does not say)."""
    try:
        for entry in (SYS_CPU / f"cpu{cpu_id}").iterdir():
            if entry.name.startswith("node") and entry.name[4:].isdigit():
                return int(entry.name[4:])
    except OSError:
        pass
    return 0


def allowed_cpus() -> list[Cpu]:
    """Every logical CPU in this process's affinity mask."""
    cpus = []
    for cpu_id in sorted(os.sched_getaffinity(0)):
        topo = SYS_CPU / f"cpu{cpu_id}" / "topology"
        package = _read_int(topo / "physical_package_id", 0)
        core = _read_int(topo / "core_id", cpu_id)
        cpus.append(Cpu(node=numa_node(cpu_id), id=cpu_id, core=package * 100_000 + core))
    return cpus


def one_per_core(cpus: list[Cpu]) -> list[Cpu]:
    """Keep one logical CPU per physical core (the highest id, as vLLM does on x86 SMT-2)."""
    best: dict[tuple[int, int], Cpu] = {}
    for cpu in cpus:
        key = (cpu.node, cpu.core)
        if key not in best or cpu.id > best[key].id:
            best[key] = cpu
    return sorted(best.values())


def has_amx() -> bool:
    """Whether the CPU has AMX tiles (what vLLM's packed CPU GEMM needs), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


# -- memory -------------------------------------------------------------------------------------
PROC_MEMINFO = Path("/proc/meminfo")
SYS_NODE = Path("/sys/devices/system/node")
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
#: NUMA meminfo is trusted when the nodes together report at least this share of /proc/meminfo's
#: MemTotal. On VMs and some containers they report far less (8.9 of 125 GiB was seen on a GPU
#: VM), and a budget sized from them fails vLLM's own checks.
NODE_TRUST_SHARE = 0.9


@dataclass(frozen=True)
class Memory:
    """Bytes: all of it, and what can be allocated now without swapping."""

    total: int
    available: int


@dataclass(frozen=True)
class HostMemory:
    host: Memory  # /proc/meminfo, clamped to the cgroup limit
    nodes: dict[int, Memory]  # NUMA meminfo per node, as the kernel reports it
    meminfo_total: int  # /proc/meminfo MemTotal, unclamped (what the nodes should add up to)
    cgroup_limit: int | None

    @property
    def nodes_trusted(self) -> bool:
        return bool(self.nodes) and sum(n.total for n in self.nodes.values()) >= NODE_TRUST_SHARE * self.meminfo_total

    def for_node(self, node_id: int) -> Memory:
        """What a process on ``node_id`` can use: the node's figures where they are trusted, else the
        host's shared evenly by the nodes; never more than the host (cgroup) allows."""
        if self.nodes_trusted and node_id in self.nodes:
            n = self.nodes[node_id]
            return Memory(min(n.total, self.host.total), min(n.available, self.host.available))
        share = max(1, len(self.nodes))
        return Memory(self.host.total // share, self.host.available // share)

    def describe(self) -> str:
        gib = 1 << 30
        text = f"{self.host.available / gib:.1f} of {self.host.total / gib:.1f} GiB available"
        if self.cgroup_limit is not None:
            text += f" (cgroup limit {self.cgroup_limit / gib:.1f} GiB)"
        if self.nodes and not self.nodes_trusted:
            reported = sum(n.total for n in self.nodes.values()) / gib
            text += (f"; NUMA meminfo reports {reported:.1f} of {self.meminfo_total / gib:.1f} GiB and is not used")
        return text


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo or a node's meminfo ("Node 0 MemTotal: 123 kB") -> {field: bytes}."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        fields[key.split()[-1] if key else key] = value * 1024 if parts[1:2] == ["kB"] else value
    return fields


def _node_available(fields: dict[str, int]) -> int:
    """vLLM's formula for a node (it has no MemAvailable): free + file pages + reclaimable slab."""
    return sum(fields.get(k, 0) for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))


def _cgroup() -> tuple[int | None, int | None]:
    """(limit, usage) in bytes, or (None, None) without a limit (v2 'max', v1's huge sentinel)."""
    for limit_file, usage_file in ((CGROUP_V2 / "memory.max", CGROUP_V2 / "memory.current"),
                                   (CGROUP_V1 / "memory.limit_in_bytes", CGROUP_V1 / "memory.usage_in_bytes")):
        try:
            raw = limit_file.read_text().strip()
        except OSError:
            continue
        if not raw.isdigit() or int(raw) >= 1 << 62:
            return None, None
        return int(raw), _read_int(usage_file, 0)
    return None, None


def host_memory() -> HostMemory:
    """What this process and its children can really use: MemAvailable, the cgroup, the NUMA nodes."""
    try:
        info = parse_meminfo(PROC_MEMINFO.read_text())
    except OSError:
        info = {}
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", 0))
    limit, usage = _cgroup()
    host = Memory(total, available)
    if limit is not None and limit < total:
        host = Memory(limit, max(0, min(available, limit - (usage or 0))))
    nodes: dict[int, Memory] = {}
    try:
        entries = sorted(SYS_NODE.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        if not (entry.name.startswith("node") and entry.name[4:].isdigit()):
            continue
        try:
            fields = parse_meminfo((entry / "meminfo").read_text())
        except OSError:
            continue
        nodes[int(entry.name[4:])] = Memory(fields.get("MemTotal", 0), _node_available(fields))
    return HostMemory(host, nodes, total, limit)
