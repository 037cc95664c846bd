"""Summaries, ``report.md`` and the figures, all computed from the saved ``results.json``.

matplotlib is imported inside :func:`write_plots` only; without it the report is still written,
and says that the figures were skipped.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from .metrics import REGIONS

__all__ = ["FIGURES", "load_results", "summarize", "write_plots", "write_report"]

FIGURES: dict[str, str] = {
    "accuracy_vs_length.png": "Held-out accuracy against sequence length",
    "attention_answer_vs_noise.png": "Last query's attention: share on the answer against share on noise",
    "attention_example.png": "One held-out example: the last query's attention row in every layer and head",
    "training_curves.png": "Training loss and held-out accuracy during training",
}
_COLORS = {"standard": "tab:blue", "diff": "tab:red", "diff_v2": "tab:green"}


def load_results(folder: str | os.PathLike) -> dict:
    with open(Path(folder) / "results.json") as f:
        return json.load(f)


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def _retrieval_head(run: dict, first_noise: str) -> tuple[int, int]:
    """``(layer, head)`` with the largest ``abs`` answer share at the first held-out level."""
    shares = run["eval"][first_noise]["attention"]["abs"]["answer"]  # layers x heads
    return max(((i, h) for i, layer in enumerate(shares) for h in range(len(layer))),
               key=lambda ih: shares[ih[0]][ih[1]])


def summarize(results: dict) -> dict:
    """Mean, std (over seeds, n - 1), min and max of every headline number, per model and noise level.

    Attention numbers are those of each seed's **retrieval head**: the (layer, head) with the
    largest ``abs`` answer share at the first held-out level, kept at the other levels (``*_head``),
    and the mean over the heads of that layer (``*_mean``).
    """
    noises = [str(n) for n in results["config"]["eval_noise"]]
    out = {}
    for model in results["models"]:
        runs = list(results["runs"][model].values())
        heads = [_retrieval_head(r, noises[0]) for r in runs]
        per_noise = {}
        for n in noises:
            evs = [r["eval"][n] for r in runs]
            row = {"seq_len": evs[0]["seq_len"], "accuracy": _stats([e["accuracy"] for e in evs]),
                   "loss": _stats([e["loss"] for e in evs])}
            for share in ("abs", "pos"):
                for region in REGIONS:
                    row[f"{share}_{region}_head"] = _stats(
                        [e["attention"][share][region][i][h] for e, (i, h) in zip(evs, heads, strict=True)])
                    row[f"{share}_{region}_mean"] = _stats(
                        [statistics.fmean(e["attention"][share][region][i]) for e, (i, _) in
                         zip(evs, heads, strict=True)])
            per_noise[n] = row
        reached = [next((step for step, acc in r["heldout_accuracy"] if acc >= 0.99), math.inf) for r in runs]
        out[model] = {"num_parameters": runs[0]["num_parameters"], "retrieval_heads": heads, "noise": per_noise,
                      "train_seconds": _stats([r["train_seconds"] for r in runs]), "steps_to_99": reached}
    return out


def _pm(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def _verdict(a: dict, b: dict, higher_is_better: bool = True) -> str:
    """Compare two ``_stats`` dicts: a "clear" difference needs the seed ranges not to overlap."""
    if a["min"] > b["max"]:
        return "higher on every seed" + ("" if higher_is_better else " (worse)")
    if a["max"] < b["min"]:
        return "lower on every seed" + ("" if higher_is_better else " (better)")
    return "within the seed spread (ranges overlap)"


def _conclusions(results: dict, summary: dict) -> list[str]:
    if "standard" not in summary:
        return ["No standard baseline was run, so there is nothing to compare against."]
    noises = [str(n) for n in results["config"]["eval_noise"]]
    lines = []
    base = summary["standard"]["noise"]
    for model in (m for m in summary if m != "standard"):
        mine = summary[model]["noise"]
        for n in noises:
            a, b = mine[n]["accuracy"], base[n]["accuracy"]
            lines.append(f"- `{model}` vs `standard`, accuracy at length {mine[n]['seq_len']}: "
                         f"{a['mean']:.3f} vs {b['mean']:.3f} ({a['mean'] - b['mean']:+.3f}); {model} is "
                         f"{_verdict(a, b)}.")
        for n in dict.fromkeys((noises[0], noises[-1])):
            at = f"at length {mine[n]['seq_len']}"
            for share, what in (("abs", "absolute attention"), ("pos", "the positive part")):
                a, b = mine[n][f"{share}_answer_head"], base[n][f"{share}_answer_head"]
                lines.append(f"- `{model}` vs `standard` {at}, retrieval head's share of {what} on the answer: "
                             f"{a['mean']:.3f} vs {b['mean']:.3f}; {model} is {_verdict(a, b)}.")
                a, b = mine[n][f"{share}_noise_head"], base[n][f"{share}_noise_head"]
                lines.append(f"- `{model}` vs `standard` {at}, retrieval head's share of {what} on noise tokens: "
                             f"{a['mean']:.3f} vs {b['mean']:.3f}; {model} is "
                             f"{_verdict(a, b, higher_is_better=False)}.")
    best = max(base.values(), key=lambda r: r["accuracy"]["mean"])["accuracy"]["mean"]
    if best < 0.9:
        lines.append(f"- The baseline reaches at most {best:.3f} accuracy: at this budget the task is not "
                     f"solved, so the comparison is between partly trained models.")
    return lines


def _ranked_heads_table(results: dict) -> list[str]:
    """Per model and layer, heads ranked by answer share (per seed), then averaged over seeds."""
    n = str(results["config"]["eval_noise"][0])
    lines = ["| model | layer | heads ranked by answer share: answer / noise (abs shares, mean over seeds) |",
             "|---|---|---|"]
    for model in results["models"]:
        runs = list(results["runs"][model].values())
        layers = len(runs[0]["eval"][n]["attention"]["abs"]["answer"])
        for layer in range(layers):
            ranked = []
            for r in runs:
                att = r["eval"][n]["attention"]["abs"]
                order = sorted(range(len(att["answer"][layer])), key=lambda h, a=att: -a["answer"][layer][h])
                ranked.append([(att["answer"][layer][h], att["noise"][layer][h]) for h in order])
            cells = [f"{statistics.fmean(x[k][0] for x in ranked):.3f} / {statistics.fmean(x[k][1] for x in ranked):.3f}"
                     for k in range(len(ranked[0]))]
            lines.append(f"| {model} | {layer} | {' · '.join(cells)} |")
    return lines


def was_busy(load: dict) -> bool:
    """The bench's rule (``bench.report._busy``): at the start the load average is other processes';
    at the end it includes this run's own threads."""
    cores = load.get("cores") or 1
    before, after = load.get("load_average_start"), load.get("load_average_end")
    return bool((before and before[0] > 0.5 * cores + 0.25) or (after and after[0] > cores + 1))


def describe_load(load: dict | None) -> str:
    """One sentence on how busy the machine was during the run."""
    if not load:
        return "Machine load: not recorded (results written before it was)."
    la, lb = load.get("load_average_start"), load.get("load_average_end")
    text = (f"Machine load: 1-minute load average {la[0] if la else '?'} at the start and {lb[0] if lb else '?'} at "
            f"the end, on {load['cores']} cores; the run's CPU time was {load['cpu_share']:.0%} of wall time × "
            f"{load['threads']} threads.")
    if was_busy(load):
        text += (" **Other processes were using the CPUs, so the wall time is inflated. The accuracies and losses "
                 "do not depend on it (same seeds, same numbers).**")
    return text


def write_report(results: dict, folder: str | os.PathLike, figures: list[str] | None = None,
                 figure_note: str = "") -> Path:
    """Write ``report.md`` into ``folder`` from ``results``; return its path."""
    folder = Path(folder)
    summary = summarize(results)
    cfg, task, env = results["config"], results["task"], results["environment"]
    noises = [str(n) for n in cfg["eval_noise"]]
    lens = {n: summary[results["models"][0]]["noise"][n]["seq_len"] for n in noises}
    L = []
    L.append("# Differential attention on multi-query associative recall with noise\n")
    L.append("Written by `sdpadiff demo` from `results.json` in this folder. Every number below is the mean "
             "± the standard deviation over seeds (n − 1); the JSON holds every seed's value.\n")
    L.append(f"Command: `{results['command'] or '(not recorded)'}`\n")
    L.append(f"Seeds: {', '.join(str(s) for s in cfg['seeds'])}. torch {env['torch']}, {env['device']}, "
             f"{env['threads']} threads, {env['dtype']}. Wall time {results['wall_seconds']:.0f} s.\n")
    load_line = describe_load(results.get("load"))
    if load_line:
        L.append(load_line + "\n")
    if results["skipped"]:
        for name, why in results["skipped"].items():
            L.append(f"**`{name}` was not run:** {why}\n")
    L.append("## Setup\n")
    L.append(f"- Task: {task['num_pairs']} key→value pair tokens (one token per pair; {task['num_keys']} keys, "
             f"{task['num_values']} values) and noise tokens (from {task['num_noise_tokens']} noise ids) in random "
             f"order, then {task['num_queries']} queries, each a key of the context; after each query the model "
             f"must emit that key's pair token (key and value).")
    L.append(f"- Training: noise drawn uniformly from 0..{cfg['train_noise']} per batch, so sequence lengths "
             f"{task['train_seq_len'][0]}–{task['train_seq_len'][1]}. Held-out noise levels "
             f"{', '.join(noises)} (lengths {', '.join(str(lens[n]) for n in noises)}); everything past "
             f"{task['train_seq_len'][1]} is longer than any training sequence.")
    L.append(f"- Models: {cfg['num_layers']} layers, width {cfg['embed_dim']}, `num_heads={cfg['num_heads']}` "
             f"(standard: {cfg['num_heads']} heads; diff: {cfg['num_heads'] // 2} differential heads, each two "
             f"maps), `match_params=True`. Parameters: "
             + ", ".join(f"{m} {summary[m]['num_parameters']:,}" for m in results["models"]) + ".")
    L.append(f"- Optimisation, the same for every model: AdamW (lr {cfg['lr']}, betas 0.9/0.98, weight decay "
             f"{cfg['weight_decay']}), {cfg['warmup_frac']:.0%} linear warmup then cosine to 10 %, gradient clip "
             f"{cfg['grad_clip']}, {cfg['steps']} steps of {cfg['batch_size']} sequences. The same training "
             f"stream per seed for every model; the same held-out sets for every model and seed "
             f"({cfg['eval_examples']} sequences per level, attention over the first {cfg['attn_examples']}).\n")
    L.append("## Accuracy and loss on held-out data\n")
    L.append("Accuracy and loss over all answers (every query of every held-out sequence).\n")
    L.append("| model | params | " + " | ".join(f"acc. L={lens[n]}" for n in noises) + " | "
             + " | ".join(f"loss L={lens[n]}" for n in noises) + " |")
    L.append("|---|---|" + "---|" * (2 * len(noises)))
    for m in results["models"]:
        s = summary[m]["noise"]
        L.append(f"| {m} | {summary[m]['num_parameters']:,} | " + " | ".join(_pm(s[n]["accuracy"]) for n in noises)
                 + " | " + " | ".join(_pm(s[n]["loss"]) for n in noises) + " |")
    L.append("")
    L.append(f"Training steps until the held-out accuracy at L={lens[noises[0]]} first reaches 0.99 (checked every "
             f"{cfg['curve_every']} steps on {cfg['curve_examples']} sequences; inf: never), per seed: "
             + "; ".join(f"{m} {', '.join(str(x) for x in summary[m]['steps_to_99'])}" for m in results["models"])
             + ".\n")
    L.append("## Where the last query's attention goes\n")
    L.append("For the last query of each sequence, the row of the map that multiplies the values: the softmax for "
             "`standard`, `A1 − λ·A2` for `diff` (one λ per layer) and `A_even − λ_t·A_odd` for `diff_v2` (λ per "
             "token and head). Positions are split into the **answer** (the pair token that holds the queried key), "
             "**distractors** (the other pair tokens), **noise** and **other** (BOS, SEP, the query section).\n")
    L.append("- **abs share** = Σ_region |a| / Σ |a|: a negative weight counts by its size, as attention paid.")
    L.append("- **pos share** = Σ_region max(a, 0) / Σ max(a, 0): the positive part only.")
    L.append("- For a softmax both equal the plain attention mass. No other normalisation is applied (the paper's "
             "figures show normalised scores; this demo does not try to reproduce that normalisation).")
    L.append("- **retrieval head**: per seed, the (layer, head) with the largest abs answer share at "
             f"L={lens[noises[0]]}, kept at the other lengths (picked on the held-out data it is scored on; with "
             "twice as many heads to pick from, `standard` gains slightly from this). **mean of heads**: the mean "
             "over that layer's heads. Retrieval heads (layer, head) per seed: "
             + "; ".join(f"{m} {', '.join(f'({i}, {h})' for i, h in summary[m]['retrieval_heads'])}"
                         for m in results["models"]) + ".\n")
    L.append("Retrieval head:\n")
    L.append("| model | L | answer (abs) | noise (abs) | distractors (abs) | answer (pos) | noise (pos) | "
             "distractors (pos) |")
    L.append("|---|---|---|---|---|---|---|---|")
    for m in results["models"]:
        for n in noises:
            s = summary[m]["noise"][n]
            L.append(f"| {m} | {s['seq_len']} | " + " | ".join(
                _pm(s[f"{k}_{r}_head"]) for k in ("abs", "pos") for r in ("answer", "noise", "distractor")) + " |")
    L.append("")
    L.append("Mean over the heads of the retrieval head's layer:\n")
    L.append("| model | L | answer (abs) | noise (abs) | answer (pos) | noise (pos) |")
    L.append("|---|---|---|---|---|---|")
    for m in results["models"]:
        for n in noises:
            s = summary[m]["noise"][n]
            L.append(f"| {m} | {s['seq_len']} | " + " | ".join(
                _pm(s[f"{k}_{r}_mean"]) for k in ("abs", "pos") for r in ("answer", "noise")) + " |")
    L.append("")
    L.append(f"Every layer, heads ranked by their answer share at L={lens[noises[0]]} (head identities differ "
             "between seeds, so heads are ranked within each seed before averaging):\n")
    L.extend(_ranked_heads_table(results))
    L.append("")
    L.append("## What the numbers say\n")
    L.append("A difference is called clear only when the seeds' ranges do not overlap.\n")
    L.extend(_conclusions(results, summary))
    L.append("")
    L.append("## Figures\n")
    if figures:
        for name in figures:
            L.append(f"![{FIGURES.get(name, name)}]({name})\n")
    else:
        L.append(f"No figures: {figure_note or 'not drawn'}.\n")
    L.append("## Runtime\n")
    L.append("| model | training seconds per seed |\n|---|---|")
    for m in results["models"]:
        L.append(f"| {m} | {_pm(summary[m]['train_seconds'], digits=1)} |")
    L.append("")
    path = folder / "report.md"
    path.write_text("\n".join(L))
    return path


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_plots(results: dict, folder: str | os.PathLike) -> list[str]:
    """Draw :data:`FIGURES` into ``folder`` from ``results``; return the file names written.

    Raises ImportError with a clear message when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap, SymLogNorm
    except ImportError as e:
        raise ImportError("the demo's figures need matplotlib (pip install matplotlib); results.json and "
                          "report.md are written without it") from e
    folder = Path(folder)
    summary = summarize(results)
    models = results["models"]
    noises = [str(n) for n in results["config"]["eval_noise"]]
    train_hi = results["task"]["train_seq_len"][1]
    written = []

    # 1. accuracy against length
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m in models:
        s = summary[m]["noise"]
        ax.errorbar([s[n]["seq_len"] for n in noises], [s[n]["accuracy"]["mean"] for n in noises],
                    yerr=[s[n]["accuracy"]["std"] for n in noises], marker="o", capsize=3, label=m,
                    color=_COLORS.get(m))
    ax.axvspan(results["task"]["train_seq_len"][0], train_hi, color="0.9", zorder=0, label="training lengths")
    ax.set_xlabel("sequence length (more noise tokens →)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_length.png", dpi=100)
    plt.close(fig)
    written.append("accuracy_vs_length.png")

    # 2. answer share against noise share, retrieval head, both definitions
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, share, title in ((axes[0], "abs", "share of |a|"), (axes[1], "pos", "share of max(a, 0)")):
        for m in models:
            s = summary[m]["noise"]
            xs = [s[n][f"{share}_noise_head"] for n in noises]
            ys = [s[n][f"{share}_answer_head"] for n in noises]
            ax.errorbar([x["mean"] for x in xs], [y["mean"] for y in ys], xerr=[x["std"] for x in xs],
                        yerr=[y["std"] for y in ys], marker="o", capsize=2, label=m, color=_COLORS.get(m))
            for x, y, n in zip(xs, ys, noises, strict=True):
                ax.annotate(f"L={s[n]['seq_len']}", (x["mean"], y["mean"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(f"{title} on noise tokens")
        ax.set_title(f"retrieval head, {title}", fontsize=10)
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share on the answer")
    axes[0].legend(fontsize=8)
    fig.suptitle("Last query's attention (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "attention_answer_vs_noise.png", dpi=100)
    plt.close(fig)
    written.append("attention_answer_vs_noise.png")

    # 3. one example, side by side
    ex = results["example"]
    shown = [m for m in models if m in ex]
    if shown:
        vmax = max(abs(v) for m in shown for layer in ex[m]["rows"] for head in layer for v in head) or 1.0
        norm = SymLogNorm(linthresh=1e-2, vmin=-vmax, vmax=vmax)  # small weights on noise stay visible
        fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.1 + 0.9 * len(shown) * 1.6), squeeze=False)
        kind_cmap = ListedColormap(["0.5", "tab:orange", "0.85", "tab:purple"])  # KIND_NAMES order
        for ax, m in zip(axes[:, 0], shown, strict=True):
            e = ex[m]
            rows = [head for layer in e["rows"] for head in layer]
            labels = [f"L{i} h{h}" for i, layer in enumerate(e["rows"]) for h in range(len(layer))]
            length = e["query_pos"] + 1
            img = ax.imshow([r[:length] for r in rows] + [[math.nan] * length], aspect="auto", cmap="RdBu_r",
                            norm=norm, interpolation="nearest")
            ax.imshow([[math.nan] * length] * len(rows) + [e["kinds"][:length]], aspect="auto", cmap=kind_cmap,
                      vmin=-0.5, vmax=3.5, interpolation="nearest")
            ax.set_yticks(range(len(rows) + 1), labels + ["token kind"], fontsize=7)
            for p in e["answer_pos"]:
                ax.axvline(p, color="k", lw=0.6, ls=":")
            ax.set_title(f"{m}: last query's attention row (dotted line: the answer's pair token; colour scale "
                         f"linear within ±0.01, logarithmic beyond)", fontsize=9)
            fig.colorbar(img, ax=ax, fraction=0.02, pad=0.01)
        axes[-1, 0].set_xlabel("key position (token kind strip: dark grey BOS/SEP, orange pair, light grey noise, "
                               "purple query section)", fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "attention_example.png", dpi=100)
        plt.close(fig)
        written.append("attention_example.png")

    # 4. training curves
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for m in models:
        runs = list(results["runs"][m].values())
        window = max(1, len(runs[0]["loss"]) // 40)
        smooth = [_smooth(r["loss"], window) for r in runs]
        steps = range(1, len(smooth[0]) + 1)
        mean = [statistics.fmean(col) for col in zip(*smooth, strict=True)]
        a1.plot(steps, mean, label=m, color=_COLORS.get(m))
        a1.fill_between(steps, [min(c) for c in zip(*smooth, strict=True)], [max(c) for c in zip(*smooth, strict=True)], alpha=0.2,
                        color=_COLORS.get(m))
        xs = [p[0] for p in runs[0]["heldout_accuracy"]]
        accs = [[p[1] for p in r["heldout_accuracy"]] for r in runs]
        a2.plot(xs, [statistics.fmean(c) for c in zip(*accs, strict=True)], label=m, color=_COLORS.get(m))
        a2.fill_between(xs, [min(c) for c in zip(*accs, strict=True)], [max(c) for c in zip(*accs, strict=True)], alpha=0.2,
                        color=_COLORS.get(m))
    a1.set_xlabel("step")
    a1.set_yscale("log")  # the loss falls by orders of magnitude once the task is learned
    a1.set_ylabel(f"training loss (moving mean of {window})")
    a1.legend(fontsize=8)
    a2.set_xlabel("step")
    a2.set_ylabel(f"held-out accuracy, L={summary[models[0]]['noise'][noises[0]]['seq_len']}")
    a2.set_ylim(0, 1)
    fig.suptitle("Mean over seeds, band: min–max", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "training_curves.png", dpi=100)
    plt.close(fig)
    written.append("training_curves.png")
    return written
