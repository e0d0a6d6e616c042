"""Large-token steps of a CPU rank: its linear layers run on a GPU of the node, weights streamed.
Off by default (``HETERO_SHIM_CPU_GEMM_ON_GPU``): not yet measured end to end on a GPU node.

Targets
- ``dispatch_cpu_unquantized_gemm`` (``vllm.model_executor.layers.utils``), which picks each
  unquantized linear layer's CPU GEMM once, at load (``layer.cpu_linear``), and for the packed and
  oneDNN kernels drops the layer's plain weight. In a CPU rank beside GPU ranks the plain weight is
  kept, and ``layer.cpu_linear`` becomes a choice per call: fewer tokens than the threshold take
  vLLM's CPU kernel as before; more take the GPU: activations and weight are copied over PCIe (the
  weight from a page-locked copy, the next layer's copy queued behind the current result), multiplied
  there, and the result copied back.
- ``CPUWorker.compile_or_warm_up_model`` (``vllm.v1.worker.cpu_worker``): after it the rank opens its
  GPU and moves the kept weights to page-locked memory. Not earlier: the GPU ranks measure their
  memory while the CPU rank warms up, and a CUDA context opened then would count against their KV cache.
How the rank sees its GPU: vLLM's CPU ranks run with ``CUDA_VISIBLE_DEVICES=-1`` (rank_process.py),
and vLLM's distributed start-up (``torch.distributed.barrier`` asks ``torch._C._get_accelerator``)
initialises CUDA in every worker, so a GPU hidden then stays hidden for the process's life (seen on
the H200 machine: "No CUDA GPUs are available" when the rank opened it later). So at the rank's
start (``reveal_to_driver``) only the C environment, which the CUDA driver reads, names the GPU;
Python's ``os.environ`` keeps ``-1``, and with ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` PyTorch's and
Triton's availability checks keep answering "no GPU" to vLLM's CPU code (seen there: Triton off, no
CUDA context until the GPU is opened). vLLM's CPU model runner replaces ``torch.cuda.Stream`` with
a placeholder, so the side uses ``torch.cuda.streams`` directly.
Why: a CPU core computes a prompt's tokens ~50x slower than it streams a weight, so for prefill
the CPU stage is compute-bound (an 8B CPU stage took 1.2-1.4 s for 512 tokens on the 16-core H200
host) while PCIe moves its weights in a fraction of that. Decode steps (a few tokens) stay on the
CPU, which streams weights faster than PCIe. The CUDA context costs GPU memory of its own, and the
kept weights double the host memory of layers whose CPU kernel packs its own copy. If the GPU
cannot be opened or a GPU call fails, the rank logs why and computes on the CPU from then on.
Remove when: vLLM offloads a CPU worker's large GEMMs itself (not as of 0.33.0).
"""

from __future__ import annotations

import os

from hetero_shim import run_state, settings, versions
from hetero_shim.arguments import Params
from hetero_shim.logs import log
from hetero_shim.registry import Fact, Patch

WHY = "a CPU rank computes prefill tokens far slower than PCIe can bring its weights to a GPU"
REMOVE_WHEN = "vLLM runs a CPU worker's large GEMMs on an accelerator of the node"
UPSTREAM = "each layer's CPU GEMM is chosen once at load; the packed and oneDNN kernels drop the plain weight"
UTILS = "vllm.model_executor.layers.utils"
DISPATCH = Params(layer=0, remove_weight=1)
TRIPWIRES = (
    Fact(UTILS, "dispatch_cpu_unquantized_gemm", r"layer\.cpu_linear = ",
         "the CPU GEMM of a layer is chosen once, as layer.cpu_linear"),
    Fact(UTILS, "dispatch_cpu_unquantized_gemm", r"cuda", "the CPU GEMM dispatch never uses a GPU", present=False),
)
CPU_WORKER = "vllm.v1.worker.cpu_worker"
WARM_UP_TRIPWIRES = (
    Fact(CPU_WORKER, "CPUWorker.determine_available_memory", r"warming_up_model",
         "the CPU worker's warm-up pass runs while the ranks size their memory"),
)


def rows(release: str) -> tuple[Patch, ...]:
    common = dict(concern="CPU-rank GEMMs on the GPU", why=WHY, remove_when=REMOVE_WHEN, upstream=UPSTREAM,
                  hetero_only=True)
    return (
        Patch(module=UTILS, name="dispatch_cpu_unquantized_gemm", wrapper=keep_gpu_choice, params=DISPATCH,
              tripwires=TRIPWIRES, **common),
        Patch(module=CPU_WORKER, name="CPUWorker.compile_or_warm_up_model", wrapper=open_gpu_after_warm_up,
              tripwires=WARM_UP_TRIPWIRES, **common),
    )


#: HETERO_SHIM_CPU_RANK_GPU=cpu: the side computes on the CPU, through the same per-call choice and the
#: same kept weights (tests of the wiring on machines without a GPU)
STAND_IN = "cpu"
#: the GPU's rows of a split layer are a multiple of this (vLLM's packed CPU kernel works in blocks of 32)
ROW_BLOCK = 64


class GpuSide:
    """This process's GPU for large-token linear layers: opened once, after the warm-up."""

    def __init__(self, min_tokens: int | None, share: float, device_entry: str, dispatch=None) -> None:
        #: from how many tokens a step's linear layers run wholly on the GPU (None: never)
        self.min_tokens, self.device_entry = min_tokens, device_entry
        #: below that: the share of each layer's output rows the GPU computes beside the CPU kernel
        self.share = share
        self.dispatch = dispatch  # vLLM's own dispatch_cpu_unquantized_gemm: the CPU kernel of the other rows
        self.device = None  # torch.device once open
        self.stream = None  # the side's own CUDA stream, current in this process once open
        self.layers: list[LayerChoice] = []
        self.used = False
        self.ahead = None  # (layer index, rows, those rows on the GPU): a copy queued behind the last result
        self.staged = None  # the last call's activations in page-locked memory, on their way to the GPU
        self.checks_left = settings.cpu_gemm_check_calls()

    def open(self) -> None:
        import torch
        from torch.cuda import streams

        if self.device_entry == STAND_IN:
            self._split_rows(torch)
            self.device = torch.device("cpu")
            log.info("hetero_shim: CPU rank: %s on the stand-in %s: %d layers", self.describe(), STAND_IN,
                     len(self.layers))
            return
        torch.cuda.init()
        if torch._C._cuda_getDeviceCount() < 1:
            raise RuntimeError("the CUDA driver shows no device")
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 stays float32, as on the CPU
        pinned = 0
        for layer in self.layers:  # a page-locked copy; where vLLM's kernel packed its own, the plain one goes
            w = layer.weight
            layer.weight = torch.empty(w.shape, dtype=w.dtype, pin_memory=True).copy_(w)
            pinned += w.numel() * w.element_size()
        self._split_rows(torch)
        self.device = torch.device("cuda", 0)
        self.stream = streams.Stream(device=self.device)
        torch.cuda.set_stream(self.stream)
        log.info("hetero_shim: CPU rank: %s on GPU %s: %d layers, %.2f GiB of weights in page-locked memory "
                 "(unset %s and %s to keep them on the CPU)", self.describe(), self.device_entry, len(self.layers),
                 pinned / (1 << 30), settings.CPU_GEMM_ON_GPU, settings.CPU_GEMM_GPU_SHARE)

    def describe(self) -> str:
        parts = []
        if self.min_tokens is not None:
            parts.append(f"linear layers of steps with >= {self.min_tokens} tokens run")
        if self.share > 0:
            parts.append(f"{self.share:g} of the rows of smaller steps' linear layers run")
        return " and ".join(parts)

    def _split_rows(self, torch) -> None:
        """For small steps: each layer's first rows (a multiple of ROW_BLOCK) go to the GPU, and vLLM's
        own dispatch builds the CPU kernel of the others, as it would for a layer of that size."""
        if self.share <= 0:
            return
        for layer in self.layers:
            n = layer.weight.shape[0]
            rows = int(n * self.share) // ROW_BLOCK * ROW_BLOCK
            if rows <= 0 or rows >= n:
                continue
            holder = torch.nn.Module()
            holder.weight = torch.nn.Parameter(layer.weight[rows:].clone(), requires_grad=False)
            bias = getattr(layer.module, "bias", None)
            if bias is not None:  # some of vLLM's kernels take the bias the layer had at dispatch, not the call's
                holder.bias = torch.nn.Parameter(bias.detach()[rows:].clone(), requires_grad=False)
            self.dispatch(holder, True)
            layer.rows, layer.rest = rows, holder

    def linear(self, x, layer: LayerChoice, bias):
        """``x @ layer.weight.T + bias`` on the GPU, as a page-locked CPU tensor. The next layer's
        weight (load order is the order a forward pass calls them) is queued behind the result, so
        that it crosses PCIe while the CPU works between the two layers."""
        import torch
        from torch.cuda import streams

        dev = self.device
        if dev.type == "cpu":  # the stand-in: the same choice, the kept weight, computed here
            self._first_use(x)
            return torch.nn.functional.linear(x, layer.weight, bias)
        copied, out = self._launch(x, layer, bias, layer.weight.shape[0], split=False)
        copied.synchronize()  # the result is back; the next weight may still be on its way
        self._first_use(x)
        return out.view(*x.shape[:-1], out.shape[-1])

    def split_linear(self, x, layer: LayerChoice, bias):
        """The same for a small step, the layer's first ``layer.rows`` rows on the GPU while vLLM's CPU
        kernel computes the others here; the two parts joined."""
        import torch

        rows = layer.rows
        if self.device.type == "cpu":  # the stand-in
            self._first_use(x)
            head = torch.nn.functional.linear(x, layer.weight[:rows], None if bias is None else bias[:rows])
        else:
            copied, head = self._launch(x, layer, None if bias is None else bias[:rows], rows, split=True)
        rest = layer.rest.cpu_linear(x, layer.rest.weight, None if bias is None else bias[rows:])
        if self.device.type != "cpu":
            copied.synchronize()
            self._first_use(x)
        return torch.cat((head.view(*x.shape[:-1], rows), rest), dim=-1)

    def _launch(self, x, layer: LayerChoice, bias, rows: int, split: bool):
        """Queue on the side's stream: the first ``rows`` rows of the layer's weight (unless queued
        already), ``x``, the product and its copy back into page-locked memory; then the next layer's
        weight rows (as many as this kind of step uses). Returns (event of the copy back, result)."""
        import torch
        from torch.cuda import streams

        dev = self.device
        torch.cuda.set_stream(self.stream)  # this thread's work goes where the event below is recorded
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == layer.index and ahead[1] >= rows:
            weight = ahead[2][:rows]
        else:
            weight = layer.weight[:rows].to(dev, non_blocking=True)
        # x through a page-locked buffer of our own, alive until the result is back: the copy cannot
        # read memory that the CPU kernel of the other rows allocates and writes in the meantime
        staged = torch.empty((x.numel() // x.shape[-1], x.shape[-1]), dtype=x.dtype, pin_memory=True)
        staged.copy_(x.reshape(-1, x.shape[-1]))
        self.staged = staged
        flat = staged.to(dev, non_blocking=True)
        gpu_bias = None if bias is None else bias.to(dev, dtype=x.dtype, non_blocking=True)
        y = torch.nn.functional.linear(flat, weight, gpu_bias)
        out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
        out.copy_(y, non_blocking=True)
        copied = streams.Event()
        copied.record(self.stream)
        following = self.layers[(layer.index + 1) % len(self.layers)]
        want = following.rows if split else following.weight.shape[0]
        if want:
            self.ahead = (following.index, want, following.weight[:want].to(dev, non_blocking=True))
        return copied, out

    def _first_use(self, x) -> None:
        if not self.used:
            self.used = True
            log.info("hetero_shim: CPU rank: a step of %d tokens ran its linear layers on GPU %s",
                     x.numel() // x.shape[-1], self.device_entry)

    def check(self, layer: LayerChoice, got, want, rows: int) -> None:
        """HETERO_SHIM_CPU_GEMM_CHECK: log how far a GPU call's result is from vLLM's CPU kernel's."""
        self.checks_left -= 1

        def rel(a, b) -> float:
            return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0

        parts = f"GPU rows {rel(got[..., :rows], want[..., :rows]):.2e}, CPU rows {rel(got[..., rows:], want[..., rows:]):.2e}" \
            if rows else f"all rows {rel(got, want):.2e}"
        log.info("hetero_shim: CPU rank: check of layer %d (%d rows on the GPU, %d tokens) against the CPU kernel: "
                 "max rel. difference %s", layer.index, rows or want.shape[-1], got.numel() // got.shape[-1], parts)

    def fail(self, what: str, exc: BaseException) -> None:
        self.device = None
        self.ahead = None
        log.warning("hetero_shim: CPU rank keeps its linear layers on the CPU: %s failed (%s: %s)", what,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


class LayerChoice:
    """A layer's ``cpu_linear``: vLLM's CPU kernel below the GPU side's token threshold (or while
    the GPU is not open), the GPU with the kept plain weight from it on."""

    __slots__ = ("cpu", "weight", "side", "index", "rows", "rest", "module")

    def __init__(self, cpu, weight, side: GpuSide, module=None) -> None:
        self.cpu, self.weight, self.side, self.module = cpu, weight, side, module
        self.index = len(side.layers)
        self.rows, self.rest = 0, None  # small steps: rows on the GPU, and the module of the others' CPU kernel
        side.layers.append(self)

    def __call__(self, x, weight, bias):
        side = self.side
        if side.device is None:
            return self.cpu(x, weight, bias)
        large = side.min_tokens is not None and x.numel() >= side.min_tokens * x.shape[-1]
        if not large and not self.rows:
            return self.cpu(x, weight, bias)
        try:
            got = side.linear(x, self, bias) if large else side.split_linear(x, self, bias)
        except Exception as exc:  # noqa: BLE001 - CUDA out of memory, a lost device: the CPU path is still whole
            side.fail("a linear layer on the GPU", exc)
            return self.cpu(x, weight, bias)
        if side.checks_left > 0:
            side.check(self, got, self.cpu(x, weight, bias), 0 if large else self.rows)
        return got


_side: GpuSide | None = None
_revealed_to_driver = False


def reveal_to_driver() -> None:
    """At a CPU rank's start, when it may use a GPU: the process's C environment, which the CUDA
    driver reads when it initialises, names that GPU; Python's os.environ keeps it hidden."""
    global _revealed_to_driver
    entry = os.environ.get(settings.CPU_RANK_GPU, "").strip()
    if _revealed_to_driver or not entry or entry == STAND_IN:
        return
    import ctypes

    ctypes.CDLL(None).setenv(b"CUDA_VISIBLE_DEVICES", entry.encode(), 1)
    _revealed_to_driver = True


def side() -> GpuSide | None:
    """This process's GPU side, created on first use when it is a CPU rank that may use a GPU (one
    that was revealed to the CUDA driver at its start, or the stand-in)."""
    global _side
    if _side is None and run_state.current().cpu_rank:
        entry = os.environ.get(settings.CPU_RANK_GPU, "").strip()
        tokens, share = settings.cpu_gemm_on_gpu_tokens(), settings.cpu_gemm_gpu_share()
        usable = entry == STAND_IN or (entry and _revealed_to_driver and not versions.is_cpu_build())
        if usable and (tokens is not None or share > 0):
            _side = GpuSide(tokens, share, entry)
    return _side


def keep_gpu_choice(wrapped, instance, args, kwargs):
    gpu = side()
    if gpu is not None and gpu.dispatch is None:
        gpu.dispatch = wrapped
    layer = DISPATCH.get(args, kwargs, "layer")
    weight = getattr(layer, "weight", None)
    result = wrapped(*args, **kwargs)
    # linear layers only (vLLM passes remove_weight=True for them): an embedding table kept for its
    # lookups (or as a tied LM head, run for a few tokens a step) gains nothing from a second copy
    if (gpu is not None and DISPATCH.get(args, kwargs, "remove_weight") and weight is not None
            and weight.ndim == 2 and not weight.is_meta and callable(getattr(layer, "cpu_linear", None))):
        layer.cpu_linear = LayerChoice(layer.cpu_linear, weight.detach(), gpu, module=layer)
    return result


def open_gpu_after_warm_up(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    gpu = side()
    if gpu is not None and gpu.layers and gpu.device is None:
        try:
            gpu.open()
        except Exception as exc:  # noqa: BLE001 - any failure leaves the rank on its CPU kernels
            gpu.fail(f"opening GPU {gpu.device_entry}", exc)
    return result
