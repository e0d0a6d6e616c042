"""One CUDA kernel for the GPU rank's part of a shared-memory all-reduce (``FusedAllReduce``).

Why: the stream-ordered all-reduce (``hetero_shim.collectives.gpu_stream``) queued four operations per
call (copy into the segment, ``cuStreamWriteValue64``, ``cuStreamWaitValue64``, an add reading
the segment): four host calls of 3-10 us each on the H100 host, and 28-32 us of device time
for an 8 KiB piece (profiled there, 2026-11-24): 79 us per 8 KiB all-reduce, where the target is
50. This kernel does the steps in one launch, with the protocol of
``hetero_shim.collectives.shm``, so the CPU ranks cannot tell:

1. every thread copies its elements of ``src`` (16-byte vectors when aligned) into this rank's
   piece of the segment (stores to mapped host memory over PCIe), then fences them at system scope;
2. the last block to finish (one block: itself) stores ``arrive = seq`` with release semantics
   at system scope: a CPU rank that sees the flag sees the data;
3. thread 0 of every block polls every other rank's ``arrive`` flag (acquire loads at system
   scope, i.e. from host memory, never a stale cache line) until it is >= ``seq``, or until this
   rank's own ``release`` flag is (set by the host after an error: the wait ends, the result is
   not used, and no other rank's flag is touched);
4. every thread sums the ranks' elements in rank order (volatile loads from the segment; its
   own from ``src``) and writes ``out``: the same IEEE additions, rounded to the dtype after each,
   as every CPU rank does (bf16/fp16: in fp32, rounded to nearest even; NaN becomes the
   canonical NaN as in PyTorch's CPU code), so every rank holds the same bits.

A pending kernel waits on the stream like ``cuStreamWaitValue64``, so the host bookkeeping
(settling one collective late, releasing the wait after an error) is unchanged. Grid: at most
``MAX_BLOCKS`` blocks, all resident at once on any GPU this runs on (a block that spins must not
keep another block of the same grid from starting). Measured on the H100 (2026-11-24,
docs/performance.md): 8 KiB between 1 GPU and 1 CPU rank 29-43 us against 70-102 us with the four
operations, in the same calls.

Compiled at first use with NVRTC (``libnvrtc``, which the CUDA builds of torch install) for this
GPU's architecture, loaded and launched through the driver API (ctypes; ``cuLaunchKernel`` with
argument storage allocated once). ``load`` returns (None, why) when any of it is unavailable;
the caller then keeps the four operations (2 ranks) or host waits (more). Remove when: never for
GPU+CPU groups, unless torch gains a host-memory collective.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import torch

from hetero_shim.collectives.stream_ops import _check, driver

THREADS = 512
BLOCK_BYTES = THREADS * 16  # one 16-byte vector per thread and phase: no thread waits on two PCIe loads in turn
MAX_BLOCKS = 32  # 256 KiB in one pass; far below what one GPU holds resident at once

SOURCE = r"""
typedef unsigned short u16;

__device__ __forceinline__ long long load_acquire_sys(const long long* p) {
  long long v;
  asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_release_sys(long long* p, long long v) {
  asm volatile("st.release.sys.global.b64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint4 load_volatile_v4(const uint4* p) {  // from host memory, never a cached copy
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ float bf16_to_float(u16 h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ u16 float_to_bf16(float f) {  // round to nearest even, NaN as c10::BFloat16
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}
__device__ __forceinline__ float f16_to_float(u16 h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 float_to_f16(float f) {
  u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
// add(a, b): one element; add_word: the elements in one 32-bit word (one float or two 16-bit values)
struct AddF32 {
  typedef float T;
  __device__ static float add(float a, float b) { return __fadd_rn(a, b); }
  __device__ static unsigned add_word(unsigned a, unsigned b) {
    return __float_as_uint(__fadd_rn(__uint_as_float(a), __uint_as_float(b))); }
};
template <float (*TO)(u16), u16 (*FROM)(float)>
struct Add16 {
  typedef u16 T;
  __device__ static u16 add(u16 a, u16 b) { return FROM(__fadd_rn(TO(a), TO(b))); }
  __device__ static unsigned add_word(unsigned a, unsigned b) {
    return (unsigned)add((u16)(a & 0xffffu), (u16)(b & 0xffffu))
           | ((unsigned)add((u16)(a >> 16), (u16)(b >> 16)) << 16); }
};
typedef Add16<bf16_to_float, float_to_bf16> AddBF16;
typedef Add16<f16_to_float, float_to_f16> AddF16;

// One all-reduce of operation `seq` for group rank `rank` of `world`. `area`: the buffer's data
// area in the mapped segment, rank q's piece of n elements at q * n. `flags`: the segment's flag
// header; rank q's arrive flag at flags[q * stride + ARRIVE]. `release`: this rank's own flag that
// the host sets after an error, so a pending wait ends (peers' flags are never overwritten).
// vec: src, out and every piece are 16-byte aligned, so whole 16-byte vectors move at once (the
// tail of fewer than 16 bytes, and everything when not aligned, element by element).
// The sum is ((p0 + p1) + p2) + ..., rounded to T after each addition: what every CPU rank
// computes (hetero_shim.collectives.shm), so every rank holds the same bits.
template <class K>
__device__ void all_reduce(const typename K::T* __restrict__ src, typename K::T* __restrict__ out,
                           typename K::T* area, long long* flags, const long long* release,
                           unsigned int* blocks_done, long long seq, long long n, int rank, int world,
                           int stride, int vec) {
  typedef typename K::T T;
  const long long step = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long per = 16 / sizeof(T);
  const long long vectors = vec ? n / per : 0;
  const uint4* src4 = reinterpret_cast<const uint4*>(src);
  T* mine = area + rank * n;
  for (long long i = first; i < vectors; i += step) reinterpret_cast<uint4*>(mine)[i] = src4[i];
  for (long long i = vectors * per + first; i < n; i += step) mine[i] = src[i];
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    bool last = true;
    if (gridDim.x > 1) {
      __threadfence_system();
      last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
      if (last) { *blocks_done = 0u; __threadfence_system(); }
    }
    if (last) store_release_sys(flags + (long long)rank * stride, seq);
    for (int q = 0; q < world; ++q) {
      if (q == rank) continue;
      while (load_acquire_sys(flags + (long long)q * stride) < seq && load_acquire_sys(release) < seq) { }
    }
  }
  __syncthreads();
  for (long long i = first; i < vectors; i += step) {
    uint4 acc = rank == 0 ? src4[i] : load_volatile_v4(reinterpret_cast<const uint4*>(area) + i);
    for (int q = 1; q < world; ++q) {
      uint4 b = q == rank ? src4[i] : load_volatile_v4(reinterpret_cast<const uint4*>(area + q * n) + i);
      acc.x = K::add_word(acc.x, b.x); acc.y = K::add_word(acc.y, b.y);
      acc.z = K::add_word(acc.z, b.z); acc.w = K::add_word(acc.w, b.w);
    }
    reinterpret_cast<uint4*>(out)[i] = acc;
  }
  for (long long i = vectors * per + first; i < n; i += step) {
    T acc = rank == 0 ? src[i] : *reinterpret_cast<const volatile T*>(area + i);
    for (int q = 1; q < world; ++q)
      acc = K::add(acc, q == rank ? src[i] : *reinterpret_cast<const volatile T*>(area + q * n + i));
    out[i] = acc;
  }
}

#define ALL_REDUCE(NAME, K)                                                                         \
  extern "C" __global__ void NAME(const K::T* src, K::T* out, K::T* area, long long* flags,           \
                                  const long long* release, unsigned int* blocks_done, long long seq, \
                                  long long n, int rank, int world, int stride, int vec) {            \
    all_reduce<K>(src, out, area, flags, release, blocks_done, seq, n, rank, world, stride, vec);    \
  }
ALL_REDUCE(hs_all_reduce_f32, AddF32)
ALL_REDUCE(hs_all_reduce_bf16, AddBF16)
ALL_REDUCE(hs_all_reduce_f16, AddF16)
"""

_CUBINS: dict[str, bytes] = {}
KERNELS = {torch.float32: "hs_all_reduce_f32", torch.bfloat16: "hs_all_reduce_bf16",
           torch.float16: "hs_all_reduce_f16"}


def _nvrtc() -> ctypes.CDLL:
    """libnvrtc of torch's CUDA release: already loaded by torch, or from the nvidia wheels on sys.path."""
    major = (torch.version.cuda or "").split(".")[0]
    names = [f"libnvrtc.so.{major}"] if major else []
    for entry in sys.path:
        names += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", f"libnvrtc.so.{major or '[0-9]*'}")))
    errors = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
            continue
        _load_builtins_beside()
        return lib
    raise OSError(f"libnvrtc.so.{major or '?'} not found ({'; '.join(errors) or 'no candidates'})")


def _load_builtins_beside() -> None:
    """NVRTC opens libnvrtc-builtins by name at compile time; the nvidia wheels' directory is not
    on the loader's path, so load it from beside libnvrtc first (then the name is found)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/libnvrtc.so" in line}
    for path in paths:
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*"))):
            try:
                ctypes.CDLL(builtins)
                return
            except OSError:
                continue


def compile_cubin(arch: str, source: str = SOURCE) -> bytes:
    """The kernels as a cubin for ``arch`` (``sm_90``); OSError with NVRTC's log when it fails."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    code = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"hetero_shim_all_reduce.cu", 0, None, None)
    if code != 0:
        raise OSError(f"nvrtcCreateProgram failed ({code})")
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
        code = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        if code != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise OSError(f"NVRTC could not compile the fused all-reduce for {arch} ({code}): "
                          f"{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _nvrtc_check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _nvrtc_check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvrtc_check(code: int, what: str) -> None:
    if code != 0:
        raise OSError(f"{what} failed ({code})")


class FusedAllReduce:
    """The loaded kernels of one device; ``launch`` queues one all-reduce of a shared-memory group."""

    _POINTERS = 6  # src, out, area, flags, release, blocks_done; then seq, n (int64); rank, world, stride, vec (int32)

    def __init__(self, lib: ctypes.CDLL, cubin: bytes, device: torch.device) -> None:
        module = ctypes.c_void_p()
        _check(lib.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        self._functions = {}
        for dtype, name in KERNELS.items():
            fn = ctypes.c_void_p()
            _check(lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), "cuModuleGetFunction")
            self._functions[dtype] = fn
        self._launch = lib.cuLaunchKernel
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        self._values = ([ctypes.c_uint64() for _ in range(self._POINTERS)] + [ctypes.c_int64() for _ in range(2)]
                        + [ctypes.c_int32() for _ in range(4)])
        self._params = (ctypes.c_void_p * len(self._values))(*(ctypes.addressof(v) for v in self._values))
        self._blocks_done = torch.zeros(1, dtype=torch.int32, device=device)  # reset by each grid's last block
        self._values[5].value = self._blocks_done.data_ptr()

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self._functions

    def launch(self, stream: int, src: torch.Tensor, out: torch.Tensor, area: int, flags: int, release: int,
               seq: int, rank: int, world: int, stride: int) -> None:
        """Queue on ``stream``: ``src`` -> this rank's piece of the data area at device address ``area``
        (rank q's piece of src.numel() elements at q * src.nbytes), arrive = seq at ``flags`` + 8 *
        rank * ``stride``, wait until every rank's arrive >= seq (or the int64 at ``release`` is),
        out = the pieces summed in rank order. ``src`` and ``out``: contiguous, same size and dtype."""
        n, src_ptr, out_ptr = src.numel(), src.data_ptr(), out.data_ptr()
        v = self._values
        v[0].value, v[1].value, v[2].value, v[3].value, v[4].value = src_ptr, out_ptr, area, flags, release
        v[6].value, v[7].value, v[8].value, v[9].value, v[10].value = seq, n, rank, world, stride
        v[11].value = int((src_ptr | out_ptr | area | n * src.element_size()) & 15 == 0)
        blocks = min(MAX_BLOCKS, max(1, -(-n * src.element_size() // BLOCK_BYTES)))
        _check(self._launch(self._functions[src.dtype], blocks, 1, 1, THREADS, 1, 1, 0, stream, self._params, None),
               "cuLaunchKernel")


def load(device_index: int) -> tuple[FusedAllReduce | None, str | None]:
    """(the kernels, None) for CUDA device ``device_index`` (its context current), else (None, why not)."""
    try:
        major, minor = torch.cuda.get_device_capability(device_index)
        if major < 7:
            return None, f"cuda:{device_index} is sm_{major}{minor}; the kernel's acquire/release loads need sm_70+"
        arch = f"sm_{major}{minor}"
        if arch not in _CUBINS:  # one compile per process (~0.1-1 s), however many groups load it
            _CUBINS[arch] = compile_cubin(arch)
        return FusedAllReduce(driver(), _CUBINS[arch], torch.device("cuda", device_index)), None
    except Exception as e:  # optional: any failure keeps the four-operation path, with the reason logged
        return None, f"{type(e).__name__}: {e}"
