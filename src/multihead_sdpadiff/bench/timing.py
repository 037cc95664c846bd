"""Wall-clock timing: median and interquartile range of one call.

CPU (and CUDA without triton): ``torch.utils.benchmark.Timer`` with ``num_threads`` set on purpose
(it runs one thread otherwise). Each sample is one block of calls lasting at least ``BLOCK_S``; a
method is sampled until it has ``min_reps`` samples and ``min_time`` seconds of them (or
``max_time`` seconds and at least 3 samples). The methods of one case are sampled in turn
(:func:`interleaved`). CUDA with triton: ``triton.testing.do_bench`` quantiles, one method at a time.
"""

from __future__ import annotations

import importlib.util
import os
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


class Sampler:
    """One method's timer: each call takes one sample and returns the per-call time of its block.

    A block is ``number`` calls, with ``number`` chosen from ``estimate_s`` (one warm call's time)
    so that a block lasts at least ``BLOCK_S``. With ``before_each`` (decode with a KV cache) a
    block is exactly one call, and the hook runs first as the Timer's untimed ``setup``.
    """

    def __init__(self, fn: Callable[[], object], *, threads: int, estimate_s: float,
                 before_each: Callable[[], object] | None = None):
        from torch.utils.benchmark import Timer

        glob = {"fn": fn, "before": before_each or (lambda: None)}
        self.timer = Timer(stmt="fn()", setup="before()" if before_each else "pass", globals=glob,
                           num_threads=threads)
        self.number = 1 if before_each else max(1, int(BLOCK_S / max(estimate_s, 1e-9)))
        self.samples: list[float] = []
        self.spent_s = 0.0
        self.label = f"torch.utils.benchmark.Timer(num_threads={threads})"

    def __call__(self) -> float:
        # Timer._timeit(n) runs the setup once, then times n calls: exactly one sample. The public
        # Timer.timeit(n) first runs a warm-up of max(n // 100, 2) calls, which would triple the
        # cost of slow cases and run a decode step twice per prefill.
        timeit = getattr(self.timer, "_timeit", None)
        per_call = timeit(self.number) / self.number if timeit else self.timer.timeit(self.number).median
        self.samples.append(per_call)
        self.spent_s += per_call * self.number
        return per_call

    def done(self, min_time: float, min_reps: int, max_time: float) -> bool:
        n = len(self.samples)
        return (n >= min_reps and self.spent_s >= min_time) or (n >= 3 and self.spent_s >= max_time)

    def timing(self) -> Timing:
        median, iqr = summarize(self.samples)
        return Timing(median, iqr, len(self.samples), self.number, self.label)


def interleaved(samplers: list[Sampler], *, min_time: float, min_reps: int, max_time: float,
                on_error: Callable[[int, Exception], None], on_round: Callable[[int], None] | None = None) -> None:
    """Sample every sampler in turn, round after round, until each is done.

    Round-robin puts every method of a case in the same stretch of wall-clock time, so a burst of
    load from another process lands on all of them and their ratios keep their meaning. A sampler
    that raises is reported through ``on_error`` and dropped.
    """
    active = list(range(len(samplers)))
    rounds = 0
    while active:
        for i in list(active):
            try:
                samplers[i]()
            except Exception as exc:  # noqa: BLE001 - reported by the caller as the method's error
                on_error(i, exc)
                active.remove(i)
                continue
            if samplers[i].done(min_time, min_reps, max_time):
                active.remove(i)
        rounds += 1
        if on_round is not None:
            on_round(rounds)


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
    """Time one ``fn`` alone: ``triton.testing.do_bench`` on CUDA when triton is installed (and no
    ``before_each``), else a :class:`Sampler` until done."""
    if uses_do_bench(device, before_each):
        return _do_bench(fn, min_time)
    if estimate_s is None:
        start = time.perf_counter()
        fn()
        estimate_s = time.perf_counter() - start
    sampler = Sampler(fn, threads=threads, estimate_s=estimate_s, before_each=before_each)
    while not sampler.done(min_time, min_reps, max_time):
        sampler()
    return sampler.timing()


class ForeignCPU:
    """How busy the machine's CPUs were with *other* processes over a stretch of time (Linux).

    ``share()`` is (all CPU time used on the machine − this process's CPU time) / (wall time ×
    CPUs), from ``/proc/stat`` and ``os.times()``: 0 on an idle machine, 0.5 when another
    process kept one of two cores busy. None where /proc/stat is unreadable.
    """

    def __init__(self):
        self._start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def share(self) -> float | None:
        end = self._read()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        foreign = (end[1] - self._start[1]) - (end[2] - self._start[2])
        cpus = os.cpu_count() or 1
        return max(0.0, foreign / (wall * cpus)) if wall > 0 else None


def uses_do_bench(device: str, before_each=None) -> bool:
    return device.startswith("cuda") and before_each is None and importlib.util.find_spec("triton") is not None


def _do_bench(fn, min_time: float) -> Timing:
    from triton.testing import do_bench

    q1, q2, q3 = do_bench(fn, warmup=max(25, int(min_time * 250)), rep=max(100, int(min_time * 1000)),
                          quantiles=[0.25, 0.5, 0.75])
    return Timing(q2 / 1e3, (q3 - q1) / 1e3, 0, 1, "triton.testing.do_bench")
