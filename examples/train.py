"""Train a small byte-level DiffTransformer on a text file, on CPU, in a few minutes.

    python examples/train.py                          # generated corpus, default model, 1-2 min on 2 idle cores
    python examples/train.py --text book.txt --steps 1000
    python examples/train.py --attention standard     # the baseline, same parameter budget
    python examples/train.py --ddp 2                  # 2 processes, gloo on loopback, same global batch
    python examples/train.py --compile                # torch.compile(fullgraph=True) the model
    python examples/train.py --tp 2                   # heads split over 2 processes (tensor parallel)
    python examples/train.py --cp 2                   # the sequence split over 2 processes (context parallel)
    python examples/train.py --tp 2 --cp 2            # both, on a (cp, tp) mesh of 4 processes

Tokens are bytes (vocab 256), so any UTF-8 text works without a tokenizer. Without ``--text`` the
script writes a corpus from a small random grammar (about 150 KB, seeded) to train on; it has
enough regularity that the loss falls visibly within a few hundred steps. The last 10% of the text
is held out. ``--tp``/``--cp`` use :mod:`multihead_sdpadiff.parallel` (gloo on CPU, NCCL with
``--device cuda``, one GPU per rank); every rank sees the same batch, a CP rank its zigzag shard of
each sequence. Rank 0 logs the train and validation loss, shows a progress bar when tqdm is
installed, writes the loss curve to ``<out>.json`` and a checkpoint to ``<out>.pt``
(``DiffTransformer.from_checkpoint``), then prints a greedy continuation of a prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from multihead_sdpadiff import DiffTransformer, DiffTransformerConfig

# ------------------------------------------------------------------------------------- the corpus

_NAMES = ["Ada", "Bram", "Cleo", "Dov", "Edda", "Finn", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Lev"]
_PLACES = ["the harbour", "the old mill", "the market", "the library", "the orchard", "the station",
           "the bakery", "the bridge", "the garden", "the workshop"]
_THINGS = ["a lantern", "a red kite", "a map", "three apples", "a clock", "a letter", "a violin",
           "a basket of pears", "a compass", "a blue umbrella"]
_VERBS = [("found", "finds"), ("carried", "carries"), ("painted", "paints"), ("repaired", "repairs"),
          ("sold", "sells"), ("hid", "hides"), ("borrowed", "borrows"), ("dropped", "drops")]
_TIMES = ["in the morning", "at noon", "before dinner", "late at night", "on Sunday", "after the rain"]
_FEELINGS = ["happy", "tired", "curious", "worried", "proud", "surprised"]


def make_corpus(n_bytes: int = 150_000, seed: int = 0) -> str:
    """Sentences from a small grammar, plus arithmetic lines whose answers must be computed."""
    rng = random.Random(seed)
    pick = rng.choice
    lines: list[str] = []
    size = 0
    while size < n_bytes:
        kind = rng.random()
        a, b = pick(_NAMES), pick(_NAMES)
        past, present = pick(_VERBS)
        if kind < 0.35:
            s = f"{a} {past} {pick(_THINGS)} at {pick(_PLACES)} {pick(_TIMES)}."
        elif kind < 0.55:
            s = f"Every day {a} {present} {pick(_THINGS)}, and {b} is {pick(_FEELINGS)} about it."
        elif kind < 0.75:
            thing = pick(_THINGS)
            s = f"Where is {thing}? {a} says it is at {pick(_PLACES)}, but {b} is not so sure."
        else:
            x, y = rng.randint(0, 49), rng.randint(0, 49)
            s = f"{a} counts {x} and {y}: {x} + {y} = {x + y}."
        lines.append(s)
        size += len(s) + 1
    return "\n".join(lines) + "\n"


def load_bytes(path: str | None, seed: int) -> torch.Tensor:
    raw = Path(path).read_bytes() if path else make_corpus(seed=seed).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


# ---------------------------------------------------------------------------------------- training


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - length, (batch,), generator=gen)
    return torch.stack([data[s : s + length] for s in starts.tolist()])  # (batch, length)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, args, prepare=lambda ids: ids) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same windows at every evaluation
    losses = [model(ids, labels=ids).loss.item()
              for ids in (prepare(sample_batch(data, args.batch, args.seq_len, gen)) for _ in range(args.eval_batches))]
    return sum(losses) / len(losses)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (tensor parallel) or a tensor


def clip_grad_norm(model, max_norm: float) -> None:
    """clip_grad_norm_ for a model whose parameters may be DTensors (sharded gradients made full)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.stack([_full(g).detach().double().pow(2).sum() for g in grads]).sum().sqrt()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for g in grads:
        g.mul_(coef)


def run(rank: int, world: int, args, port: int | None = None) -> None:
    parallel = args.tp * args.cp > 1
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    main = rank == 0
    data = load_bytes(args.text, args.seed)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]

    torch.manual_seed(args.seed)  # every rank builds the same initial model
    config = DiffTransformerConfig(
        vocab_size=256, embed_dim=args.embed_dim, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, attention=args.attention, max_seq_len=args.seq_len,
    )
    model = DiffTransformer(config, device=device)
    if main:
        counts = model.num_parameters(breakdown=True)
        print(f"{args.attention} model: {counts['total']:,} parameters "
              + ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total"), flush=True)
    prepare = lambda ids: ids.to(device)  # noqa: E731
    cp_mesh = None
    if parallel:
        from torch.distributed.device_mesh import init_device_mesh

        from multihead_sdpadiff.parallel import context_parallel, shard_sequence, tensor_parallel

        mesh = init_device_mesh(device.type, (args.cp, args.tp), mesh_dim_names=("cp", "tp"))
        if args.tp > 1:
            tensor_parallel(model, mesh["tp"], vocab_parallel=args.vocab_parallel)
        if args.cp > 1:
            cp_mesh = mesh["cp"]
            context_parallel(model, cp_mesh)
            prepare = lambda ids: shard_sequence(ids.to(device), cp_mesh)  # noqa: E731
    step_model = torch.compile(model, fullgraph=True) if args.compile else model
    if world > 1 and not parallel:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(step_model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    # Every rank draws the same global batch and keeps its slice, so the run matches one process.
    gen = torch.Generator().manual_seed(args.seed + 1)
    share = args.batch // world if not parallel else args.batch  # TP and CP ranks see the whole batch
    data_rank = rank if not parallel else 0
    history: list[dict] = []
    bar = None
    if main and not args.no_bar:
        try:
            from tqdm import tqdm

            bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True)
        except ImportError:
            pass
    start, window, step_times = time.perf_counter(), [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        ids = prepare(sample_batch(train_data, args.batch, args.seq_len, gen)[data_rank * share : (data_rank + 1) * share])
        loss = step_model(ids, labels=ids).loss
        loss.backward()
        if cp_mesh is not None:  # each CP rank holds its share of the gradient
            from multihead_sdpadiff.parallel import average_gradients

            average_gradients(model, cp_mesh)
        if parallel:
            clip_grad_norm(model, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        step_times.append(time.perf_counter() - t0)
        if world > 1 and not parallel:  # report the global batch's loss (gloo has no AVG)
            dist.all_reduce(loss)
            loss /= world
        window.append(loss.item())
        last = step == args.steps - 1
        log = (step + 1) % args.log_every == 0 or last
        val = None
        if log and args.eval_batches and ((step + 1) % args.eval_every == 0 or last) and (main or parallel):
            val = evaluate(model, val_data, args, prepare)  # under TP/CP every rank takes part
        if main and log:
            row = {"step": step + 1, "train_loss": round(sum(window) / len(window), 4),
                   "seconds": round(time.perf_counter() - start, 1)}
            if val is not None:
                row["val_loss"] = round(val, 4)
            history.append(row)
            window = []
            msg = "  ".join(f"{k} {v}" for k, v in row.items())
            (bar.write if bar else print)(msg)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar:
        bar.close()

    # Per-rank peak resident memory (this process since it started, torch's import included) and
    # the median step time after the first step.
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = [peak_mib]
    if world > 1:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak_mib)
    step_median = statistics.median(step_times[1:] or step_times)
    if parallel:  # a plain copy of the trained model on rank 0, for the checkpoint and the sample
        state = {k: _full(v) for k, v in model.state_dict().items()}
        if main:
            model = DiffTransformer(config, device=device)
            model.load_state_dict(state)
    if main:
        print(f"median step {step_median:.3f} s; peak RSS per rank (MiB): " + ", ".join(f"{p:.0f}" for p in peaks))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save_checkpoint(out.with_suffix(".pt"))
        meta = {"args": vars(args), "parameters": model.num_parameters(), "world_size": world,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "history": history,
                "median_step_s": step_median, "peak_rss_mib_per_rank": peaks}
        out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        print(f"saved {out.with_suffix('.pt')} and the loss curve in {out.with_suffix('.json')}")
        prompt = torch.tensor([list(args.prompt.encode())], device=device)
        n = min(args.sample_tokens, config.max_seq_len - prompt.shape[1])  # stay within the trained length
        if n > 0:
            text = model.generate(prompt, n, temperature=0)[0].tolist()
            print("greedy sample:", bytes(text).decode(errors="replace"))
    if world > 1:
        dist.barrier()  # every rank done with every collective before any tears the group down
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--text", help="a UTF-8 text file (default: %(default)s, a generated corpus)")
    p.add_argument("--attention", default="diff", choices=["diff", "diff_v2", "standard"])
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8, help="the baseline's head count (diff: half as many, twice as wide)")
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="the global batch, split over --ddp processes")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4, help="0: no evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ddp", type=int, default=1, metavar="N", help="train on N CPU processes (gloo)")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor parallel: split the heads over N processes")
    p.add_argument("--cp", type=int, default=1, metavar="M",
                   help="context parallel: split each sequence over M processes (zigzag; --seq-len a multiple of 2M)")
    p.add_argument("--vocab-parallel", action="store_true",
                   help="with --tp: shard the tied embedding/LM head by vocab row (default: replicated)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per process, NCCL")
    p.add_argument("--compile", action="store_true", help="torch.compile(model, fullgraph=True)")
    p.add_argument("--out", default="runs/diff_lm", help="writes <out>.pt (checkpoint) and <out>.json (loss curve)")
    p.add_argument("--prompt", default="Where is a map? ")
    p.add_argument("--sample-tokens", type=int, default=80)
    p.add_argument("--no-bar", action="store_true", help="no progress bar, even with tqdm installed")
    for action in p._actions:  # --help shows every default, also where there is no help text
        if action.help is None and action.default is not None:
            action.help = "default: %(default)s"
    args = p.parse_args(argv)
    if args.ddp < 1 or args.batch % args.ddp:
        p.error(f"--batch {args.batch} must be a multiple of --ddp {args.ddp}")
    if args.tp < 1 or args.cp < 1:
        p.error("--tp and --cp must be >= 1")
    if args.tp * args.cp > 1 and args.ddp > 1:
        p.error("--ddp cannot be combined with --tp/--cp here (see docs/parallel.md for dp x tp with FSDP2)")
    if args.vocab_parallel and args.tp < 2:
        p.error("--vocab-parallel needs --tp >= 2")
    if args.seq_len % (2 * args.cp):
        p.error(f"--seq-len {args.seq_len} must be a multiple of 2 x --cp = {2 * args.cp}")
    if args.eval_batches < 0:
        p.error("--eval-batches must be >= 0 (0: no evaluation)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    world = args.ddp * args.tp * args.cp
    if world > 1:
        import torch.multiprocessing as mp

        mp.spawn(run, args=(world, args, free_port()), nprocs=world, join=True)
    else:
        run(0, 1, args)


if __name__ == "__main__":
    sys.exit(main())
