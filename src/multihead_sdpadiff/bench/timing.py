"""Wall-clock timing: median and interquartile range of one call.

CPU (and CUDA without triton): ``torch.utils.benchmark.Timer`` with ``num_threads`` set on purpose
(it runs one thread otherwise). Each sample is one block of ``number`` calls, with ``number``
chosen so a block lasts at least ``BLOCK_S``; samples are taken until both ``min_reps`` samples
and ``min_time`` seconds are reached (or ``max_time`` with at least 3 samples). With a
``before_each`` hook (decode with a KV cache) every sample is exactly one call, after the hook ran
as the Timer's untimed setup. CUDA with triton: ``triton.testing.do_bench`` quantiles.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

BLOCK_S = 0.01


@dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float
    samples: int
    calls_per_sample: int
    timer: str


def summarize(samples: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of per-call times."""
    if len(samples) == 1:
        return samples[0], 0.0
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q2, q3 - q1


def time_call(
    fn: Callable[[], object],
    *,
    device: str,
    threads: int,
    min_time: float,
    min_reps: int,
    max_time: float,
    before_each: Callable[[], object] | None = None,
    estimate_s: float | None = None,
) -> Timing:
    """Time ``fn``; ``estimate_s`` (one warm call's time, if known) sizes the blocks without a
    calibration call."""
    if device.startswith("cuda") and before_each is None and importlib.util.find_spec("triton") is not None:
        return _do_bench(fn, min_time)
    from torch.utils.benchmark import Timer

    glob = {"fn": fn, "before": before_each or (lambda: None)}
    timer = Timer(stmt="fn()", setup="before()" if before_each else "pass", globals=glob, num_threads=threads)
    number = 1
    if before_each is None:
        first = estimate_s if estimate_s is not None else timer.timeit(1).median
        number = max(1, int(BLOCK_S / max(first, 1e-9)))
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        samples.append(timer.timeit(number).median)  # per-call mean over the block
        elapsed = time.perf_counter() - start
        if len(samples) >= min_reps and elapsed >= min_time:
            break
        if len(samples) >= 3 and elapsed >= max_time:
            break
    median, iqr = summarize(samples)
    return Timing(median, iqr, len(samples), number, f"torch.utils.benchmark.Timer(num_threads={threads})")


def _do_bench(fn, min_time: float) -> Timing:
    from triton.testing import do_bench

    q1, q2, q3 = do_bench(fn, warmup=max(25, int(min_time * 250)), rep=max(100, int(min_time * 1000)),
                          quantiles=[0.25, 0.5, 0.75])
    return Timing(q2 / 1e3, (q3 - q1) / 1e3, 0, 1, "triton.testing.do_bench")
