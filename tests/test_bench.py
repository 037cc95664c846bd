"""`sdpadiff bench` on tiny sweeps: it runs, writes a results file and plots, refuses to time a wrong
method, and re-plots from the file. No test asserts a time."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import multihead_sdpadiff as msd
from multihead_sdpadiff.bench import BenchConfig, Method, build_methods, run_sweep
from multihead_sdpadiff.bench.cases import Case, case_flops, standard_attention_flops
from multihead_sdpadiff.bench.cli import main
from multihead_sdpadiff.bench.guard import check_method

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
HAVE_HF = importlib.util.find_spec("transformers") is not None
TINY = ["--embed-dim", "64", "--num-heads", "4", "--min-time", "0", "--min-reps", "2", "--max-time", "0.2",
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def op_run(tmp_path_factory):
    """One tiny op-level sweep with GQA (4 maps, 2 kv maps), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("op")
    rc = main(["--seq-lens", "64", "97", "--num-kv-heads", "2", "--modes", "fwd", "fwd_bwd", "--out", str(out), *TINY])
    return rc, out


def test_cli_sweep_writes_results(op_run):
    rc, out = op_run
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["finished"] and not doc["interrupted"]
    env = doc["env"]
    for key in ("torch", "device", "device_name", "cpu_model", "threads", "dtype", "command_line"):
        assert env[key] is not None, key
    assert env["threads"] == 1 and env["dtype"] == "float32"
    names = {r["method"] for r in doc["results"]}
    assert names == {"standard", "hf_diffllama", *msd.IMPLS}
    assert len(doc["results"]) == 2 * 2 * len(names)  # modes x lengths x methods
    for r in doc["results"]:
        if r["method"] == "hf_diffllama" and not HAVE_HF:
            assert r["status"] == "skipped" and "transformers" in r["reason"]
            continue
        if r["status"] == "skipped":  # a strategy that cannot run here (e.g. a GPU kernel) says why
            assert r["method"] not in ("standard", "reference") and r["reason"], r
            continue
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["iqr_s"] >= 0 and r["peak_bytes"] >= 0
        assert r["ratio"] is not None and r["gflops"] is not None and r["mem_ratio"] is not None
    auto = [r for r in doc["results"] if r["method"] == "auto"]
    assert all(r["resolved"] in msd.IMPLS for r in auto)
    assert {c["status"] for c in doc["checks"]} == {"pass"}


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
def test_cli_sweep_writes_plots(op_run):
    _, out = op_run
    for name in ("time", "ratio", "memory"):
        assert (out / f"{name}.png").stat().st_size > 0


def test_plot_subcommand_replots_from_file(op_run, tmp_path, capsys):
    _, out = op_run
    assert main(["plot", str(out / "results.json"), "--out", str(tmp_path)]) == 0
    assert "x standard" in capsys.readouterr().out  # the table is printed from the file too
    if HAVE_MPL:
        assert sorted(p.name for p in tmp_path.glob("*.png")) == ["memory.png", "ratio.png", "time.png"]


def test_plot_subcommand_rejects_other_json(tmp_path):
    bogus = tmp_path / "other.json"
    bogus.write_text("{}")
    assert main(["plot", str(bogus)]) == 2


def _variant(base: Method, name: str, run) -> Method:
    return Method(name, base.kind, "test double", base.flops, base.score_memory, base.unavailable, base.prepare, run)


def test_wrong_method_is_reported_and_not_timed(tmp_path):
    methods = build_methods("op")
    standard, reference = methods[0], next(m for m in methods if m.name == "reference")
    # Off by 1 % everywhere: far above float32's tolerance, small enough to look plausible.
    wrong = _variant(reference, "off_by_one_percent", lambda s: 1.01 * reference.run(s))
    broken = _variant(reference, "raises", lambda s: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    cfg = BenchConfig(seq_lens=(64,), modes=("fwd", "fwd_bwd"), embed_dim=64, num_heads=4, num_kv_heads=4,
                      threads=1, min_time=0, min_reps=2, max_time=0.2)
    doc = run_sweep(cfg, [standard, wrong, broken], results_path=tmp_path / "r.json", progress=False)
    rows = {(r["method"], r["mode"]): r for r in doc["results"]}
    for mode in cfg.modes:
        assert rows[("standard", mode)]["status"] == "ok"
        bad = rows[("off_by_one_percent", mode)]
        assert bad["status"] == "wrong" and "rel. error" in bad["reason"]
        assert bad["median_s"] is None and bad["ratio"] is None and bad["peak_bytes"] is None
        assert rows[("raises", mode)]["status"] == "error" and "kernel exploded" in rows[("raises", mode)]["reason"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["status"] for r in saved["results"]] == [r["status"] for r in doc["results"]]


def test_guard_catches_a_gqa_pairing_bug():
    """The check runs with the configured GQA: pairing each head's two maps from the same kv map
    (the original project's bug) must fail it."""
    reference = next(m for m in build_methods("op") if m.name == "reference")

    def same_half_pairing(s):
        k = s["k"].clone()
        k[:, 1::2] = s["k"][:, 0::2]
        return reference.run({**s, "k": k})

    case = Case("op", "fwd", 1, 64, 64, 4, 2, torch.float32, "cpu")
    assert check_method(reference, case).status == "pass"
    assert check_method(_variant(reference, "bad_gqa", same_half_pairing), case).status == "wrong"


def test_module_level_sweep_with_decode(tmp_path):
    rc = main(["--level", "module", "--seq-lens", "33", "--modes", "fwd", "decode", "--impls", "sdpa_4pass",
               "hf_diffllama", "--out", str(tmp_path), "--no-plot", *TINY])
    assert rc == 0
    rows = {(r["method"], r["mode"]): r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert set(rows) == {(m, mode) for m in ("standard", "sdpa_4pass", "hf_diffllama") for mode in ("fwd", "decode")}
    assert rows[("standard", "decode")]["status"] == "ok"
    assert rows[("sdpa_4pass", "fwd")]["status"] == "ok"
    decode = rows[("sdpa_4pass", "decode")]
    if hasattr(msd, "KVCache"):
        assert decode["status"] == "ok", decode
    else:
        assert decode["status"] == "skipped" and "KVCache" in decode["reason"]
    if HAVE_HF:
        assert rows[("hf_diffllama", "fwd")]["status"] == "ok"
        assert rows[("hf_diffllama", "decode")]["status"] == "ok"


def test_flop_formula():
    case = Case("op", "fwd", 2, 128, 96, 6, 6, torch.float32, "cpu")  # H = 3, d = 16
    assert standard_attention_flops(case) == 4 * 2 * 6 * 128 * 128 * 16 / 2  # causal halves
    assert case_flops(case, 1.5) == 1.5 * standard_attention_flops(case)
    assert case_flops(case.replace(mode="fwd_bwd"), 2.0) == 3.5 * 2.0 * standard_attention_flops(case)
    decode = case.replace(mode="decode")  # one query sees all N keys: nothing to halve
    assert standard_attention_flops(decode) == 4 * 2 * 6 * 1 * 128 * 16


def test_unknown_impl_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--impls", "no_such_strategy", "--out", str(tmp_path), *TINY])
    assert exc.value.code == 2


def test_case_that_would_not_fit_is_skipped_not_run(tmp_path):
    methods = build_methods("op")[:2]  # standard, reference
    cfg = BenchConfig(seq_lens=(64,), modes=("fwd",), embed_dim=64, num_heads=4, num_kv_heads=4, threads=1,
                      min_time=0, min_reps=2, max_time=0.2, mem_fraction=1e-12)
    doc = run_sweep(cfg, methods, progress=False)
    assert [r["status"] for r in doc["results"]] == ["skipped", "skipped"]
    assert all("would not fit" in r["reason"] and r["median_s"] is None for r in doc["results"])


def test_structured_bench_checks_and_times_window_and_docs(tmp_path):
    from multihead_sdpadiff.bench.structured import format_structured, run_structured

    doc = run_structured(seq_lens=(96,), window=8, docs=3, impl="auto", embed_dim=32, num_heads=4, num_kv_heads=2,
                         dtype=torch.float32, device=torch.device("cpu"), threads=1, modes=("fwd",), min_time=0.0,
                         min_reps=2, max_time=0.5, check_len=48, out_dir=tmp_path, command_line="test", flex=False)
    rows = {r["method"]: r for r in doc["results"]}
    assert all(rows[m]["status"] == "ok" and rows[m]["median_s"] > 0 for m in
               ("diff", "diff_dense", "standard", "standard_dense")), rows
    assert rows["flex"]["status"] == "unavailable"
    assert rows["diff_dense"]["ratio_to_diff_dense"] == 1.0
    assert (tmp_path / "results.json").exists() and "diff_dense" in format_structured(doc)


def test_load_compare_and_busy_core():
    from multihead_sdpadiff.bench.load import busy_core, compare

    def doc(r):
        return {"results": [{"mode": "fwd", "seq_len": 64, "method": "standard", "ratio": 1.0},
                            {"mode": "fwd", "seq_len": 64, "method": "cpu_fused", "ratio": r}]}

    table = compare(doc(0.9), doc(1.8))
    assert "cpu_fused" in table and "2.00" in table
    with busy_core(0) as proc:
        assert proc.poll() is None  # spinning while the block runs
    assert proc.poll() is not None  # and gone after it
