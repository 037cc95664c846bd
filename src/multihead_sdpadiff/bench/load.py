"""``sdpadiff bench --load``: time under a known foreign load, one busy process on one core.

A kernel split into many small multi-threaded calls waits at every barrier for the thread that
shares its core with the other process; one parallel pass per call waits once. The ratio to
standard attention under the same load shows which kind a strategy is.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

_SPIN = "import os, sys\ntry:\n    os.sched_setaffinity(0, {int(sys.argv[1])})\nexcept (AttributeError, OSError):\n    pass\nwhile True:\n    pass\n"


@contextlib.contextmanager
def busy_core(core: int = 0):
    """Run a process that spins on ``core`` (pinned where the OS allows) for the duration of the block."""
    proc = subprocess.Popen([sys.executable, "-c", _SPIN, str(core % (os.cpu_count() or 1))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def compare(quiet: dict, loaded: dict) -> str:
    """A table of each method's ratio to standard without and with the load, from two results documents."""
    def ratios(doc):
        return {(r["mode"], r["seq_len"], r["method"]): r["ratio"] for r in doc["results"] if r.get("ratio")}

    a, b = ratios(quiet), ratios(loaded)
    keys = [k for k in a if k in b]
    if not keys:
        return "(no case was timed both without and with the load)"
    width = max(len(k[2]) for k in keys)
    lines = [f"{'mode':8} {'N':>6}  {'method':{width}}  ratio quiet  ratio loaded  loaded/quiet"]
    for mode, n, name in keys:
        qa, qb = a[(mode, n, name)], b[(mode, n, name)]
        lines.append(f"{mode:8} {n:>6}  {name:{width}}  {qa:11.2f}x  {qb:11.2f}x  {qb / qa:11.2f}")
    return "\n".join(lines)
