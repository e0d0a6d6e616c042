"""What a CPU stage's split request costs the CPU rank beyond the arithmetic: the client's side of
``hetero_shim/collectives/gemm_channel.py`` (``start``: the input into shared memory and the request
published; ``finish``: the wait and the join of the answer with the rows computed here), per request,
with the answer already there, so that no peer and no GEMM is timed.

A 3B decode step makes 56 such requests (14 CPU-stage layers x 4 linear layers), each on the step's
critical path. No GPU and no vLLM needed.

    python bench/channel_client.py [--shapes 5120x3072,3072x3072,16384x3072,3072x8192] [--tokens 1,16]
                                   [--share 50] [--repeats 500] [--out FILE.json]

Prints one line per token count; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: one decoder layer of the 3B Llama shapes (N x K: qkv, o, gate_up, down)
LLAMA_3B = "5120x3072,3072x3072,16384x3072,3072x8192"


class _Layer:
    def __init__(self, weight, share: int) -> None:
        rows = weight.shape[0] * share // 100
        self.weight, self.pieces = weight, [(0, weight.shape[0])]
        self.split_rows, self.split_pieces = rows, [(0, rows)]
        self.wide_rows, self.wide_pieces = 0, []


def measure(shapes: list[tuple[int, int]], tokens: list[int], share: int, repeats: int) -> list[dict]:
    import torch

    from hetero_shim.collectives import gemm_channel as gc

    torch.set_num_threads(1)
    layers = [_Layer(torch.zeros(n, k, dtype=torch.bfloat16), share) for n, k in shapes]
    client = gc.GemmClient(layers, max(tokens), rank=0)
    rows = []
    try:
        words = client.seg.words
        words[gc.ANSWER] = words[gc.DONE] = 1 << 60  # every request is answered already
        for m in tokens:
            inputs = [torch.randn(m, k, dtype=torch.bfloat16) for _, k in shapes]
            tails = [torch.randn(m, n - layer.split_rows, dtype=torch.bfloat16)
                     for (n, _), layer in zip(shapes, layers)]

            def one_step():
                for index, (x, tail) in enumerate(zip(inputs, tails)):
                    client.start(x, index, None, split=True)
                    client.finish(x, index, tail=tail)

            for _ in range(max(10, repeats // 10)):
                one_step()
            began = time.perf_counter()
            for _ in range(repeats):
                one_step()
            us = (time.perf_counter() - began) / (repeats * len(shapes)) * 1e6
            rows.append({"tokens": m, "us_per_request": round(us, 2), "requests": repeats * len(shapes)})
    finally:
        client.close()
        os.close(client.fd)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=LLAMA_3B, help="comma list of NxK weight shapes, one layer's (bf16)")
    ap.add_argument("--tokens", default="1,16", help="comma list of token counts per request")
    ap.add_argument("--share", type=int, default=50, help="percent of each layer's rows the answer holds")
    ap.add_argument("--repeats", type=int, default=500, help="timed passes over the layers per token count")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    opts = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in opts.shapes.split(",")]
    rows = measure(shapes, [int(t) for t in opts.tokens.split(",")], opts.share, opts.repeats)
    for row in rows:
        print(f"{row['tokens']:>3} tokens: {row['us_per_request']:.1f} us per request (start + finish, "
              f"{row['requests']} requests)")
    if opts.out:
        Path(opts.out).write_text(json.dumps({"shapes": shapes, "share": opts.share, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
