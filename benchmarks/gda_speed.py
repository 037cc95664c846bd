"""Grouped differential attention (GDA) against r separate differential heads, op level, CPU or CUDA.

GDA's N_s signal heads share N_n = N_s / r noise heads; the exact strategies take each noise softmax
once. The comparison is V1 differential attention with N_s heads (each with its own noise map) over
the same keys and values (P kv pairs of K1, K2 and a value of width 2d), both with ``impl="chunked"``
Each is first checked against its own reference strategy in float64 on a small case (the
reference strategies are tested against independent statements in tests/). Then they are timed round-robin (one sample of each per
round) with ``torch.utils.benchmark.Timer`` at an explicit thread count; the script prints medians
and the median of the per-round ratios GDA / V1.

    python benchmarks/gda_speed.py [--n 1024 2048] [--signal 8] [--ratio 4] [--pairs 2] [--d 64]
                                   [--threads 2] [--rounds 7] [--bwd] [--cpu-time]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.benchmark import Timer

from multihead_sdpadiff import diff_attention
from multihead_sdpadiff.ops.grouped import grouped_diff_attention


def _timed(fns: dict, n_rounds: int, threads: int, cpu_time: bool) -> dict:
    times = {k: [] for k in fns}
    if cpu_time:  # the process's CPU seconds per call: what other jobs' load distorts least
        torch.set_num_threads(1)
        for fn in fns.values():
            fn()  # warm-up
    for _ in range(n_rounds):
        for name, fn in fns.items():
            if cpu_time:
                t0 = time.process_time()
                fn()
                times[name].append(time.process_time() - t0)
            else:
                times[name].append(Timer("fn()", globals={"fn": fn}, num_threads=threads)
                                   .blocked_autorange(min_run_time=0.3).median)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--signal", type=int, default=8, help="N_s signal heads (= V1's differential heads)")
    p.add_argument("--ratio", type=int, default=4, help="r signal heads per noise head")
    p.add_argument("--pairs", type=int, default=2, help="P kv pairs (must divide N_s / r)")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--bwd", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--cpu-time", action="store_true",
                   help="one thread, process CPU time per call (for a machine shared with other jobs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    ns, r, pairs, d, dev = a.signal, a.ratio, a.pairs, a.d, a.device
    nn_ = ns // r
    torch.manual_seed(0)
    clock = "1 thread, process CPU time" if a.cpu_time else f"{a.threads} threads, wall time"
    print(f"torch {torch.__version__}, {dev}, float32, {clock}, causal, N_s={ns} signal heads, "
          f"r={r} (N_n={nn_}), P={pairs} kv pairs, d={d}, {'fwd+bwd' if a.bwd else 'fwd'}, impl=chunked")
    print(f"FLOPs per (query, key) and signal head: GDA (6 + 2/r)d = {6 + 2 / r:.2f}d, V1 8d: "
          f"ratio {(6 + 2 / r) / 8:.3f}")

    # Correctness first, small, float64.
    qs, qn = torch.randn(1, ns, 65, d, dtype=torch.float64), torch.randn(1, nn_, 65, d, dtype=torch.float64)
    q1 = torch.randn(1, 2 * ns, 65, d, dtype=torch.float64)
    k, v = torch.randn(1, 2 * pairs, 65, d, dtype=torch.float64), torch.randn(1, pairs, 65, 2 * d, dtype=torch.float64)
    for name, fn in (("gda", lambda i: grouped_diff_attention(qs, qn, k, v, 0.4, is_causal=True, impl=i)),
                     ("v1", lambda i: diff_attention(q1, k, v, 0.4, is_causal=True, impl=i))):
        err = (fn("chunked") - fn("reference")).abs().max().item()
        assert err < 1e-10, (name, err)

    for n in a.n:
        qs = torch.randn(1, ns, n, d, device=dev, requires_grad=a.bwd)
        qn = torch.randn(1, nn_, n, d, device=dev, requires_grad=a.bwd)
        q1 = torch.randn(1, 2 * ns, n, d, device=dev, requires_grad=a.bwd)
        k = torch.randn(1, 2 * pairs, n, d, device=dev, requires_grad=a.bwd)
        v = torch.randn(1, pairs, n, 2 * d, device=dev, requires_grad=a.bwd)
        g = torch.randn(1, ns, n, 2 * d, device=dev)

        def gda():
            out = grouped_diff_attention(qs, qn, k, v, 0.4, is_causal=True, impl="chunked")
            if a.bwd:
                torch.autograd.grad(out, (qs, qn, k, v), g)

        def v1():
            out = diff_attention(q1, k, v, 0.4, is_causal=True, impl="chunked")
            if a.bwd:
                torch.autograd.grad(out, (q1, k, v), g)

        with torch.inference_mode(not a.bwd):
            times = _timed({"gda": gda, "v1": v1}, a.rounds, a.threads, a.cpu_time)
        ratio = statistics.median(x / y for x, y in zip(times["gda"], times["v1"], strict=True))
        print(f"N={n:5d}  GDA median {statistics.median(times['gda']) * 1e3:8.2f} ms   "
              f"V1 ({ns} differential heads) median {statistics.median(times['v1']) * 1e3:8.2f} ms   "
              f"GDA / V1 {ratio:.3f}")


if __name__ == "__main__":
    main()
