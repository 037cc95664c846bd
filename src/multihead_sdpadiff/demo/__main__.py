"""``python -m multihead_sdpadiff.demo``: the same as ``sdpadiff demo``."""

from .cli import main

raise SystemExit(main(prog="python -m multihead_sdpadiff.demo"))
