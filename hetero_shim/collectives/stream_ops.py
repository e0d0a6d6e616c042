"""CUDA stream memory operations through the driver API (ctypes): a stream writes a 64-bit value
to memory, or waits until a 64-bit value in memory reaches a number.

Why: the GPU rank of a shared-memory collective (``hetero_shim.collectives.gpu_stream``) must publish
"my data is in the segment" only after its device-to-host copy has landed, and must copy the
peers' data in only after they have published theirs. Done from the host thread, that costs a
stream synchronize per collective (the host thread waits for every kernel queued before it) and
a host-side wait before the copy back is even queued. ``cuStreamWriteValue64`` and
``cuStreamWaitValue64`` put both steps on the stream itself, in stream order, so the host thread
only queues work. torch has no binding for them, hence ctypes on ``libcuda``.

Support is checked per device (``CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS``); callers
fall back to host-side waiting when ``load`` returns None. The memory must be device-accessible:
the collectives register their segment with ``cudaHostRegister`` (mapped) and pass the device
address from ``device_pointer``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from hetero_shim.errors import CudaDriverError

# CUdevice_attribute (cuda.h): the v2 operations (cuStream*Value64_v2; CUDA 11.7+; since 12.0 the
# plain names map to them) report at 122; 93 is the legacy v1 API, off unless the driver enables it.
_V2_ATTRIBUTE, _V1_ATTRIBUTE = 122, 93
_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int64)(*addr - value) >= 0
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: a memory fence before the write (earlier copies land first)
#: stored into an awaited word to let every pending wait pass (after an error, at close or on a release)
RELEASED = 1 << 62


class StreamOps:
    """Write and wait operations on a CUDA stream (handles as ints: ``torch.cuda.Stream.cuda_stream``)."""

    def __init__(self, lib: ctypes.CDLL, write, wait) -> None:
        self._write, self._wait = write, wait
        self._host_ptr = lib.cuMemHostGetDevicePointer_v2
        self._host_ptr.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        self._sync = lib.cuStreamSynchronize
        self._sync.argtypes = [ctypes.c_void_p]

    def device_pointer(self, host_ptr: int) -> int:
        """The device address of registered (mapped) host memory."""
        out = ctypes.c_uint64()
        _check(self._host_ptr(ctypes.byref(out), ctypes.c_void_p(host_ptr), 0), "cuMemHostGetDevicePointer")
        return out.value

    def synchronize(self, stream: int) -> None:
        """Wait on the host until everything queued on ``stream`` has run."""
        _check(self._sync(stream), "cuStreamSynchronize")

    def write(self, stream: int, address: int, value: int) -> None:
        """Queue on ``stream``: after everything queued before, store ``value`` at ``address``."""
        _check(self._write(stream, address, value, _WRITE_DEFAULT), "cuStreamWriteValue64")

    def wait_at_least(self, stream: int, address: int, value: int) -> None:
        """Queue on ``stream``: nothing queued after runs until the value at ``address`` is >= ``value``."""
        _check(self._wait(stream, address, value, _WAIT_GEQ), "cuStreamWaitValue64")


def _check(code: int, what: str) -> None:
    if code != 0:
        raise CudaDriverError(f"{what} failed with CUDA driver error {code}")


def _function(lib: ctypes.CDLL, name: str):
    """A stream write/wait function of libcuda: (CUstream, CUdeviceptr, cuuint64_t, unsigned int) -> CUresult."""
    fn = getattr(lib, name)  # AttributeError when this driver lacks it
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
    return fn


def driver() -> ctypes.CDLL:
    """libcuda (the driver API); OSError when it cannot be loaded."""
    return ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")


def load(device_index: int) -> tuple[StreamOps | None, str | None]:
    """(the operations, None) when device ``device_index`` supports them, else (None, why not).

    Call with that device's context current (torch has initialised CUDA on it)."""
    try:
        lib = driver()
        device = ctypes.c_int()
        _check(lib.cuDeviceGet(ctypes.byref(device), device_index), "cuDeviceGet")
        for attribute, suffix in ((_V2_ATTRIBUTE, "_v2"), (_V1_ATTRIBUTE, "")):
            supported = ctypes.c_int()
            _check(lib.cuDeviceGetAttribute(ctypes.byref(supported), attribute, device), "cuDeviceGetAttribute")
            if supported.value:
                write = _function(lib, f"cuStreamWriteValue64{suffix}")
                wait = _function(lib, f"cuStreamWaitValue64{suffix}")
                return StreamOps(lib, write, wait), None
        return None, f"cuda:{device_index} does not support 64-bit stream memory operations"
    except (OSError, AttributeError, CudaDriverError) as e:
        return None, f"{type(e).__name__}: {e}"
