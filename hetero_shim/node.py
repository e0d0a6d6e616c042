"""What the node offers: the CPUs this process may use, their NUMA nodes and physical cores.

Read from Linux sysfs and the process affinity mask, the same sources vLLM uses, so the
plan is made the same way in every release. Stdlib only.
"""

from __future__ import annotations

import os
from pathlib import Path

from hetero_shim.plan import Cpu

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
