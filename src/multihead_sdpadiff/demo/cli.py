"""``sdpadiff demo`` / ``python -m multihead_sdpadiff.demo``: run the experiment, write the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from .report import load_results, summarize, write_plots, write_report
from .run import MODELS, PRESETS, DemoConfig, run_demo

__all__ = ["main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(
        "Train standard, diff and diff_v2 DiffTransformers on multi-query associative recall with noise "
        "tokens; measure held-out accuracy, loss and where the last query's attention goes; write "
        "results.json, figures and report.md."))
    p.add_argument("--quick", action="store_true", help="the quick preset (about 2 minutes on 2 cores)")
    p.add_argument("--out", default="runs/demo", help="report folder (default: %(default)s)")
    p.add_argument("--models", nargs="+", choices=MODELS, help="default: all three")
    p.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2")
    p.add_argument("--steps", type=int, help="training steps per model and seed")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-noise", nargs="+", type=int, help="held-out noise levels")
    p.add_argument("--eval-examples", type=int, help="held-out sequences per noise level")
    p.add_argument("--attn-examples", type=int, help="of those, how many the attention shares average over")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--replot", action="store_true",
                   help="redraw the figures and report.md from OUT/results.json without training")
    return p


def _config(args) -> DemoConfig:
    fields = dict(PRESETS["quick" if args.quick else "default"])
    for name in ("models", "seeds", "steps", "batch_size", "eval_noise", "eval_examples", "attn_examples",
                 "threads"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = tuple(value) if isinstance(value, list) else value
    steps = fields.get("steps", DemoConfig.steps)
    if fields.get("curve_every", DemoConfig.curve_every) > steps:  # a short run still gets a few points
        fields["curve_every"] = max(1, steps // 4)
    return DemoConfig(**fields)


def _draw(results: dict, out: Path) -> None:
    try:
        figures, note = write_plots(results, out), ""
    except ImportError as e:
        figures, note = [], str(e)
        print(f"figures skipped: {e}", file=sys.stderr)
    path = write_report(results, out, figures, note)
    print(f"wrote {path}" + (f" and {len(figures)} figures" if figures else ""))


def _print_summary(results: dict) -> None:
    summary = summarize(results)
    noises = [str(n) for n in results["config"]["eval_noise"]]
    lengths = summary[results["models"][0]]["noise"]
    print(f"{'model':>8} {'params':>8}  " + "  ".join(f"{'acc L=' + str(lengths[n]['seq_len']):>15}" for n in noises)
          + f"  {'answer share (abs, head)':>24}")
    for m, s in summary.items():
        accs = "  ".join(f"{s['noise'][n]['accuracy']['mean']:>7.3f} ± {s['noise'][n]['accuracy']['std']:.3f}"
                         for n in noises)
        head = s["noise"][noises[0]]["abs_answer_head"]
        print(f"{m:>8} {s['num_parameters']:>8}  {accs}  {head['mean']:>16.3f} ± {head['std']:.3f}")


def main(argv: list[str] | None = None, prog: str = "sdpadiff demo") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(prog).parse_args(argv)
    out = Path(args.out)
    if args.replot:
        results = load_results(out)
    else:
        try:
            config = _config(args)
        except ValueError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        command = " ".join([prog, *map(shlex.quote, argv)])
        print(f"{command}\n{json.dumps(dataclasses.asdict(config))}")
        results = run_demo(config, progress=not args.no_progress, command=command)
        (out / "results.json").write_text(json.dumps(results))
        print(f"wrote {out / 'results.json'} ({results['wall_seconds']:.0f} s)")
    _draw(results, out)
    _print_summary(results)
    return 0
