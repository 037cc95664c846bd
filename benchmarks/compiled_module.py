"""Compiled (fullgraph) module forward + backward: MultiheadDiffAttn against a standard MHA layer
of the same width, both under ``torch.compile(fullgraph=True)``, timed interleaved in one process.

    PYTHONPATH=src python benchmarks/compiled_module.py --seq-len 2048 --impl auto

Prints the median of each and their ratio. ``sdpadiff bench`` does not compile; this script is
the measurement behind docs/benchmarks.md's compiled-module row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multihead_sdpadiff import MultiheadDiffAttn
from multihead_sdpadiff.bench.cases import StandardMHA


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--embed-dim", type=int, default=768)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--impl", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    e, n = args.embed_dim, args.seq_len
    diff = torch.compile(MultiheadDiffAttn(e, 1, args.num_heads, impl=args.impl), fullgraph=True)
    std = torch.compile(StandardMHA(e, args.num_heads, args.num_heads), fullgraph=True)
    x = torch.randn(1, n, e, requires_grad=True)

    def step(m):
        def run():
            m(x).sum().backward()
        return run

    runs = {"standard": step(std), "diff": step(diff)}
    for fn in runs.values():
        fn()  # compile and warm up
        fn()
    samples = {k: [] for k in runs}
    for _ in range(args.reps):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"compiled fullgraph module fwd+bwd, N={n}, E={e}, heads={args.num_heads}, impl={args.impl}, "
          f"{args.threads} threads, {args.reps} interleaved samples")
    print(f"standard {med['standard'] * 1e3:.1f} ms  diff {med['diff'] * 1e3:.1f} ms  "
          f"ratio {med['diff'] / med['standard']:.2f}x")


if __name__ == "__main__":
    main()
