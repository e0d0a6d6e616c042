"""The GPU side of a CPU rank (hetero_shim/patches/per_step/cpu_gemm_on_gpu.py) in a process set up as
the shim sets up a CPU rank of a CUDA install (CUDA_VISIBLE_DEVICES=-1, PyTorch's NVML-based check,
the GPU named to the CUDA driver only) and doing what vLLM does in one before the side opens (Triton's
probe, the accelerator query of torch.distributed.barrier, torch.cuda.Stream replaced by a
placeholder): vLLM's view must stay "no GPU", the side must then open the GPU, and its results must
equal the CPU's, layer after layer (the next weight queued ahead; weights larger than
HETERO_SHIM_CPU_GEMM_CHUNK_MIB cross in pieces), and in reverse order, in float32 and bfloat16. Prints
the weight rate it streams once warm (information; 100-token calls, the CPU's work between calls
left out).

    python -m pytest tests/gpu/test_cpu_gemm_on_gpu.py -q --gpu-out DIR
"""

from __future__ import annotations

import json
import sys

PROBE = r"""
import json, os, time
import torch
from hetero_shim.patches.per_step import cpu_gemm_on_gpu as gg
gg.reveal_to_driver()  # as at a CPU rank's platform resolution
from vllm.triton_utils import HAS_TRITON  # runs Triton's driver probe, as a CPU rank's imports do
torch._C._get_accelerator()  # what torch.distributed.barrier asks during vLLM's start-up
class _Placeholder:  # vLLM's CPU model runner leaves torch.cuda.Stream replaced
    pass
torch.cuda.Stream = _Placeholder
found = {"has_triton": HAS_TRITON, "available_before": torch.cuda.is_available(),
         "initialized_before": torch.cuda.is_initialized(), "revealed": gg._revealed_to_driver}
side = gg.GpuSide(1, "0")
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    layers = [gg.LayerChoice(None, torch.randn(n, k, generator=gen).to(dtype), side)
              for n, k in ((3072, 1024), (1024, 3072), (8192, 1024), (1024, 4096), (14336, 4096))]
side.open(512)
found["available_after"] = torch.cuda.is_available()
worst, seconds, nbytes, calls = {}, 0.0, 0, 0
for step in range(4):  # the last pass in reverse: no layer finds its first piece queued ahead
    for layer in (side.layers if step < 3 else side.layers[::-1]):
        x = torch.randn(100, layer.weight.shape[1], generator=gen).to(layer.weight.dtype)
        bias = torch.randn(layer.weight.shape[0], generator=gen).to(x.dtype)
        start = time.perf_counter()
        got = side.linear(x, layer, bias)
        if step == 2:  # the first passes pay cuBLAS's start and the page-locked allocator's growth
            seconds += time.perf_counter() - start
            nbytes += layer.weight.numel() * layer.weight.element_size()
            calls += 1
        want = torch.nn.functional.linear(x.float(), layer.weight.float(), bias.float())
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        key = str(x.dtype)
        worst[key] = max(worst.get(key, 0.0), err)
        assert got.is_pinned() and got.shape == want.shape
found.update(worst_rel_err=worst, weight_GBps=round(nbytes / seconds / 1e9, 1), calls=calls,
             tf32=torch.backends.cuda.matmul.allow_tf32)
print("RESULT " + json.dumps(found))
"""


def test_gpu_side_opens_late_and_matches_the_cpu(gpu, evidence):
    env = {"CUDA_VISIBLE_DEVICES": "-1", "PYTORCH_NVML_BASED_CUDA_CHECK": "1", "HETERO_SHIM_CPU_RANK_GPU": "0"}
    done = gpu.run([sys.executable, "-c", PROBE], evidence.dir / "probe.log", 300, extra_env=env)
    found = gpu.result_line(done.text)
    evidence.save("result", {"rc": done.rc, "found": found})
    if found is None:
        print("\n".join(done.text.splitlines()[-25:]), flush=True)
    f = found or {}
    evidence.row("probe ran", found is not None, f"rc {done.rc}")
    evidence.row("vLLM's view stays 'no GPU': Triton off, torch.cuda.is_available() False before and after",
                 f.get("has_triton") is False and f.get("available_before") is False
                 and f.get("initialized_before") is False and f.get("available_after") is False
                 and f.get("revealed") is True, json.dumps({k: f.get(k) for k in (
                     "revealed", "has_triton", "available_before", "initialized_before", "available_after")}))
    errs = f.get("worst_rel_err") or {}
    evidence.row("float32 on the GPU == the CPU's (max rel. error < 1e-5, TF32 off)",
                 errs.get("torch.float32", 1) < 1e-5 and f.get("tf32") is False, json.dumps(errs))
    evidence.row("bfloat16 within bf16 rounding (max rel. error < 2e-2)", errs.get("torch.bfloat16", 1) < 2e-2, "")
    print(f"-- info: {f.get('calls')} calls streamed weights at {f.get('weight_GBps')} GB/s",
          flush=True)
    evidence.check()
