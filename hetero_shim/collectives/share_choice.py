"""Which share of a split layer's rows the next stage's GPU rank computes in a small step, chosen
while the CPU rank runs (``HETERO_SHIM_CPU_GEMM_SPLIT=adapt``, the default; used by
``patches/per_step/cpu_gemm_on_gpu.py``).

Why: the split of a decode step's linear layers ends when the slower of its two sides ends: the CPU
rank's kernels over its rows, or the GPU rank's copies of the other rows over PCIe. Where they meet
depends on the host: measured on machines of one GPU kind at 3B shapes, the halves met at 50 % on
one, the CPU waited 6-9 ms a step for the GPU's half on another (about 36 % would balance there), and
at 16 tokens the CPU was the longer side on a third. The CPU's rate beside the copies is not its rate
alone (64 against 104 GB/s on one machine), so a share measured at start-up misses it. What the
CPU rank can time itself is the split's cost in each step: from asking for a layer's leading rows to
holding the joined result, over the step's split layers. That cost is all that differs between
shares; the rest of the step does not depend on it.

How: the shares are kinds of the split (``gemm_channel.KINDS``), ordered by rows. Per step size
(1 token, 2-3, 4-7, 8-15, 16 or more) each kind is tried for ``trials`` steps, starting with the
default's; then the kind with the lowest median cost is kept. Every ``revisit`` steps of a size the
kept kind and its neighbours are tried again, so the choice follows a host whose rates drift. The
first step after a change of kind is not counted (the GPU rank's copies ahead were of the other
kind's rows). A step uses one kind for all its layers; the CPU rank tells the GPU rank which with
the step's first request. Pure logic: no clock, no I/O.
"""

from __future__ import annotations

from collections import deque
from statistics import median

TRIALS = 8  # counted steps of one kind before the next is tried
REVISIT = 400  # steps of one size between two rounds of trials


def size_class(tokens: int) -> int:
    """1 token, 2-3, 4-7, 8-15, 16 or more: 1 .. 5."""
    return min(max(1, tokens).bit_length(), 5)


def size_text(tokens: int) -> str:
    """The step sizes of ``tokens``'s class, as words: "1", "2-3", ..., "16 or more"."""
    c = size_class(tokens)
    return "1" if c == 1 else "16 or more" if c == 5 else f"{1 << (c - 1)}-{(1 << c) - 1}"


class _Size:
    """The trials and the kept kind of one step size."""

    def __init__(self, order: list[int], trials: int) -> None:
        self.costs: dict[int, deque] = {}
        self.plan = deque(k for k in order for _ in range(trials + 1))  # the first of each run not counted
        self.kept: int | None = None
        self.since = 0  # steps on the kept kind since the last trials
        self.last: int | None = None  # the kind of the size's last step


class ShareChooser:
    """``kinds``: the split's kinds, ordered by the GPU rank's rows, the default's at ``default``."""

    def __init__(self, kinds: tuple[str, ...], default: int, trials: int = TRIALS, revisit: int = REVISIT) -> None:
        if not 0 <= default < len(kinds):
            raise ValueError(f"default {default} is not one of {len(kinds)} kinds")
        self.kinds, self.default, self.trials, self.revisit = kinds, default, trials, revisit
        self.sizes: dict[int, _Size] = {}

    def choose(self, tokens: int) -> str:
        """The kind for a step of ``tokens`` tokens (call once per step, then :meth:`record`)."""
        size = self.sizes.get(size_class(tokens))
        if size is None:
            order = [self.default] + [i for i in range(len(self.kinds)) if i != self.default]
            size = self.sizes[size_class(tokens)] = _Size(order, self.trials)
        if not size.plan and size.since >= self.revisit:
            near = [k for k in (size.kept, size.kept - 1, size.kept + 1) if 0 <= k < len(self.kinds)]
            for k in near:
                size.costs.pop(k, None)
            size.plan.extend(k for k in near for _ in range(self.trials + 1))
            size.kept, size.since = None, 0
        kind = size.plan[0] if size.plan else size.kept
        return self.kinds[kind]

    def record(self, tokens: int, kind: str, seconds: float) -> None:
        """The split's cost in the step just chosen for (seconds over its split layers)."""
        size = self.sizes[size_class(tokens)]
        index = self.kinds.index(kind)
        if size.last == index:
            size.costs.setdefault(index, deque(maxlen=self.trials)).append(seconds)
        size.last = index
        if size.plan:
            size.plan.popleft()
            if not size.plan:  # the trials ended: keep the cheapest
                size.kept = self._best(size)
        else:
            size.since += 1

    @staticmethod
    def _timed(size: _Size) -> dict[int, float]:
        """Each tried kind's median cost over its latest counted steps of the size."""
        return {k: median(c) for k, c in size.costs.items() if c}

    def _best(self, size: _Size) -> int:
        timed = self._timed(size)
        return min(timed, key=lambda k: (timed[k], k != self.default)) if timed else self.default

    def medians(self, tokens: int) -> dict[str, float]:
        """Each tried kind's median cost (seconds) over its latest counted steps of this size, in
        the kinds' order; what the kept kind was chosen from."""
        size = self.sizes.get(size_class(tokens))
        timed = {} if size is None else self._timed(size)
        return {self.kinds[k]: timed[k] for k in sorted(timed)}

    def kept(self, tokens: int) -> str | None:
        """The kind kept for steps of this size, once its trials ended (None before)."""
        size = self.sizes.get(size_class(tokens))
        return None if size is None or size.kept is None else self.kinds[size.kept]
