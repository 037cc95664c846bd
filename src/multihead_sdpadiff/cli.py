"""The ``sdpadiff`` command line: ``sdpadiff check``, ``sdpadiff bench``, ``sdpadiff build`` and ``sdpadiff demo``."""

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


def _build(argv: list[str]) -> int:
    from .ops import cpu_fused

    p = argparse.ArgumentParser(prog="sdpadiff build", description=(
        "Compile the cpu_fused C++ kernel now (it is otherwise compiled on first use) and print where "
        "the library lives. Cached across processes in torch's extension folder (TORCH_EXTENSIONS_DIR)."))
    p.parse_args(argv)
    reasons = cpu_fused.not_supported_reasons()
    if reasons:
        print("cpu_fused cannot be built here: " + "; ".join(reasons), file=sys.stderr)
        return 1
    try:
        path = cpu_fused.build()
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    tag, _ = cpu_fused.capability_flags()
    print(f"cpu_fused kernel ({tag}, torch {torch.__version__}): {path}")
    return 0


def _demo(argv: list[str]) -> int:
    from .demo.cli import main as demo_main  # imported lazily: it trains models and draws figures

    return demo_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"check": _check, "bench": _bench, "build": _build, "demo": _demo}
    if not argv or argv[0] not in commands:
        print(f"usage: sdpadiff {{{','.join(commands)}}} [options]  (sdpadiff COMMAND --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
