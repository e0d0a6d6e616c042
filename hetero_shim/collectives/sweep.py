"""Shared-memory segments that a heterogeneous run's dead processes left in /dev/shm.

What stays behind when a rank is killed (SIGKILL gives no process a chance to unlink):
- the shim's own collectives segment (``hetero_shim_<uid>_<creator pid>_<random>``) if its creator
  died before every rank had opened it (afterwards it is already unlinked);
- vLLM's own: the message queues between the engine core and the workers
  (``multiprocessing.shared_memory``, ``psm_<random>``) and the CPU backend's all-reduce segments
  (``<vllm_dist_...>-<group>-cpushm``).

:func:`sweep` removes a segment only when no live process has it mapped (``/proc/*/maps``), and of
vLLM's only those of this user that are either older than a minute (a segment is mapped by its
creator from the moment it exists, so an unmapped one that old belongs to nobody) or were created
since this process planned its run. It runs when a heterogeneous run is planned (what earlier runs
left) and when the process that planned it (the ``LLM`` or API-server process) exits.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SHM_DIR = Path("/dev/shm")
OURS = re.compile(r"^hetero_shim_\d+_(\d+)_")
VLLM = re.compile(r"^psm_[0-9a-f]+$|-cpushm$|cpushm_")


def _mapped() -> set[str]:
    """Names of /dev/shm files some live process maps (deleted files show as '(deleted)')."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            at = line.find(str(SHM_DIR) + "/")
            if at >= 0:
                names.add(line[at + len(str(SHM_DIR)) + 1:].split(" ")[0])
    return names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphans(created_after: float | None = None, min_age: float = 60.0) -> list[Path]:
    """Segments left by dead processes: the shim's whose creator is gone; vLLM's of this user created
    after ``created_after`` (a time.time() value) or more than ``min_age`` seconds ago; neither kind
    while a live process maps it."""
    import time

    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return []
    now = time.time()
    mapped = None
    found = []
    for path in entries:
        ours = OURS.match(path.name)
        if ours:
            if _alive(int(ours.group(1))):
                continue
        elif VLLM.search(path.name):
            try:
                info = path.stat()
            except OSError:
                continue
            recent = created_after is not None and info.st_ctime >= created_after
            if info.st_uid != os.getuid() or not (recent or info.st_ctime < now - min_age):
                continue
        else:
            continue
        if mapped is None:
            mapped = _mapped()
        if path.name not in mapped:
            found.append(path)
    return found


def sweep(created_after: float | None = None, min_age: float = 60.0) -> list[str]:
    """Unlink :func:`orphans`; return their names."""
    removed = []
    for path in orphans(created_after, min_age):
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            pass
    return removed


_registered = False


def _report(removed: list[str]) -> None:
    if removed:
        from hetero_shim.logs import log

        log.info("hetero_shim: removed %d shared-memory segment(s) left by dead processes: %s", len(removed),
                 ", ".join(removed))


def at_plan() -> None:
    """A heterogeneous run is planned in this process: remove what earlier runs left, and once per
    process sweep at exit what this process's runs leave."""
    global _registered
    import time

    _report(sweep())
    if _registered:
        return
    _registered = True
    import atexit

    since = time.time()
    atexit.register(lambda: _report(sweep(created_after=since)))
