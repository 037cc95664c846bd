"""The demo says how busy the machine was, and its plain log names the run of every line."""

from __future__ import annotations

from multihead_sdpadiff.demo.report import describe_load
from multihead_sdpadiff.demo.run import _load_record, _Progress


def test_plain_progress_names_each_run_and_its_own_step():
    lines = []
    bar = _Progress(total=40, enabled=False, log=lines.append, runs=2)
    for label in ("standard seed 0", "diff seed 0"):
        bar.describe(label)
        for i in range(20):
            bar.step(3.0 - 0.1 * i)
    assert lines[0] == "run 1/2: standard seed 0, training from scratch"
    assert "run 2/2: diff seed 0, training from scratch" in lines
    first_of_run2 = lines[lines.index("run 2/2: diff seed 0, training from scratch") + 1]
    assert first_of_run2.startswith("  run 2/2 (diff seed 0): step 4/20, loss")
    assert first_of_run2.endswith("[24/40 steps overall]")


def test_load_is_recorded_and_a_busy_machine_is_said_to_be():
    rec = _load_record([0.1, 0.1, 0.1], cpu_seconds=10.0, wall=10.0, threads=2)
    assert rec["cpu_share"] == 10.0 / (10.0 * min(2, rec["cores"]))
    quiet = dict(rec, load_average_start=[0.1, 0, 0], load_average_end=[2.0, 0, 0], cores=2)
    busy = dict(quiet, load_average_start=[7.5, 6, 3])
    assert "inflated" not in describe_load(quiet)
    assert "1-minute load average 7.5 at the start" in describe_load(busy)
    assert "Other processes were using the CPUs" in describe_load(busy)
    assert describe_load(None).startswith("Machine load: not recorded")
