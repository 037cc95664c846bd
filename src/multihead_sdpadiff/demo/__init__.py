"""A small, reproducible experiment for the paper's claim that differential attention cancels
attention noise: multi-query associative recall with noise tokens, on a CPU in minutes.

``sdpadiff demo`` (or ``python -m multihead_sdpadiff.demo``) trains ``"standard"``, ``"diff"`` and
``"diff_v2"`` models of matched size on the same data, measures held-out accuracy, loss and the share
of the last query's attention that lands on the answer, and writes ``results.json``, figures and
``report.md``. See ``docs/demo.md``.

Importing this package imports neither matplotlib nor tqdm; they are loaded when a report is drawn
or a progress bar shown.
"""

from .metrics import REGIONS, SHARES, attention_shares, region_masks
from .run import PRESETS, DemoConfig, evaluate, run_demo, train_one
from .task import KIND_NAMES, Batch, TaskConfig, make_batch

__all__ = [
    "KIND_NAMES",
    "PRESETS",
    "REGIONS",
    "SHARES",
    "Batch",
    "DemoConfig",
    "TaskConfig",
    "attention_shares",
    "evaluate",
    "make_batch",
    "region_masks",
    "run_demo",
    "train_one",
]
