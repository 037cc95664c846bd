"""The bench's plots mark the points timed under load, as its table marks those rows with ``*``."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")


def _doc():
    rows = []
    for method, busy in (("standard", 0.0), ("chunked", 0.68), ("auto", 0.01)):
        for n in (512, 1024):
            rows.append({"method": method, "mode": "fwd", "seq_len": n, "status": "ok", "median_s": 0.01 * n / 512,
                         "ratio": 1.5, "peak_bytes": 2**20, "foreign_cpu": busy if n == 1024 else 0.0})
    env = {"device_name": "cpu", "dtype": "float32", "threads": 2}
    cfg = {"level": "op", "batch": 1, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 4}
    return {"results": rows, "env": env, "config": cfg}


def test_busy_points_are_circled_with_one_legend_entry(tmp_path):
    import matplotlib.pyplot as plt

    from multihead_sdpadiff.bench.plot import BUSY_LABEL, PLOTS, make_figure, plot_results

    for name, ylabel, value, log_base in PLOTS:
        fig = make_figure(_doc(), name, ylabel, value, log_base)
        marked = [c for ax in fig.axes for c in ax.collections if c.get_gid() == "busy"]
        labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        if name == "memory":  # load inflates times, not memory
            assert not marked and BUSY_LABEL not in labels
        else:
            assert len(marked) == 1 and marked[0].get_offsets().tolist() == [[1024, value(_doc()["results"][3])]]
            assert labels.count(BUSY_LABEL) == 1 and "timed under load" in fig._suptitle.get_text()
        plt.close(fig)
    assert [p.name for p in plot_results(_doc(), tmp_path)] == ["time.png", "ratio.png", "memory.png"]
