"""The top-level ``sdpadiff`` command: help, version, and ``sdpadiff check``'s counts and errors."""

from __future__ import annotations

import pytest
import torch

import multihead_sdpadiff
from multihead_sdpadiff.check import count_rows
from multihead_sdpadiff.cli import COMMANDS, main


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"], ["help"]], ids=["bare", "--help", "-h", "help"])
def test_top_level_help_lists_every_command_and_exits_0(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sdpadiff COMMAND")
    for name in COMMANDS:
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in out.splitlines()), name


def test_version(capsys):
    assert main(["--version"]) == 0
    assert multihead_sdpadiff.__version__ in capsys.readouterr().out


def test_help_command_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["help", "check"])
    assert exc.value.code == 0 and "usage: sdpadiff check" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_check_counts_skips_separately():
    rows = [{"status": "pass"}, {"status": "skip: no triton"}, {"status": "FAIL"}, {"status": "error: boom"}]
    assert count_rows(rows) == {"passed": 1, "failed": 2, "skipped": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA device")
def test_check_on_missing_cuda_is_a_clean_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--device", "cuda"])
    assert exc.value.code == 2
    assert "torch sees no CUDA device here" in capsys.readouterr().err


def _readme_commands():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_commands_install_torch_first_and_ci_runs_the_test_command_verbatim():
    """A bare ``pip install .`` lets pip pick torch, which on a CPU-only machine was a CUDA build."""
    from pathlib import Path

    main_job, tests = _readme_commands()
    for cmd in (main_job, tests):
        assert cmd.startswith("pip install torch==2.13.0 && "), cmd
    assert main_job.endswith('pip install ".[bench]" && sdpadiff bench')
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests
