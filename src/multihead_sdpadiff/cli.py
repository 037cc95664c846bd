"""The ``sdpadiff`` command line: ``sdpadiff check``, ``sdpadiff bench``, ``sdpadiff build`` and ``sdpadiff demo``."""

from __future__ import annotations

import argparse
import sys

import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check(argv: list[str]) -> int:
    from .check import count_rows, format_table, run_check

    p = argparse.ArgumentParser(prog="sdpadiff check", description=(
        "Run every strategy against the float64 reference on this device and print the errors."))
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: torch sees no CUDA device here")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as exc:
        p.error(f"--device {device}: {exc}")
    rows = run_check(device, _DTYPES[args.dtype])
    print(f"torch {torch.__version__}, device {device}, dtype {args.dtype}")
    print(format_table(rows))
    counts = count_rows(rows)
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] else 0


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


#: Each subcommand, its function and the line the top-level help shows for it.
COMMANDS = {
    "check": (_check, "run every strategy against the float64 reference on this device; print the errors"),
    "bench": (_bench, "time every strategy against standard attention of the same width; "
                      "write results.json and plots"),
    "build": (_build, "compile the cpu_fused C++ kernel now (otherwise compiled on first use); print its path"),
    "demo": (_demo, "train standard, diff and diff_v2 models on a noisy recall task; write report.md"),
}


def _usage() -> str:
    from . import __version__

    width = max(map(len, COMMANDS))
    lines = [
        "usage: sdpadiff COMMAND [options]",
        "       sdpadiff COMMAND --help     (options of one command)",
        "       sdpadiff --version",
        "",
        f"Differential attention on PyTorch SDPA (multihead-sdpadiff {__version__}).",
        "",
        "commands:",
        *(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[0] == "help" and argv[1] in COMMANDS:
            return COMMANDS[argv[1]][0](["--help"])  # `sdpadiff help bench` = `sdpadiff bench --help`
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"sdpadiff (multihead-sdpadiff) {__version__}, torch {torch.__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"sdpadiff: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
