"""examples/train.py runs end to end on a toy setting and writes a loadable checkpoint."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from multihead_sdpadiff import DiffTransformer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_example_smoke(tmp_path, capsys):
    train = _load_example()
    corpus = train.make_corpus(3000, seed=1)
    assert corpus == train.make_corpus(3000, seed=1) and len(corpus.encode()) >= 3000
    text = tmp_path / "tiny.txt"
    text.write_text(corpus)
    out = tmp_path / "run"
    train.main(["--text", str(text), "--embed-dim", "32", "--layers", "1", "--heads", "4", "--seq-len", "24",
                "--batch", "4", "--steps", "4", "--warmup", "2", "--log-every", "2", "--eval-every", "4",
                "--eval-batches", "1", "--sample-tokens", "4", "--no-bar", "--out", str(out)])
    history = json.loads(out.with_suffix(".json").read_text())["history"]
    assert [row["step"] for row in history] == [2, 4] and "val_loss" in history[-1]
    model = DiffTransformer.from_checkpoint(out.with_suffix(".pt"))
    assert model.config.embed_dim == 32 and model.config.vocab_size == 256
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert "greedy sample:" in capsys.readouterr().out


def test_train_example_help_shows_the_defaults(capsys):
    import pytest

    train = _load_example()
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for flag, default in (("--embed-dim EMBED_DIM", "128"), ("--steps STEPS", "300"), ("--lr LR", "0.003"),
                          ("--ddp N", "1")):
        assert f"{flag} " in out and f"default: {default}" in out.split(flag, 1)[1][:120], flag
