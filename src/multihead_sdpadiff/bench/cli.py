"""``sdpadiff bench``: time every differential-attention strategy against standard attention.

See docs/benchmarks.md for what the columns mean and how time, FLOPs and memory are measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
from pathlib import Path

import torch

#: --op gda's ``r`` (Motif-2-12.7B: 32 signal heads, 8 noise heads); cases_gda.DEFAULT_RATIO, not
#: imported so that ``--help`` loads no op code.
DEFAULT_GDA_RATIO = 4

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

#: Sweep presets: (device type, full?) -> settings. The quick CPU preset finishes in well under two
#: minutes on 2 cores; --full is the sweep behind docs/benchmarks.md's longer runs.
PRESETS = {
    ("cpu", False): {"dtype": "float32", "seq_lens": (512, 1024, 2048), "modes": ("fwd", "fwd_bwd"),
                     "min_time": 0.2, "min_reps": 5, "max_time": 1.5},
    ("cpu", True): {"dtype": "float32", "seq_lens": (256, 512, 1024, 2048, 4096, 8192),
                    "modes": ("fwd", "fwd_bwd", "decode"), "min_time": 1.0, "min_reps": 10, "max_time": 10.0},
    ("cuda", False): {"dtype": "bfloat16", "seq_lens": (1024, 2048, 4096), "modes": ("fwd", "fwd_bwd"),
                      "min_time": 0.2, "min_reps": 5, "max_time": 1.5},
    ("cuda", True): {"dtype": "bfloat16", "seq_lens": (1024, 2048, 4096, 8192, 16384),
                     "modes": ("fwd", "fwd_bwd", "decode"), "min_time": 1.0, "min_reps": 10, "max_time": 10.0},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdpadiff bench",
        description="Time every strategy in multihead_sdpadiff.IMPLS (after checking it against the float64 "
                    "reference) against standard causal attention of the same width and transformers' "
                    "DiffLlamaAttention; --op v2 and --op gda time V2's and GDA's strategies instead "
                    "(GDA also against N_s separate differential heads, with a second ratio column). "
                    "Writes results.json and plots under --out. "
                    "`sdpadiff bench plot FILE` redraws the plots (and the table) from a results file.",
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, metavar="N",
                   help="key lengths N (default: 512 1024 2048 on cpu, more with --full)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--embed-dim", type=int, default=None,
                   help="E; d = E / num_heads (default: 768; 1024 with --op gda)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="the baseline's heads (H = num_heads/2 differential heads; with --op gda N_s = num_heads/2 "
                        "signal heads) (default: 12; 16 with --op gda)")
    p.add_argument("--num-kv-heads", type=int, default=None,
                   help="default: --num-heads (no GQA); with --op gda 2 * N_n (P = N_n kv pairs, as in Motif-2)")
    p.add_argument("--modes", nargs="+", choices=("fwd", "fwd_bwd", "decode"), default=None,
                   help="default: fwd fwd_bwd (plus decode with --full)")
    p.add_argument("--impls", nargs="+", default=None, metavar="NAME",
                   help="methods to run (default: all); 'standard' always runs, it is the ratio's floor "
                        "(with --op gda, so does the V1 yardstick)")
    p.add_argument("--level", choices=("op", "module"), default="op")
    p.add_argument("--op", choices=("v1", "v2", "gda"), default="v1",
                   help="v1: diff_attention's strategies (default); v2: diff_attention_v2's, as v2_<name>, "
                        "checked against the V2 reference (op level only); gda: grouped_diff_attention's, as "
                        "gda_<name>, checked against the GDA reference, beside N_s separate differential heads "
                        "through V1 (v1_auto) and standard attention of the same width (op level only)")
    p.add_argument("--gda-ratio", type=int, default=None, metavar="R",
                   help=f"--op gda: r signal heads per noise head, N_n = N_s / r (default {DEFAULT_GDA_RATIO}, "
                        "Motif-2-12.7B's)")
    p.add_argument("--gda-v1", default=None, metavar="NAME",
                   help="--op gda: the V1 strategy of the N_s-separate-heads yardstick, row v1_NAME (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads for every timed call (default: torch.get_num_threads() = {torch.get_num_threads()})")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: bench-results/<timestamp>-<level>)")
    p.add_argument("--full", action="store_true", help="the longer sweep: more lengths, decode, more samples")
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="sliding window: each query sees itself and W - 1 keys before it; times the op with it "
                        "against the dense causal op and standard attention with the same band "
                        "(default --seq-lens 8192)")
    p.add_argument("--docs", type=int, default=None, metavar="K",
                   help="K packed documents of N/K tokens (varlen, causal per document), timed the same way "
                        "(default --seq-lens 4096); combines with --window")
    g = p.add_argument_group("measurement (defaults from the preset)")
    g.add_argument("--min-time", type=float, default=None, help="seconds of timing per case, at least")
    g.add_argument("--min-reps", type=int, default=None, help="timing samples per case, at least")
    g.add_argument("--max-time", type=float, default=None, help="stop sampling a slow case after this many seconds")
    g.add_argument("--check-len", type=int, default=64, help="sequence length of the correctness check")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-plot", action="store_true", help="write results.json only")
    g.add_argument("--load", action="store_true",
                   help="run the sweep twice: as usual, then with another process spinning on core 0; writes "
                        "results-load.json beside results.json and prints each ratio to standard without and "
                        "with the load")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from .runner import BenchConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    preset = PRESETS[("cuda" if device.startswith("cuda") else "cpu", args.full)]
    gda = args.op == "gda"
    if not gda and (args.gda_ratio is not None or args.gda_v1 is not None):
        parser.error("--gda-ratio and --gda-v1 apply to --op gda only")
    ratio = DEFAULT_GDA_RATIO if args.gda_ratio is None else args.gda_ratio
    embed_dim = (1024 if gda else 768) if args.embed_dim is None else args.embed_dim
    num_heads = (16 if gda else 12) if args.num_heads is None else args.num_heads
    num_kv = args.num_kv_heads
    if num_kv is None:
        # GDA: P = N_n kv pairs (Motif-2); a ratio that leaves no whole noise head is reported below.
        num_kv = 2 * max(1, num_heads // 2 // ratio) if gda and ratio > 0 and num_heads > 0 else num_heads
    for name, value in (("--batch", args.batch), ("--embed-dim", embed_dim), ("--num-heads", num_heads),
                        ("--num-kv-heads", num_kv), ("--check-len", args.check_len), ("--gda-ratio", ratio)):
        if value <= 0:
            parser.error(f"{name} must be positive, got {value}")
    if num_heads % 2 or num_kv % 2 or num_heads % num_kv or embed_dim % num_heads:
        parser.error("need even --num-heads and --num-kv-heads, num_kv_heads dividing num_heads, "
                     "and --embed-dim divisible by --num-heads")
    second, note = None, ""
    if gda:
        from .cases_gda import gda_shape_reasons, v1_yardstick_name

        reasons = gda_shape_reasons(num_heads, num_kv, ratio)
        if reasons:
            parser.error(f"--op gda with --num-heads {num_heads}, --num-kv-heads {num_kv}, --gda-ratio {ratio}: "
                         + "; ".join(reasons))
        import multihead_sdpadiff as msd

        v1_impl = args.gda_v1 or "auto"
        if v1_impl not in msd.IMPLS:
            parser.error(f"--gda-v1 must be one of {list(msd.IMPLS)}, got {v1_impl!r}")
        second = v1_yardstick_name(v1_impl)
        ns, pairs, d = num_heads // 2, num_kv // 2, embed_dim // num_heads
        note = (f"GDA: N_s={ns} signal heads, N_n={ns // ratio} noise heads (r={ratio}), P={pairs} kv pairs, d={d}; "
                f"{second}: {ns} separate differential heads; "
                f"standard: {2 * ns} maps of width d over {2 * pairs} kv maps")
    seq_lens = tuple(args.seq_lens or preset["seq_lens"])
    if any(n < 2 for n in seq_lens):
        parser.error("--seq-lens must be >= 2 (decode needs a prompt of N - 1 tokens)")
    return BenchConfig(
        level=args.level, device=device, dtype=_DTYPES[args.dtype or preset["dtype"]],
        seq_lens=seq_lens, modes=tuple(dict.fromkeys(args.modes or preset["modes"])),
        batch=args.batch, embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv,
        threads=args.threads or torch.get_num_threads(),
        min_time=preset["min_time"] if args.min_time is None else args.min_time,
        min_reps=preset["min_reps"] if args.min_reps is None else args.min_reps,
        max_time=preset["max_time"] if args.max_time is None else args.max_time,
        check_len=args.check_len, seed=args.seed,
        preset=("full" if args.full else "quick") + ("+custom" if _customised(args) else ""),
        second_yardstick=second, note=note,
    )


def _customised(args: argparse.Namespace) -> bool:
    return any(getattr(args, a) is not None for a in ("seq_lens", "modes", "dtype", "impls", "min_time",
                                                      "min_reps", "max_time"))


def _out_dir(args: argparse.Namespace, level: str) -> Path:
    if args.out is not None:
        return args.out
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("bench-results") / f"{stamp}-{level}"
    out, i = base, 1
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def _plot(doc: dict, out_dir: Path) -> None:
    from .plot import have_matplotlib, plot_results

    if not have_matplotlib():
        print("plots: skipped, matplotlib is not installed (pip install matplotlib)")
        return
    for path in plot_results(doc, out_dir):
        print(f"plot: {path}")


def _plot_command(argv: list[str]) -> int:
    from .report import format_report
    from .runner import load_results

    p = argparse.ArgumentParser(prog="sdpadiff bench plot",
                                description="Redraw the plots and the table from a results file.")
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the file's folder)")
    args = p.parse_args(argv)
    try:
        doc = load_results(args.file)
    except (OSError, ValueError) as exc:
        print(f"sdpadiff bench plot: {exc}", file=sys.stderr)
        return 2
    print(format_report(doc))
    _plot(doc, args.out or args.file.parent)
    return 0


def _structured(args, cfg, parser, argv) -> int:
    from .structured import format_structured, run_structured

    for name, value in (("--window", args.window), ("--docs", args.docs)):
        if value is not None and value <= 0:
            parser.error(f"{name} must be positive, got {value}")
    if args.op != "v1":
        parser.error(f"--window/--docs time V1's diff_attention only, not --op {args.op}")
    if cfg.batch != 1:
        parser.error("--window/--docs run one row (--batch 1)")
    seq_lens = tuple(args.seq_lens or ((4096,) if args.docs is not None else (8192,)))
    modes = tuple(m for m in (args.modes or ("fwd",)) if m != "decode")
    impls = args.impls or ["auto"]
    if len(impls) != 1:
        parser.error("--window/--docs time one differential strategy: give one --impls NAME")
    out_dir = _out_dir(args, "structured")
    print(f"sdpadiff bench: window={args.window} docs={args.docs} N={list(seq_lens)} modes={list(modes)} "
          f"impl={impls[0]}; {cfg.threads} threads; results -> {out_dir / 'results.json'}", flush=True)
    doc = run_structured(seq_lens=seq_lens, window=args.window, docs=args.docs, impl=impls[0],
                         embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                         dtype=cfg.dtype, device=torch.device(cfg.device), threads=cfg.threads, modes=modes,
                         min_time=cfg.min_time, min_reps=cfg.min_reps, max_time=cfg.max_time,
                         check_len=max(cfg.check_len, 64), out_dir=out_dir,
                         command_line="sdpadiff bench " + shlex.join(argv))
    print(format_structured(doc))
    print(f"results: {out_dir / 'results.json'}")
    return 1 if any(r["status"] == "wrong" for r in doc["results"]) else 0


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "plot":
        return _plot_command(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    cfg = _config(args, parser)
    if args.window is not None or args.docs is not None:
        return _structured(args, cfg, parser, argv)

    from .cases import STANDARD, build_methods
    from .report import format_report
    from .runner import run_sweep

    if args.op == "v2":
        from .cases_v2 import build_methods_v2

        if cfg.level != "op":
            parser.error("--op v2 runs at op level only (--level op)")
        methods = build_methods_v2(cfg.level)
    elif args.op == "gda":
        from .cases_gda import build_methods_gda

        if cfg.level != "op":
            parser.error("--op gda runs at op level only (--level op)")
        ratio = DEFAULT_GDA_RATIO if args.gda_ratio is None else args.gda_ratio
        methods = build_methods_gda(cfg.level, ratio, args.gda_v1 or "auto")
    else:
        methods = build_methods(cfg.level)
    if args.impls:
        known = [m.name for m in methods]
        unknown = [n for n in args.impls if n not in known]
        if unknown:
            parser.error(f"unknown --impls {unknown}; known here: {known}")
        wanted = {STANDARD, *([cfg.second_yardstick] if cfg.second_yardstick else []), *args.impls}
        methods = [m for m in methods if m.name in wanted]

    out_dir = _out_dir(args, cfg.level)
    results = out_dir / "results.json"
    print(f"sdpadiff bench: {len(cfg.modes)} modes x {len(cfg.seq_lens)} lengths x {len(methods)} methods "
          f"({', '.join(m.name for m in methods)}); {cfg.threads} threads; results -> {results}", flush=True)
    doc = run_sweep(cfg, methods, results_path=results, command_line="sdpadiff bench " + shlex.join(argv),
                    progress=not args.no_progress)
    print(format_report(doc))
    print(f"results: {results}")
    if args.load and not doc["interrupted"]:
        from .load import busy_core, compare

        loaded_path = out_dir / "results-load.json"
        print("sdpadiff bench --load: the same sweep with another process spinning on core 0", flush=True)
        with busy_core(0):
            loaded = run_sweep(cfg, methods, results_path=loaded_path,
                               command_line="sdpadiff bench " + shlex.join(argv) + "  [under load]",
                               progress=not args.no_progress)
        print(format_report(loaded))
        print(f"results under load: {loaded_path}")
        print("\nratio to standard without and with one core busy:")
        print(compare(doc, loaded))
        doc = {**doc, "interrupted": loaded["interrupted"],
               "results": doc["results"] + [r for r in loaded["results"] if r["status"] == "wrong"]}
    if not args.no_plot:
        try:
            _plot(doc, out_dir)
        except Exception as exc:  # noqa: BLE001 - the results file is written; a plot failure must not hide it
            print(f"plots failed: {type(exc).__name__}: {exc} (retry with: sdpadiff bench plot {results})")
    if doc["interrupted"]:
        return 130
    return 1 if any(r["status"] == "wrong" for r in doc["results"]) else 0
