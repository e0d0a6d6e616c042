"""Pure logic of the shared-memory collectives: settings, segment naming/sweeping, chunk bounds."""

import os
import subprocess
import sys

import pytest

from hetero_shim import settings
from hetero_shim.errors import HeteroConfigError

shm = pytest.importorskip("hetero_shim.collectives.shm")
shm_segment = pytest.importorskip("hetero_shim.collectives.shm_segment")
factory = pytest.importorskip("hetero_shim.collectives.factory")


def test_collectives_setting(monkeypatch):
    monkeypatch.delenv(settings.COLLECTIVES, raising=False)
    assert settings.collectives_mode() == "auto"
    for value in ("shm", "GLOO", " auto "):
        monkeypatch.setenv(settings.COLLECTIVES, value)
        assert settings.collectives_mode() == value.strip().lower()
    monkeypatch.setenv(settings.COLLECTIVES, "nccl")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_COLLECTIVES='nccl' is not supported; use one of auto, shm, gloo"):
        settings.collectives_mode()


def test_shm_numbers(monkeypatch):
    monkeypatch.delenv(settings.SHM_TIMEOUT, raising=False)
    monkeypatch.delenv(settings.SHM_SLOT_MB, raising=False)
    assert settings.shm_timeout_seconds() == 300.0
    assert settings.shm_slot_bytes() is None  # unset: collectives.shm_segment.default_slot decides per group
    monkeypatch.setenv(settings.SHM_SLOT_MB, "4")
    assert settings.shm_slot_bytes() == 4 << 20
    monkeypatch.setenv(settings.SHM_SLOT_MB, "0.001")
    assert settings.shm_slot_bytes() == 4096
    monkeypatch.setenv(settings.SHM_TIMEOUT, "-1")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_SHM_TIMEOUT='-1' must be a positive number"):
        settings.shm_timeout_seconds()


def test_default_slot_by_group_size_and_free_shared_memory():
    mib = 1 << 20
    assert shm_segment.default_slot(2, None) == 16 * mib  # measured fastest for 1 GPU + 1 CPU rank (H100, a7ee9fd)
    assert shm_segment.default_slot(4, None) == shm_segment.default_slot(3, None) == 8 * mib
    assert shm_segment.default_slot(2, 100 << 30) == 16 * mib  # plenty free: no change
    # docker's default 64 MiB /dev/shm: halved until the segment takes at most half of it
    assert shm_segment.default_slot(2, 64 * mib) == 4 * mib and shm_segment.segment_bytes(2, 4 * mib)[1] <= 32 * mib
    assert shm_segment.default_slot(4, 64 * mib) == 2 * mib
    # never below the minimum (creating it then fails cleanly)
    assert shm_segment.default_slot(2, 0) == shm_segment.SLOT_MIN


def test_smaller_default_slot_is_warned_by_group_rank_0_only(monkeypatch, caplog):
    monkeypatch.delenv(settings.SHM_SLOT_MB, raising=False)
    monkeypatch.setattr(shm_segment, "_shm_free_bytes", lambda: 64 << 20)
    shm_segment.log.addHandler(caplog.handler)  # directly: vLLM's logging set-up may stop propagation to the root
    try:
        assert shm_segment.configured_slot(2, 1, "tp:0") == 4 << 20
        assert not caplog.records  # only the rank whose choice is taken says it
        assert shm_segment.configured_slot(2, 0, "tp:0") == 4 << 20
    finally:
        shm_segment.log.removeHandler(caplog.handler)
    assert "has 64 MiB free, so shared-memory collectives use 4 MiB slots instead of 16" in caplog.text
    assert "--shm-size" in caplog.text and "HETERO_SHIM_SHM_SLOT_MB" in caplog.text
    monkeypatch.setenv(settings.SHM_SLOT_MB, "2")  # the setting wins over the default
    assert shm_segment.configured_slot(2, 0) == 2 << 20


def test_stream_ops_setting(monkeypatch):
    monkeypatch.delenv(settings.SHM_STREAM_OPS, raising=False)
    assert settings.shm_stream_ops() is True
    monkeypatch.setenv(settings.SHM_STREAM_OPS, "0")
    assert settings.shm_stream_ops() is False
    monkeypatch.setenv(settings.SHM_STREAM_OPS, "sometimes")
    with pytest.raises(HeteroConfigError, match="HETERO_SHIM_SHM_STREAM_OPS='sometimes' is not understood"):
        settings.shm_stream_ops()
    monkeypatch.delenv(settings.SHM_FUSED_KERNEL, raising=False)
    assert settings.shm_fused_kernel() is True
    monkeypatch.setenv(settings.SHM_FUSED_KERNEL, "0")
    assert settings.shm_fused_kernel() is False


def test_stream_ops_load_without_a_cuda_driver_says_why_not():
    """On a host without libcuda (CI) loading gives (None, reason), never an exception; with one, ops or a reason."""
    from hetero_shim.collectives import stream_ops as cuda_stream_ops

    ops, why = cuda_stream_ops.load(0)
    assert (ops is None) != (why is None)
    if ops is None:
        assert why and ("OSError" in why or "Error" in why or "does not support" in why)


def test_stale_segment_of_a_dead_creator_is_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{shm_segment.PREFIX}{os.getuid()}_{dead.pid}_test"
    live = f"{shm_segment.PREFIX}{os.getuid()}_{os.getpid()}_test"
    for name in (stale, live):
        open(os.path.join(shm_segment.SHM_DIR, name), "w").close()
    try:
        removed = shm_segment.sweep_stale_segments()
        assert stale in removed and not os.path.exists(os.path.join(shm_segment.SHM_DIR, stale))
        assert os.path.exists(os.path.join(shm_segment.SHM_DIR, live))  # its creator (this process) is alive
    finally:
        for name in (stale, live):
            shm_segment._unlink(name)


def test_chunks_cover_the_tensor_once():
    for n in (1, 15, 16, 17, 1000, 4099):
        for parts in (1, 2, 3, 4):
            bounds = [shm._chunk(n, i, parts, 4) for i in range(parts)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert all(lo % 16 == 0 for lo, _ in bounds if lo < n)  # 64-byte boundaries


def test_segment_layout_fits_the_flags():
    header, total = shm_segment.segment_bytes(4, 4096)
    assert header >= 4 * shm_segment.FLAG_STRIDE and header % 4096 == 0
    assert total == header + 2 * 5 * 4096


def test_stream_ordered_bookkeeping_waits_for_and_releases_only_the_peer(monkeypatch):
    """The host-side part of hetero_shim.collectives.gpu_stream (no GPU needed): settling waits for the
    peer's arrival at the queued operation and checks signatures; releasing after an error lifts
    only a peer flag still below the awaited value, and close() releases what is queued."""
    import mmap

    import torch

    from hetero_shim.collectives.gpu_stream import RELEASED, StreamOrderedShm

    _, size = shm_segment.segment_bytes(2, 4096)
    mm = mmap.mmap(-1, size)
    comm = StreamOrderedShm(mm, rank=0, world=2, slot=4096, reducers=[1], peers={1: (None, None)},
                            device=torch.device("cpu"), timeout_s=5.0)
    assert not comm.stream_ordered  # no CUDA here: the base class's host waiting
    peer_arrive = comm._flag_index(1, shm.ARRIVE)
    sig = comm._signature(1, torch.float32, 64)
    for rank in (0, 1):
        comm._flags[comm._flag_index(rank, shm.SIG + 1)] = sig
    waited = []
    monkeypatch.setattr(comm, "_wait", lambda which, seq, ranks, what: waited.append((which, seq, ranks)))
    comm._queued = (3, sig, 0)
    comm._settle_conditions()
    assert waited == [(shm.ARRIVE, 3, [1])] and comm._queued is None

    comm._flags[peer_arrive] = 2
    comm._queued = (3, sig, 0)
    comm._release_stream()
    assert comm._flags[peer_arrive] == RELEASED and comm._queued is None
    assert comm._flags[comm._flag_index(0, shm.RELEASE)] == RELEASED  # the fused kernel's own release flag

    comm._flags[peer_arrive] = 5  # already past the awaited value: left alone
    comm._queued = (4, sig, 0)
    comm._release_stream()
    assert comm._flags[peer_arrive] == 5 and comm._queued is None

    comm._flags[peer_arrive] = 5
    comm._queued = (7, sig, 0)
    released = []
    monkeypatch.setattr(comm, "_release_stream", lambda: released.append(comm._queued))
    comm.close()
    assert released == [(7, sig, 0)] and comm._mm is None


def test_stream_ordered_bookkeeping_in_a_larger_group_touches_no_peer_flag(monkeypatch):
    """In a group of 4 (the fused kernel's case) settling waits for every peer, and releasing
    after an error sets only this rank's own release flag: other CPU ranks read the peers'
    arrive flags, so overwriting one would let them sum data that never arrived."""
    import mmap

    import torch

    from hetero_shim.collectives.gpu_stream import RELEASED, StreamOrderedShm

    _, size = shm_segment.segment_bytes(4, 1 << 20)
    comm = StreamOrderedShm(mmap.mmap(-1, size), rank=1, world=4, slot=1 << 20, reducers=[0, 2, 3],
                            peers={q: (None, None) for q in (0, 2, 3)}, device=torch.device("cpu"), timeout_s=5.0)
    assert comm._fused_max == shm.CHUNKED_MIN_BYTES - 1  # larger tensors take the chunked sums
    waited = []
    monkeypatch.setattr(comm, "_wait", lambda which, seq, ranks, what: waited.append((which, seq, ranks)))
    monkeypatch.setattr(comm, "_check_signatures", lambda seq, sig, what: None)
    comm._queued = (3, 0, 0)
    comm._settle_conditions()
    assert waited == [(shm.ARRIVE, 3, [0, 2, 3])]
    before = [comm._flags[comm._flag_index(q, shm.ARRIVE)] for q in range(4)]
    comm._queued = (4, 0, 0)
    comm._release_stream()
    assert [comm._flags[comm._flag_index(q, shm.ARRIVE)] for q in range(4)] == before
    assert comm._flags[comm._flag_index(1, shm.RELEASE)] == RELEASED and comm._queued is None
    comm.close()


@pytest.mark.parametrize("other_device, stream_ordered", [("cpu", True), ("cuda", False)])
def test_stream_ordered_form_only_with_one_gpu_rank_per_group(monkeypatch, other_device, stream_ordered):
    """for_group gives a CUDA rank the stream-ordered class only when it is the group's one CUDA
    rank; with two GPU ranks in the group (never run on GPUs) it keeps host waits. The gloo
    exchanges are faked: the peer reports the given device; no GPU needed."""
    import torch

    from hetero_shim.collectives.gpu_stream import StreamOrderedShm

    def all_gather_object(out, obj, group=None):
        if not isinstance(obj, dict):  # the second exchange: set-up errors (none here)
            out[0], out[1] = obj, None
            return
        out[0], out[1] = obj, dict(obj, cuda=other_device == "cuda", reducer=other_device == "cpu")

    monkeypatch.setattr(shm_segment.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(shm_segment.dist, "broadcast_object_list", lambda objs, src=0, group=None: None)
    monkeypatch.setattr(shm.ShmCollectives, "_register_cuda", lambda self: None)  # no CUDA here
    comm = factory.for_group(None, [0, 1], 0, 2, torch.device("cuda"), mode="shm", stream_ops=True)
    try:
        assert isinstance(comm, StreamOrderedShm) is stream_ordered
    finally:
        comm.close()
