"""V2 against standard attention of the same output width, op and module level, CPU or CUDA.

Until V2 has rows in ``sdpadiff bench``, this script measures the ratio the authors discuss. Both
methods are checked against a float64 reference first, then timed round-robin (one sample of
each per round) with ``torch.utils.benchmark.Timer`` at an explicit thread count; it prints
medians and the median of the per-round ratios.

    python benchmarks/v2_speed.py [--n 2048] [--decode-n 4096] [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from multihead_sdpadiff import MultiheadDiffAttnV2, diff_attention_v2
from multihead_sdpadiff.models.attention import StandardAttention


def rounds(fns: dict, n_rounds: int, threads: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(n_rounds):
        for name, fn in fns.items():
            times[name].append(Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=0.2).median)
    return times


def report(title: str, times: dict) -> None:
    base = times["standard"]
    print(title)
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        print(f"  {name:10s} median {statistics.median(ts) * 1e3:8.3f} ms   x standard {ratio:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--decode-n", type=int, default=4096)
    p.add_argument("--embed-dim", type=int, default=768)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    dev, h, e = a.device, a.num_heads, a.embed_dim
    d = e // h
    print(f"torch {torch.__version__}, {dev}, float32, {a.threads} threads, E={e}, h={h} output heads of d={d}, causal")

    # Op level: V2's 2h query maps over h kv heads of width d, against h heads of width d.
    for n, lq in ((a.n, a.n), (a.decode_n, 1)):
        q2 = torch.randn(1, 2 * h, lq, d, device=dev)
        q = torch.randn(1, h, lq, d, device=dev)
        k, v = torch.randn(1, h, n, d, device=dev), torch.randn(1, h, n, d, device=dev)
        lam = torch.rand(1, h, lq, device=dev)
        ref = diff_attention_v2(q2.double(), k.double(), v.double(), lam.double(), is_causal=True, impl="reference")
        got = diff_attention_v2(q2, k, v, lam, is_causal=True, impl="sdpa")
        assert (got.double() - ref).abs().max() < 1e-4, "V2 sdpa disagrees with its reference"
        causal = lq == n
        with torch.inference_mode():
            times = rounds({
                "standard": lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                "v2 sdpa": lambda q2=q2, k=k, v=v, lam=lam: diff_attention_v2(q2, k, v, lam, is_causal=True, impl="sdpa"),
            }, a.rounds, a.threads)
        report(f"op {'forward' if causal else 'decode step'}, N = {n}", times)

    # Module level, forward: MultiheadDiffAttnV2 against a standard MHA layer of the same width.
    x = torch.randn(1, a.n, e, device=dev)
    v2 = MultiheadDiffAttnV2(e, h, device=dev).eval()
    std = StandardAttention(e, h, device=dev).eval()
    with torch.inference_mode():
        times = rounds({"standard": lambda: std(x), "v2 module": lambda: v2(x)}, a.rounds, a.threads)
    report(f"module forward, N = {a.n}", times)


if __name__ == "__main__":
    main()
