"""The ``sdpadiff`` command line: ``sdpadiff check``, ``sdpadiff bench`` and ``sdpadiff demo``."""

from __future__ import annotations

import argparse
import sys

import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check(argv: list[str]) -> int:
    from .check import format_table, run_check

    p = argparse.ArgumentParser(prog="sdpadiff check", description=(
        "Run every strategy against the float64 reference on this device and print the errors."))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    args = p.parse_args(argv)
    rows = run_check(args.device, _DTYPES[args.dtype])
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}")
    print(format_table(rows))
    failed = [r for r in rows if r["status"] == "FAIL" or r["status"].startswith("error")]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _bench(argv: list[str]) -> int:
    from .bench.cli import main as bench_main  # imported lazily: it pulls in the timing machinery

    return bench_main(argv)


def _demo(argv: list[str]) -> int:
    from .demo.cli import main as demo_main  # imported lazily: it trains models and draws figures

    return demo_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"check": _check, "bench": _bench, "demo": _demo}
    if not argv or argv[0] not in commands:
        print(f"usage: sdpadiff {{{','.join(commands)}}} [options]  (sdpadiff COMMAND --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
