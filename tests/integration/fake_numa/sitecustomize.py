"""Test helper: make the shim's node reader see a NUMA node much smaller than the host, as on a VM
whose /sys/devices/system/node/node0/meminfo reports 8.9 of 125 GiB (put this folder on PYTHONPATH
with FAKE_NUMA_GIB set and FAKE_NUMA_DIR naming a folder the test owns and removes; the shim's
bootstrap sitecustomize chains to this one in every child, and each writes the same file)."""

import os
from pathlib import Path

_gib = float(os.environ.get("FAKE_NUMA_GIB", "0") or 0)
if _gib:
    import hetero_shim.planning.node as _node

    _root = Path(os.environ["FAKE_NUMA_DIR"])
    (_root / "node0").mkdir(parents=True, exist_ok=True)
    _kib = int(_gib * (1 << 20))
    _tmp = _root / "node0" / f"meminfo.{os.getpid()}"  # renamed into place: no process reads it half written
    _tmp.write_text(
        f"Node 0 MemTotal: {_kib} kB\nNode 0 MemFree: {_kib // 2} kB\nNode 0 Active(file): 0 kB\n"
        "Node 0 Inactive(file): 0 kB\nNode 0 SReclaimable: 0 kB\n")
    os.replace(_tmp, _root / "node0" / "meminfo")
    _node.SYS_NODE = _root
