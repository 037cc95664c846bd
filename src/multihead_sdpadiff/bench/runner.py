"""The sweep: for every mode, sequence length and method, check, measure and record.

Order of work for one method at one case: is it available here (the strategy's own
``not_supported_reasons``)? would it fit (:func:`~.memory.estimate_bytes`)? is it correct (the
guard, once per method and mode, on a small case)? Only then: warm up, measure peak memory once,
time. Every outcome is a row; a failure is a row with the error text, never an abort. The results
file is rewritten after every row, so Ctrl-C (or a crash) keeps what was measured.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import multihead_sdpadiff as msd

from .cases import STANDARD, Case, Method, case_flops, make_tensors
from .guard import Verdict, check_method
from .memory import available_bytes, estimate_bytes, peak_growth_bytes
from .timing import ForeignCPU, Sampler, interleaved, time_call, uses_do_bench

SCHEMA = "sdpadiff-bench/1"


@dataclass
class BenchConfig:
    level: str = "op"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    seq_lens: tuple[int, ...] = (512, 1024, 2048)
    modes: tuple[str, ...] = ("fwd", "fwd_bwd")
    batch: int = 1
    embed_dim: int = 768
    num_heads: int = 12
    num_kv_heads: int = 12
    threads: int = field(default_factory=torch.get_num_threads)
    min_time: float = 0.2  # seconds of timing per case, at least
    min_reps: int = 5  # timing samples per case, at least
    max_time: float = 2.0  # stop sampling a slow case after this (with >= 3 samples)
    check_len: int = 64  # N of the correctness check
    seed: int = 0
    mem_fraction: float = 0.7  # skip a case whose estimate exceeds this share of free memory
    preset: str = "custom"
    second_yardstick: str | None = None  # a method every row is also divided by (its own column)
    note: str = ""  # one line the report prints under its header (what the op's shapes mean)

    def case(self, mode: str, seq_len: int) -> Case:
        return Case(self.level, mode, self.batch, seq_len, self.embed_dim, self.num_heads, self.num_kv_heads,
                    self.dtype, self.device)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = _dtype_name(self.dtype)
        d["seq_lens"], d["modes"] = list(self.seq_lens), list(self.modes)
        return d


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- environment ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _load() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes on the machine distort CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(cfg: BenchConfig, command_line: str) -> dict:
    cuda = cfg.device.startswith("cuda")
    return {
        "command_line": command_line,
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "multihead_sdpadiff": msd.__version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": cfg.device,
        "device_name": torch.cuda.get_device_name(torch.device(cfg.device)) if cuda else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": cfg.threads,
        "dtype": _dtype_name(cfg.dtype),
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "load_average": _load(),
        "memory_method": "torch.cuda.max_memory_allocated growth" if cuda
        else "torch.profiler memory events (running peak of allocations minus frees)",
    }


# ---- progress ---------------------------------------------------------------------------------


class _PlainProgress:
    """What the sweep shows when tqdm is not installed: one overwritten status line on stderr."""

    def __init__(self, total: int):
        self.total, self.n, self.note = total, 0, ""

    def set_postfix_str(self, note: str) -> None:
        self.note = note
        self._draw()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def _draw(self) -> None:
        sys.stderr.write(f"\rbench [{self.n}/{self.total}] {self.note:<60.60}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total)
    return tqdm(total=total, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)


# ---- one measurement --------------------------------------------------------------------------


@dataclass
class Prepared:
    """A method ready to time at one case: the timed call, its untimed hook, one warm call's time
    and the measured peak memory growth."""

    fn: Callable[[], object]
    before: Callable[[], None] | None
    warm_s: float
    peak_bytes: int


def _prepare_timed(method: Method, case: Case, cfg: BenchConfig, tensors: dict) -> Prepared:
    state = method.prepare(case, tensors)
    hook = state.get("before_each")

    def before():
        with torch.inference_mode():
            hook()

    if case.mode == "fwd_bwd":
        for name in state["grad_names"]:
            state[name] = state[name].detach().requires_grad_()
        leaves = tuple(state[n] for n in state["grad_names"]) + tuple(state.get("params", ()))
        out = method.run(state)
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
        del out

        def fn():
            return torch.autograd.grad(method.run(state), leaves, grad)
    else:
        def fn():
            with torch.inference_mode():
                return method.run(state)

    # One warm-up call (first-call allocations, kernel choice, lazy imports); the profiled call
    # below is a second one before any timing. The warm-up's time sizes the timing blocks.
    if hook:
        before()
    start = time.perf_counter()
    fn()
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - start
    if hook:
        before()
    peak = peak_growth_bytes(fn, case.device)
    return Prepared(fn, before if hook else None, warm_s, peak)


def _time_group(pending: list[tuple[dict, Prepared]], case: Case, cfg: BenchConfig, bar) -> None:
    """Time the prepared methods of one case, interleaved (see timing.interleaved)."""
    if not pending:
        return
    limits = {"min_time": cfg.min_time, "min_reps": cfg.min_reps, "max_time": cfg.max_time}
    if uses_do_bench(case.device):
        for row, prep in pending:
            try:
                row.update(_timing_fields(time_call(prep.fn, device=case.device, threads=cfg.threads,
                                                    estimate_s=prep.warm_s, **limits)))
            except Exception as exc:  # noqa: BLE001
                row.update(status="error", reason=_short(exc))
        return
    samplers = [Sampler(p.fn, threads=cfg.threads, estimate_s=p.warm_s, before_each=p.before) for _, p in pending]
    others = ForeignCPU()

    def on_error(i: int, exc: Exception) -> None:
        pending[i][0].update(status="error", reason=_short(exc))

    def on_round(r: int) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{case.mode} N={case.seq_len}: timing, round {r}")

    try:
        interleaved(samplers, on_error=on_error, on_round=on_round, **limits)
    finally:  # after Ctrl-C too: whatever was sampled is kept
        foreign = others.share()
        for (row, _), sampler in zip(pending, samplers, strict=True):
            if row["status"] == "ok" and sampler.samples:
                row.update(_timing_fields(sampler.timing()), foreign_cpu=foreign)


def _timing_fields(t) -> dict:
    return {"median_s": t.median_s, "iqr_s": t.iqr_s, "samples": t.samples,
            "calls_per_sample": t.calls_per_sample, "timer": t.timer}


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def fill_derived(rows: list[dict], second: str | None = None) -> None:
    """Ratio to ``standard`` measured in the same run, GFLOP/s and memory / (q + k + v), in place.
    With ``second`` (a method's name), ``ratio_second`` is the ratio to that method in the same run."""
    def medians(name):
        return {(r["level"], r["mode"], r["seq_len"]): r["median_s"] for r in rows
                if r["method"] == name and r["status"] == "ok"}

    floor = medians(STANDARD)
    other = medians(second) if second else {}
    for r in rows:
        ok = r["status"] == "ok" and r["median_s"] is not None  # not yet timed: no derived values
        key = (r["level"], r["mode"], r["seq_len"])
        base = floor.get(key)
        r["ratio"] = r["median_s"] / base if ok and base else None
        if second:
            r["ratio_second"] = r["median_s"] / other[key] if ok and other.get(key) else None
        r["gflops"] = r["flops"] / r["median_s"] / 1e9 if ok and r.get("flops") else None
        measured = r["status"] == "ok" and r.get("peak_bytes") is not None
        r["mem_ratio"] = r["peak_bytes"] / r["qkv_bytes"] if measured else None


# ---- the sweep --------------------------------------------------------------------------------


def run_sweep(
    cfg: BenchConfig,
    methods: list[Method],
    *,
    results_path: Path | None = None,
    command_line: str = "",
    progress: bool = True,
) -> dict:
    """Run every (mode, N, method) of ``cfg``; returns the results document (also written to
    ``results_path`` after every row). ``doc["interrupted"]`` is True after Ctrl-C."""
    doc = {
        "schema": SCHEMA,
        "env": environment(cfg, command_line),
        "config": cfg.to_json(),
        "methods": [{"name": m.name, "kind": m.kind, "summary": m.summary,
                     "flops": None if callable(m.flops) else m.flops, "score_memory": m.score_memory}
                    for m in methods],
        "checks": [],
        "results": [],
        "interrupted": False,
        "finished": False,
    }
    rows: list[dict] = doc["results"]
    verdicts: dict[tuple[str, str], Verdict] = {}
    free = available_bytes(cfg.device)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    bar = _progress(len(cfg.modes) * len(cfg.seq_lens) * len(methods), progress)
    try:
        for mode in cfg.modes:
            for n in cfg.seq_lens:
                _run_group(cfg.case(mode, n), methods, cfg, verdicts, doc, free, bar, results_path)
        doc["finished"] = True
    except KeyboardInterrupt:
        doc["interrupted"] = True
    finally:
        torch.set_num_threads(old_threads)
        if bar is not None:
            bar.close()
        fill_derived(rows, cfg.second_yardstick)
        doc["env"]["load_average_end"] = _load()
        _write(doc, results_path)
    return doc


def _run_group(case: Case, methods: list[Method], cfg: BenchConfig, verdicts: dict, doc: dict,
               free: int | None, bar, results_path: Path | None) -> None:
    """All methods at one (mode, N): check, warm up and measure memory one by one, then time them
    interleaved. Rows go into ``doc`` as soon as they exist, so an interruption keeps them."""
    rows: list[dict] = doc["results"]
    tensors = make_tensors(case, cfg.seed)
    pending: list[tuple[dict, Prepared]] = []
    try:
        for method in methods:
            if bar is not None:
                bar.set_postfix_str(f"{case.mode} N={case.seq_len} {method.name}")
            row, prepared = _prepare_row(method, case, cfg, tensors, verdicts, doc, free)
            rows.append(row)
            if prepared is None:
                if bar is not None:
                    bar.update(1)
            else:
                pending.append((row, prepared))
            fill_derived(rows, cfg.second_yardstick)
            _write(doc, results_path)
        _time_group(pending, case, cfg, bar)
    finally:
        for row, _ in pending:
            if row["status"] == "ok" and row["median_s"] is None:
                row.update(status="interrupted", reason="interrupted before it was timed")
        if bar is not None:
            bar.update(len(pending))
        fill_derived(rows, cfg.second_yardstick)
        _write(doc, results_path)


def _prepare_row(method: Method, case: Case, cfg: BenchConfig, tensors: dict, verdicts: dict, doc: dict,
                 free: int | None) -> tuple[dict, Prepared | None]:
    row = {"level": case.level, "mode": case.mode, "seq_len": case.seq_len, "method": method.name,
           "status": "ok", "reason": "", "resolved": None, "median_s": None, "iqr_s": None, "samples": None,
           "calls_per_sample": None, "timer": None, "peak_bytes": None, "qkv_bytes": case.qkv_bytes(),
           "flops": None, "check_error": None, "check_tol": None, "foreign_cpu": None}
    try:
        reasons = method.unavailable(case)
    except Exception as exc:  # noqa: BLE001
        reasons = [f"availability check failed: {_short(exc)}"]
    if reasons:
        row.update(status="skipped", reason="; ".join(reasons))
        return row, None
    try:
        if method.resolve is not None:
            row["resolved"] = method.resolve(case)
        score_memory = method.score_memory
        if row["resolved"]:
            score_memory = (method.strategy_of or msd.ops.get_strategy)(row["resolved"]).score_memory
        relative = method.relative_flops(case)
        row["flops"] = case_flops(case, relative) if relative is not None else None
    except Exception as exc:  # noqa: BLE001
        row.update(status="error", reason=_short(exc))
        return row, None
    need = estimate_bytes(case, score_memory)
    if free is not None and need > cfg.mem_fraction * free:
        row.update(status="skipped", reason=f"would not fit: estimated {need / 2**30:.1f} GiB, "
                                            f"{free / 2**30:.1f} GiB free")
        return row, None

    key = (method.name, case.mode)
    if key not in verdicts:
        small = case.replace(seq_len=min(cfg.check_len, case.seq_len))
        verdicts[key] = check_method(method, small, cfg.seed)
        v = verdicts[key]
        doc["checks"].append({"method": method.name, "mode": case.mode, "seq_len": small.seq_len,
                              "status": v.status, "error": v.error, "tol": v.tol, "detail": v.detail})
    verdict = verdicts[key]
    row.update(check_error=verdict.error, check_tol=verdict.tol)
    if not verdict.ok:
        row.update(status=verdict.status, reason=f"correctness check: {verdict.detail}")
        return row, None
    try:
        prepared = _prepare_timed(method, case, cfg, tensors)
    except Exception as exc:  # noqa: BLE001 - a failure is a missing value with its error text
        row.update(status="error", reason=_short(exc))
        del exc
        gc.collect()  # the traceback's frames may hold the case's tensors in a cycle
        if case.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return row, None
    row["peak_bytes"] = prepared.peak_bytes
    return row, prepared


def _write(doc: dict, path: Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def load_results(path: str | os.PathLike) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a sdpadiff bench results file (schema {doc.get('schema')!r})")
    return doc
