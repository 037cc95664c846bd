"""`sdpadiff bench --op v2`: V2's strategies are checked against the V2 reference, then timed."""

from __future__ import annotations

import json

import pytest
import torch

import multihead_sdpadiff as msd
from multihead_sdpadiff.bench import Method
from multihead_sdpadiff.bench.cases import Case
from multihead_sdpadiff.bench.cases_v2 import build_methods_v2
from multihead_sdpadiff.bench.cli import main
from multihead_sdpadiff.bench.guard import check_method
from tests.test_bench import TINY


def test_cli_v2_sweep_checks_and_times_every_strategy(tmp_path):
    rc = main(["--op", "v2", "--seq-lens", "64", "--num-kv-heads", "2", "--modes", "fwd", "fwd_bwd",
               "--out", str(tmp_path), "--no-plot", *TINY])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    names = {r["method"] for r in doc["results"]}
    assert names == {"standard", *(f"v2_{n}" for n in msd.IMPLS_V2)}
    assert all(r["status"] == "ok" and r["median_s"] > 0 and r["ratio"] is not None for r in doc["results"]), doc["results"]
    checks = {(c["method"], c["mode"]): c for c in doc["checks"]}
    assert {c["status"] for c in checks.values()} == {"pass"}
    assert "doutput" not in checks[("v2_sdpa", "fwd_bwd")]["detail"] and "dk" in checks[("v2_sdpa", "fwd_bwd")]["detail"]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_guard_compares_v2_with_the_v2_reference(mode):
    methods = {m.name: m for m in build_methods_v2("op")}
    sdpa = methods["v2_sdpa"]
    case = Case("op", mode, 1, 64, 64, 4, 2, torch.float32, "cpu")
    assert check_method(sdpa, case).status == "pass"

    def swapped_maps(s):  # map 2 minus lambda times map 1: a plausible layout bug
        q = s["q"].unflatten(1, (-1, 2)).flip(2).flatten(1, 2)
        return sdpa.run({**s, "q": q})

    wrong = Method("v2_wrong", sdpa.kind, "test double", sdpa.flops, sdpa.score_memory, sdpa.unavailable,
                   sdpa.prepare, swapped_maps)
    assert check_method(wrong, case).status == "wrong"


def test_v2_is_op_level_only(tmp_path):
    with pytest.raises(SystemExit):
        main(["--op", "v2", "--level", "module", "--out", str(tmp_path), *TINY])
