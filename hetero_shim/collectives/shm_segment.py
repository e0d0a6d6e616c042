"""The shared-memory segment of one group's collectives (``hetero_shim.collectives.shm``): whether
this process can take part, the segment's name, size and mapping (and CUDA's error state after a
failed registration of it), the group's agreement to open it (``open_group``), and the sweep of
names that dead creators left.

Segment: one file per process group, ``/dev/shm/hetero_shim_<uid>_<creator pid>_<random>``,
created (and its pages reserved with ``posix_fallocate``: a full /dev/shm gives a clean error
here, not a SIGBUS later) by group rank 0, opened by the others (the name travels over the
group's gloo CPU group once) and **unlinked as soon as every rank has opened it**, so nothing is
left in /dev/shm however the processes end (the memory goes when the last rank unmaps or dies).
Only a creator killed during that set-up window can leave a name behind: the name carries the
creator's pid, and every later set-up sweeps names of this user whose creator is dead (creators
also unlink at exit). By hand: ``rm /dev/shm/hetero_shim_*`` when no run is active.

Size: ``segment_bytes`` (a header of per-rank flag groups, ``FLAG_STRIDE`` bytes apart, then two
buffers; the layout is in ``shm``'s docstring) with ``slot`` bytes per rank: HETERO_SHIM_SHM_SLOT_MB,
else ``default_slot`` (by group size, smaller where /dev/shm has little free space).
"""

from __future__ import annotations

import atexit
import mmap
import os
import platform
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hetero_shim import settings
from hetero_shim.errors import HeteroConfigError
from hetero_shim.logs import log

SHM_DIR = "/dev/shm"
PREFIX = "hetero_shim_"
FLAG_STRIDE = 128  # bytes between two ranks' flag groups
PAGE = 4096


def unsupported_reason() -> str | None:
    """Why this process cannot take part in shared-memory collectives, or None."""
    if sys.platform != "linux":
        return f"needs Linux /dev/shm (this is {sys.platform})"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"relies on x86-64 store ordering (TSO); this CPU is {platform.machine()}"
    if not os.path.isdir(SHM_DIR):
        return f"{SHM_DIR} does not exist"
    return None


def host_identity() -> str:
    """Hostname and kernel boot id: equal for the processes of one host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


def process_start_time(pid: int) -> str | None:
    """The process's start time from /proc (None if it does not exist or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def sweep_stale_segments() -> list[str]:
    """Unlink this user's hetero_shim segments whose creator process no longer exists."""
    removed = []
    mine = f"{PREFIX}{os.getuid()}_"
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(mine):
            continue
        try:
            pid = int(entry[len(mine):].split("_")[0])
        except ValueError:
            continue
        if process_start_time(pid) is None:
            _unlink(entry)
            removed.append(entry)
    return removed


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def segment_bytes(world: int, slot: int) -> tuple[int, int]:
    """(header bytes, total bytes) of a segment for ``world`` ranks and ``slot`` bytes per rank."""
    header = -(-(world * FLAG_STRIDE) // PAGE) * PAGE
    return header, header + 2 * (world + 1) * slot


SLOT_BY_GROUP = {2: 16 << 20}  # bytes per rank for a group of this many ranks; other sizes: SLOT_LARGER_GROUPS
SLOT_LARGER_GROUPS = 8 << 20
SLOT_MIN = 1 << 20


def default_slot(world: int, free_bytes: int | None) -> int:
    """The slot without HETERO_SHIM_SHM_SLOT_MB: by group size, halved (down to ``SLOT_MIN``) while the
    segment would take more than half of /dev/shm's free space (``free_bytes``; None: not known).

    Why these sizes: a tensor above the slot goes in slot-sized pieces, and every piece costs the
    waits of one operation. Measured on the H100 (2026-11-24; every slot size its own group in the
    same processes, fp32; docs/performance.md): 1 GPU + 1 CPU rank, 16 MiB all-reduce in 727-777 us
    with 16 MiB slots, 916-944 with 8, 1171-1214 with 4 (64 MiB: 2.9 / 3.5 / 4.5 ms); 1 GPU + 3 CPU
    ranks, 16 MiB: 8 and 16 MiB alike, 4 MiB 1.1-1.2x slower; 64 MiB: 8 MiB best, 16 MiB 1.1-1.2x
    slower. 2 MiB tensors: no difference."""
    slot = SLOT_BY_GROUP.get(world, SLOT_LARGER_GROUPS)
    while free_bytes is not None and slot > SLOT_MIN and 2 * segment_bytes(world, slot)[1] > free_bytes:
        slot //= 2
    return slot


def _shm_free_bytes() -> int | None:
    try:
        return shutil.disk_usage(SHM_DIR).free
    except OSError:
        return None


def configured_slot(world: int, rank: int, label: str = "") -> int:
    """The slot ``for_group`` uses when given none: HETERO_SHIM_SHM_SLOT_MB, else ``default_slot`` for this
    host's /dev/shm; group rank 0 (whose choice every rank takes) warns when /dev/shm made it smaller."""
    setting = settings.shm_slot_bytes()
    if setting is not None:
        return setting
    free = _shm_free_bytes()
    slot, wanted = default_slot(world, free), default_slot(world, None)
    if slot < wanted and rank == 0:
        log.warning("hetero_shim: %s: %s has %d MiB free, so shared-memory collectives use %d MiB slots instead of "
                    "%d (large all-reduces are slower); give it more (docker: --ipc=host or --shm-size) or set %s",
                    label or "group", SHM_DIR, free >> 20, slot >> 20, wanted >> 20, settings.SHM_SLOT_MB)
    return slot


def _map(name: str, size: int, create: bool) -> mmap.mmap:
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, size)  # reserve the pages now: ENOSPC here, not SIGBUS later
        elif os.fstat(fd).st_size != size:
            raise OSError(f"{path} has {os.fstat(fd).st_size} bytes, expected {size}")
        return mmap.mmap(fd, size)
    except BaseException:
        if create:
            _unlink(name)
        raise
    finally:
        os.close(fd)


def clear_cuda_error() -> None:
    """Reset CUDA's last-error state after a failed cudaHostRegister (else a later kernel check reports it)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()
    except (OSError, AttributeError):
        pass


@dataclass
class GroupSegment:
    """What every rank of a group agreed on: its mapped segment and the group's settings."""

    mm: mmap.mmap
    slot: int
    timeout_s: float
    reducers: list[int]
    peers: dict
    cuda_ranks: int


def open_group(cpu_group, ranks: list[int], rank: int, world: int, device: torch.device, *,
               mode: str | None = None, slot: int | None = None, timeout_s: float | None = None,
               reducer: bool | None = None, label: str = "") -> GroupSegment | None:
    """Collective set-up over ``cpu_group`` (gloo): this group's shared-memory segment, or None (use gloo).

    Every rank must call it. ``mode`` (default: HETERO_SHIM_COLLECTIVES) and ``slot``/``timeout_s``
    (default: their settings) are taken from group rank 0 so all ranks decide alike. ``reducer``:
    whether this rank sums chunks of large all-reduces (default: its device is the CPU).
    ``collectives.factory.for_group`` chooses the implementation on top of it.
    """

    mode = settings.collectives_mode() if mode is None else mode
    info = {"host": host_identity(), "why_not": unsupported_reason(), "pid": os.getpid(), "cuda": device.type == "cuda",
            "start": process_start_time(os.getpid()), "reducer": device.type == "cpu" if reducer is None else reducer,
            "mode": mode, "slot": configured_slot(world, rank, label) if slot is None else slot,
            "timeout": settings.shm_timeout_seconds() if timeout_s is None else timeout_s}
    infos: list = [None] * world
    dist.all_gather_object(infos, info, group=cpu_group)
    lead = infos[0]
    if lead["mode"] == "gloo" or world < 2:
        return None
    reasons = sorted({f"rank {r}: {i['why_not']}" for r, i in enumerate(infos) if i["why_not"]})
    hosts = {i["host"] for i in infos}
    if len(hosts) > 1:
        reasons.append(f"ranks are on {len(hosts)} hosts ({', '.join(sorted(hosts))})")
    if reasons:
        return _cannot(lead["mode"], "; ".join(reasons))
    header, size = segment_bytes(world, lead["slot"])
    handoff = [None, None]
    if rank == 0:
        sweep_stale_segments()
        name = f"{PREFIX}{os.getuid()}_{os.getpid()}_{secrets.token_hex(6)}"
        try:
            mm = _map(name, size, create=True)
            atexit.register(_unlink, name)
            handoff = [name, None]
        except OSError as e:
            handoff = [None, f"rank 0 could not create {SHM_DIR}/{name} ({size} bytes): {e}"]
    dist.broadcast_object_list(handoff, src=ranks[0], group=cpu_group)
    name, error = handoff
    if rank != 0 and name is not None:
        try:
            mm = _map(name, size, create=False)
        except OSError as e:
            error = f"rank {rank} could not open {SHM_DIR}/{name}: {e}"
    errors: list = [None] * world
    dist.all_gather_object(errors, error, group=cpu_group)
    if rank == 0 and name is not None:
        _unlink(name)  # every rank has it mapped (or failed): nothing stays in /dev/shm
    problems = sorted({e for e in errors if e})
    if problems:
        if name is not None and not error:
            mm.close()
        return _cannot(lead["mode"], "; ".join(problems))
    # a peer whose process this rank cannot see as it reported itself (another pid namespace) gets no liveness check
    peers = {r: (i["pid"], i["start"]) if i["start"] and process_start_time(i["pid"]) == i["start"] else (None, None)
             for r, i in enumerate(infos) if r != rank}
    reducers = [r for r, i in enumerate(infos) if i["reducer"]] or list(range(world))
    log.info("hetero_shim: %s collectives through shared memory (%d ranks, %d bytes per rank, segment "
             "%d bytes)", label or "group", world, lead["slot"], size)
    return GroupSegment(mm, lead["slot"], lead["timeout"], reducers, peers, sum(1 for i in infos if i["cuda"]))


def _cannot(mode: str, why: str) -> None:
    if mode == "shm":
        raise HeteroConfigError(f"{settings.COLLECTIVES}=shm, but shared-memory collectives cannot be "
                                f"used: {why}. Use auto (falls back to gloo) or gloo")
    log.info("hetero_shim: collectives over gloo (shared memory not usable: %s)", why)
    return None
