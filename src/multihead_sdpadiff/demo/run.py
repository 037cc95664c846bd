"""Train the three attention kinds on the retrieval task and measure them on held-out data.

Everything here is deterministic given the config: model init uses ``torch.manual_seed(seed)``, the
training stream a generator seeded with ``seed`` (the same stream for every attention kind), and the
held-out sets generators seeded with ``eval_seed + noise`` (the same sets for every kind and seed).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models import DiffTransformer, DiffTransformerConfig
from .maps import combined_maps
from .metrics import REGIONS, SHARES, attention_shares, region_masks
from .task import TaskConfig, make_batch

__all__ = ["PRESETS", "DemoConfig", "available_models", "evaluate", "run_demo", "train_one"]

MODELS: tuple[str, ...] = ("standard", "diff", "diff_v2")


@dataclass
class DemoConfig:
    """Everything that decides the demo's numbers (saved with them in ``results.json``)."""

    models: tuple[str, ...] = MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    # task (calibrated on the standard baseline alone: it learns the training lengths, and longer
    # held-out contexts cost it accuracy; see docs/demo.md)
    num_pairs: int = 12
    num_queries: int = 4
    num_keys: int = 32
    num_values: int = 8
    num_noise_tokens: int = 16
    train_noise: int = 48  # each training batch draws its noise count uniformly from 0..train_noise
    eval_noise: tuple[int, ...] = (48, 96, 192, 384)  # held-out levels; all but the first are longer than training
    # model (the "standard" baseline's shape; match_params sizes the others to it)
    embed_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # optimisation, identical for every kind
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    # measurement
    eval_examples: int = 512
    attn_examples: int = 128
    curve_every: int = 50  # held-out accuracy at train_noise every this many steps (the training curve)
    curve_examples: int = 128
    eval_seed: int = 10_000
    threads: int = 2

    def __post_init__(self):
        self.models = tuple(self.models)
        self.seeds = tuple(self.seeds)
        self.eval_noise = tuple(self.eval_noise)
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"models must be a non-empty subset of {MODELS}, got {self.models}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not self.eval_noise:
            raise ValueError("eval_noise must not be empty")
        for value in (self.train_noise, *self.eval_noise):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DemoConfig.train_noise and eval_noise must be ints >= 0, got {value!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"DemoConfig.{name} must be a positive number, got {value!r}")
        for name in ("steps", "batch_size", "eval_examples", "attn_examples", "curve_every", "curve_examples",
                     "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DemoConfig.{name} must be a positive int, got {value!r}")
        _ = self.task  # validates the task fields

    @property
    def task(self) -> TaskConfig:
        return TaskConfig(self.num_pairs, self.num_queries, self.num_keys, self.num_values, self.num_noise_tokens)

    def model_config(self, attention: str) -> DiffTransformerConfig:
        longest = self.task.seq_len(max(self.train_noise, *self.eval_noise))
        return DiffTransformerConfig(vocab_size=self.task.vocab_size, embed_dim=self.embed_dim,
                                     num_layers=self.num_layers, num_heads=self.num_heads, attention=attention,
                                     match_params=True, max_seq_len=longest)


PRESETS: dict[str, dict] = {
    # 4 to 6 minutes on 2 shared CPU cores (two or three models).
    "default": {},
    # About 1.5 minutes: fewer steps, no L=406 and smaller held-out sets; the numbers are noisier.
    "quick": {"steps": 300, "eval_noise": (48, 96, 192), "eval_examples": 256, "attn_examples": 64,
              "curve_every": 25, "curve_examples": 64},
}


def available_models(models: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """``(runnable, skipped)``: ``"diff_v2"`` is skipped, with the reason, when this installation
    lacks ``multihead_sdpadiff.MultiheadDiffAttnV2``."""
    runnable, skipped = [], {}
    for name in models:
        try:  # on the meta device: nothing is allocated
            DiffTransformer(vocab_size=8, embed_dim=16, num_layers=1, num_heads=4, attention=name, device="meta")
        except ImportError as e:
            skipped[name] = str(e)
            continue
        runnable.append(name)
    return tuple(runnable), skipped


def _lr_factor(step: int, steps: int, warmup_frac: float) -> float:
    warmup = max(1, round(warmup_frac * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine down to 10 %


def _answer_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer ``(correct, nll)`` over the labelled positions, flattened over the batch."""
    pred = logits[:, :-1]  # position t predicts labels[:, t + 1]
    target = labels[:, 1:]
    keep = target != -100
    chosen = pred[keep].float()  # (n, V)
    gold = target[keep]
    correct = chosen.argmax(-1) == gold
    nll = torch.nn.functional.cross_entropy(chosen, gold, reduction="none")
    return correct, nll


@torch.no_grad()
def _accuracy(model: DiffTransformer, batch) -> tuple[float, float]:
    correct, nll = _answer_scores(model(batch.input_ids).logits, batch.labels)
    return correct.float().mean().item(), nll.mean().item()


def _eval_batch(config: DemoConfig, noise: int, n: int):
    return make_batch(config.task, n, noise, torch.Generator().manual_seed(config.eval_seed + noise))


def _final_query_rows(model: DiffTransformer, batch, chunk: int = 32) -> list[torch.Tensor]:
    """Each layer's ``(B, heads, L)`` attention row of the last query position.

    The full maps are materialised ``chunk`` sequences at a time to bound memory."""
    parts = []
    for start in range(0, batch.input_ids.shape[0], chunk):
        maps = combined_maps(model, batch.input_ids[start:start + chunk])
        last = batch.query_pos[start:start + chunk, -1].view(-1, 1, 1, 1)  # (b, 1, 1, 1)
        parts.append([m.gather(2, last.expand(-1, m.shape[1], 1, m.shape[3])).squeeze(2) for m in maps])
    return [torch.cat(layer) for layer in zip(*parts, strict=True)]


@torch.no_grad()
def evaluate(model: DiffTransformer, config: DemoConfig) -> dict:
    """Held-out accuracy, loss and attention shares at every ``eval_noise`` level.

    Accuracy and loss are over all ``num_queries`` answers of ``eval_examples`` sequences. The
    attention shares are those of the *last* query's row (see :mod:`.metrics`), averaged over the
    first ``attn_examples`` sequences, for every layer and head: ``attention[share][region]`` is a
    ``layers x heads`` nested list.
    """
    model.eval()
    out = {}
    for noise in config.eval_noise:
        batch = _eval_batch(config, noise, config.eval_examples)
        acc, loss = _accuracy(model, batch)
        sub = batch.__class__(*(t[: config.attn_examples] for t in batch))
        masks = region_masks(sub.kinds, sub.answer_pos[:, -1])  # the last query's answer
        rows = _final_query_rows(model, sub)
        shares = [attention_shares(r, masks) for r in rows]  # per layer
        attention = {s: {r: [layer[s][r].mean(0).tolist() for layer in shares] for r in REGIONS} for s in SHARES}
        out[str(noise)] = {"seq_len": config.task.seq_len(noise), "accuracy": acc, "loss": loss,
                           "attention": attention}
    return out


@torch.no_grad()
def example_rows(model: DiffTransformer, config: DemoConfig) -> dict:
    """The last query's attention rows of the first held-out sequence at ``train_noise``, for the
    side-by-side heatmap: ``rows`` is ``layers x heads x L``."""
    model.eval()
    batch = _eval_batch(config, config.train_noise, 1)
    rows = _final_query_rows(model, batch)
    return {"rows": [r[0].tolist() for r in rows], "tokens": batch.input_ids[0].tolist(),
            "kinds": batch.kinds[0].tolist(), "answer_pos": [int(batch.answer_pos[0, -1])],
            "query_pos": int(batch.query_pos[0, -1])}


def train_one(attention: str, seed: int, config: DemoConfig,
              on_step: Callable[[int, float], None] | None = None) -> tuple[DiffTransformer, dict]:
    """Train one model; return it and its training record (loss per step, held-out curve, time)."""
    torch.manual_seed(seed)
    model = DiffTransformer(config.model_config(attention))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.steps, config.warmup_frac))
    data = torch.Generator().manual_seed(seed)
    curve_batch = _eval_batch(config, config.train_noise, config.curve_examples)
    losses, curve = [], []
    start = time.perf_counter()
    for step in range(config.steps):
        model.train()
        noise = int(torch.randint(config.train_noise + 1, (1,), generator=data))
        batch = make_batch(config.task, config.batch_size, noise, data)
        loss = model(batch.input_ids, labels=batch.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % config.curve_every == 0 or step + 1 == config.steps:
            model.eval()
            curve.append([step + 1, _accuracy(model, curve_batch)[0]])
        if on_step is not None:
            on_step(step, losses[-1])
    record = {"loss": losses, "heldout_accuracy": curve, "train_seconds": time.perf_counter() - start,
              "num_parameters": model.num_parameters(),
              "parameter_breakdown": model.num_parameters(breakdown=True)}
    return model, record


class _Progress:
    """A tqdm bar when tqdm is installed and wanted, else a line every tenth of the way."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None], runs: int = 1):
        self.total, self.done, self.log, self.bar = total, 0, log, None
        self.runs, self.run, self.run_done, self.run_steps = runs, 0, 0, total // max(1, runs)
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        self.label = ""

    def step(self, loss: float) -> None:
        self.done += 1
        self.run_done += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.done % 20 == 0:
                self.bar.set_postfix_str(f"{self.label} loss {loss:.3f}", refresh=False)
        elif self.total >= 10 and self.done % (self.total // 10) == 0:
            # Each line names its run and the step within it: a new run starts from a high loss again.
            self.log(f"  run {self.run}/{self.runs} ({self.label}): step {self.run_done}/{self.run_steps}, "
                     f"loss {loss:.3f} [{self.done}/{self.total} steps overall]")

    def describe(self, label: str) -> None:
        self.label = label
        self.run += 1
        self.run_done = 0
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            self.log(f"run {self.run}/{self.runs}: {label}, training from scratch")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_demo(config: DemoConfig, *, progress: bool = True, log: Callable[[str], None] = print,
             command: str = "") -> dict:
    """Train and evaluate every (model, seed); return the results as a JSON-ready dict."""
    torch.set_num_threads(config.threads)
    models, skipped = available_models(config.models)
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    if not models:
        raise RuntimeError("none of the requested models can run here")
    for name in models:
        probe = DiffTransformer(config.model_config(name), device="meta")
        log(f"{name:>8}: {probe.num_parameters():,} parameters {probe.num_parameters(breakdown=True)}")

    bar = _Progress(len(models) * len(config.seeds) * config.steps, progress, log, runs=len(models) * len(config.seeds))
    load_start, cpu_start = _load_average(), time.process_time()
    runs: dict[str, dict[str, dict]] = {m: {} for m in models}
    example: dict[str, dict] = {}
    start = time.perf_counter()
    try:
        for seed in config.seeds:
            for name in models:
                bar.describe(f"{name} seed {seed}")
                model, record = train_one(name, seed, config, lambda _s, loss: bar.step(loss))
                t0 = time.perf_counter()
                record["eval"] = evaluate(model, config)
                record["eval_seconds"] = time.perf_counter() - t0
                if seed == config.seeds[0]:
                    example[name] = example_rows(model, config)
                runs[name][str(seed)] = record
    finally:
        bar.close()
    return {
        "format": "multihead_sdpadiff.demo/1",
        "command": command,
        "config": dataclasses.asdict(config),
        "task": {**dataclasses.asdict(config.task), "vocab_size": config.task.vocab_size,
                 "train_seq_len": [config.task.seq_len(0), config.task.seq_len(config.train_noise)]},
        "models": list(models),
        "skipped": skipped,
        "runs": runs,
        "example": example,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor(),
                        "threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32"},
        "wall_seconds": (wall := time.perf_counter() - start),
        "load": _load_record(load_start, time.process_time() - cpu_start, wall, torch.get_num_threads()),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def _load_record(start: list[float] | None, cpu_seconds: float, wall: float, threads: int) -> dict:
    """How busy the machine was: the 1-minute load averages around the run, and its CPU seconds
    against wall seconds × threads (below 1 when other processes took the CPUs, or when the run
    itself spent time in single-threaded Python)."""
    cores = os.cpu_count() or 1
    return {"load_average_start": start, "load_average_end": _load_average(), "cores": cores, "threads": threads,
            "cpu_seconds": cpu_seconds, "cpu_share": cpu_seconds / max(wall * min(threads, cores), 1e-9)}


