"""A counter in shared memory that one process rings and another sleeps on (Linux futex).

Why: a GPU rank waiting for a CPU stage's activations polled (``sched_yield``, then 50 us naps).
Where the CPU rank's OpenMP threads use every core, a poller wakes thousands of times a second on
one of them and every parallel region waits for the thread it displaced. A futex sleeper costs
nothing until the counter moves.

The counter is an int64 word of a ``MAP_SHARED`` mapping that both processes map (the futex
compares its low 32 bits, little-endian). Only one process rings it, so a plain store suffices;
x86-64 stores are ordered, so what the ringer wrote before ringing is visible once the sleeper sees
the new count. The wait is the classic pattern: read the count, check the condition, sleep only
while the count is still the one read. Where futex is not available (not Linux, an unknown
architecture, a refused call) :meth:`Doorbell.wait` sleeps 50 us instead, as the poll did.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import time

#: futex(2)'s syscall number on the architectures the shim runs on
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE_FLAG): the word is in another process too
_WAKE_ALL = 0x7FFFFFFF
NAP_S = 50e-6  # the sleep of a wait without futex (and of gemm_channel's waits without a bell)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = None


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.syscall


def _low32(value: int) -> int:
    """The low 32 bits of a counter as the signed int the futex word holds (every argument goes
    to the variadic ``syscall`` as a full C long)."""
    return ctypes.c_int32(value & 0xFFFFFFFF).value


class Doorbell:
    """The int64 word at ``offset`` of ``buffer`` (a writable ``mmap``) as a counter to ring and sleep on."""

    def __init__(self, buffer, offset: int) -> None:
        self._word = ctypes.c_int64.from_buffer(buffer, offset)
        self._address = ctypes.c_void_p(ctypes.addressof(self._word))
        self.futex = _SYS_FUTEX is not None and os.name == "posix"

    @property
    def count(self) -> int:
        return self._word.value

    def ring(self) -> None:
        """Count one more and wake every sleeper (the ringer is the only writer)."""
        self._word.value += 1
        if self.futex:
            _syscall()(ctypes.c_long(_SYS_FUTEX), self._address, ctypes.c_long(_FUTEX_WAKE), ctypes.c_long(_WAKE_ALL),
                       None, None, ctypes.c_long(0))

    def wait(self, seen: int, timeout_s: float) -> None:
        """Sleep until the count differs from ``seen`` (the value read before checking the
        condition), at most ``timeout_s``; returns at once if it already differs. Spurious
        returns are possible: the caller checks its condition again."""
        if not self.futex:
            time.sleep(NAP_S)
            return
        whole = int(timeout_s)
        limit = _Timespec(whole, int((timeout_s - whole) * 1e9))
        if _syscall()(ctypes.c_long(_SYS_FUTEX), self._address, ctypes.c_long(_FUTEX_WAIT), ctypes.c_long(_low32(seen)),
                       ctypes.byref(limit), None, ctypes.c_long(0)) == -1:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):  # the count moved, timed out, a signal
                self.futex = False  # refused (seccomp, an old kernel): nap from now on
                time.sleep(NAP_S)
