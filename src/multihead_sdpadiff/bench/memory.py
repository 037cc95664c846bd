"""Peak memory growth of one call, and a guess of whether a case fits at all.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
allocated before the call. CPU: torch's CPU allocator is invisible to tracemalloc, and
``ru_maxrss`` needs a fresh process per case (1-2 s of torch import each, too slow for the quick
preset), so the call runs once under ``torch.profiler`` with ``profile_memory=True``: every
allocation and free inside it is an event with a signed size, and the running sum of those
events, in time order, peaks at the growth we report. It counts tensors made by torch's allocator
(including those inside SDPA kernels and autograd), not the Python heap or allocator slack.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from .cases import Case


def peak_growth_bytes(fn: Callable[[], object], device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return max(0, torch.cuda.max_memory_allocated() - base)
    return _cpu_peak_growth(fn)


def _cpu_peak_growth(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    # kineto_results is the profiler's raw event list; FunctionEvent.cpu_memory_usage folds the
    # allocations into operators and loses their order, which the running peak needs.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines straight to file descriptor 2; hide them from the progress bar."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def available_bytes(device: str) -> int | None:
    """Free memory on the device now (CUDA: ``mem_get_info``; CPU: MemAvailable), or None."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_bytes(case: Case, score_memory: str) -> int:
    """A generous guess of one call's footprint: inputs, outputs, gradients and, for strategies that
    hold full score matrices, ``B·H·2·Lq·Lk`` float32 scores about four times over (eight with
    backward, which keeps them)."""
    qkv = case.qkv_bytes()
    grads = 3 if case.mode == "fwd_bwd" else 1
    total = qkv * (2 + 2 * grads)
    if case.level == "module":
        e = case.embed_dim
        total += 4 * e * e * 8 + case.batch * case.seq_len * e * 4 * 6
    if score_memory == "O(N^2)":
        scores = case.batch * case.heads * 2 * case.q_len * case.seq_len * 4
        total += scores * (8 if case.mode == "fwd_bwd" else 4)
    return total
