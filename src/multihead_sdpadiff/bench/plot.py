"""Plots drawn from a results file, never from live numbers: time, ratio to standard (and to a
second yardstick when the run has one), peak memory, each against sequence length, one panel per
mode. matplotlib is optional and imported here only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .report import BUSY_SHARE

# (file name, y label, value of a row, log base of the y axis)
PLOTS = (
    ("time", "median time per call (ms)", lambda r: r["median_s"] * 1e3, 10),
    ("ratio", "time / standard (same run)", lambda r: r["ratio"], 2),
    ("memory", "peak memory growth (MiB)", lambda r: r["peak_bytes"] / 2**20, 10),
)


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


#: The legend entry of the points marked as timed under load (the table's ``*``).
BUSY_LABEL = f"* timed while other processes used > {BUSY_SHARE:.0%} of the CPUs (inflated)"


def is_busy(r: dict) -> bool:
    """The table's ``*``: other processes used more than :data:`BUSY_SHARE` of the CPUs meanwhile."""
    return (r.get("foreign_cpu") or 0) > BUSY_SHARE


def plots_of(doc: dict) -> tuple:
    """:data:`PLOTS`, plus ``ratio-<name>`` (time / that method's, ``ratio_second``) when the run
    has a second yardstick (``--op gda``: ``v1_auto``), in the order they are drawn."""
    second = doc["config"].get("second_yardstick")
    if not second:
        return PLOTS
    return (*PLOTS[:2], (f"ratio-{second}", f"time / {second} (same run)", lambda r: r["ratio_second"], 2),
            *PLOTS[2:])


def plot_results(doc: dict, out_dir: str | Path) -> list[Path]:
    """Write ``time.png``, ``ratio.png`` and ``memory.png`` into ``out_dir`` (and, with a second
    yardstick, ``ratio-<name>.png``: see :func:`plots_of`); returns their paths.

    Points timed under load (the table's ``*`` rows) are circled in red, with a legend entry."""
    if not have_matplotlib():
        raise RuntimeError("plotting needs matplotlib (pip install matplotlib)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ylabel, value, log_base in plots_of(doc):
        fig = make_figure(doc, name, ylabel, value, log_base)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def make_figure(doc: dict, name: str, ylabel: str, value, log_base: int):
    """One of :data:`PLOTS` as a matplotlib figure (one panel per mode); the caller closes it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    rows = [r for r in doc["results"] if r["status"] == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in doc["results"])) or ["fwd"]
    methods = list(dict.fromkeys(r["method"] for r in doc["results"]))
    env, cfg = doc["env"], doc["config"]
    title = (f"{cfg['level']} level, {env['device_name']}, {env['dtype']}, {env['threads']} threads, "
             f"B={cfg['batch']} E={cfg['embed_dim']} heads={cfg['num_heads']}/{cfg['num_kv_heads']}")
    if cfg.get("note"):  # what the heads mean for this op (--op gda)
        title += f"\n{cfg['note']}"
    timed = name != "memory"  # load inflates times, not peak memory
    busy_rows = [r for r in rows if timed and is_busy(r) and _has(r, name)]
    if busy_rows:
        worst = max(r["foreign_cpu"] for r in busy_rows)
        title += f"\n{len(busy_rows)} points (circled) timed under load, other processes up to {worst:.0%} of the CPUs"
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for i, method in enumerate(methods):
            pts = sorted((r["seq_len"], value(r), timed and is_busy(r)) for r in rows
                         if r["mode"] == mode and r["method"] == method and _has(r, name))
            if not pts:
                continue
            xs, ys, busy = zip(*pts, strict=True)
            style = {"color": "black", "linestyle": "--"} if method == "standard" else {"color": f"C{i}"}
            ax.plot(xs, ys, marker="o", markersize=3, label=method, **style)
            bx = [x for x, b in zip(xs, busy, strict=True) if b]
            by = [y for y, b in zip(ys, busy, strict=True) if b]
            if bx:
                ax.scatter(bx, by, s=70, facecolors="none", edgecolors="red", linewidths=1.2, zorder=3,
                           label=BUSY_LABEL, gid="busy")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=log_base)
        if log_base == 2:  # ratios read better as 1, 2, 4 than as 2^0, 2^1, 2^2
            ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_title(mode, fontsize=9)
        ax.set_xlabel("sequence length N", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    legend = {}  # label -> handle, each label once, the load marker last
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    if BUSY_LABEL in legend:
        legend[BUSY_LABEL] = legend.pop(BUSY_LABEL)
    handles, labels = list(legend.values()), list(legend)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def _has(r: dict, name: str) -> bool:
    key = {"time": "median_s", "ratio": "ratio", "memory": "peak_bytes"}.get(name, "ratio_second")
    return r.get(key) is not None
