"""`sdpadiff bench --op gda`: GDA's registry is checked against the GDA reference, then timed beside
N_s separate V1 heads and standard attention. No test asserts a time."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

import multihead_sdpadiff as msd
from multihead_sdpadiff.bench import BenchConfig, Method, run_sweep
from multihead_sdpadiff.bench import cli as bench_cli
from multihead_sdpadiff.bench.cases import Case, make_tensors
from multihead_sdpadiff.bench.cases_gda import build_methods_gda, gda_inputs, gda_truth, plain_gda
from multihead_sdpadiff.bench.cli import main
from multihead_sdpadiff.bench.guard import check_method
from multihead_sdpadiff.ops import grouped
from multihead_sdpadiff.ops.registry import Registry, Strategy
from tests.oracle import softmax_visible
from tests.oracle_released import _visible
from tests.test_bench import TINY

# N_s = 4 signal heads, r = 2 (N_n = 2 noise heads), P = 1 kv pair, d = 8.
GDA_TINY = [*TINY, "--op", "gda", "--num-heads", "8", "--num-kv-heads", "2", "--gda-ratio", "2"]


def _registry_names():
    return {f"gda_{n}" for n in grouped.REGISTRY_GROUPED.names()}


@pytest.fixture(scope="module")
def gda_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gda")
    rc = main([*GDA_TINY, "--seq-lens", "48", "--modes", "fwd", "fwd_bwd", "decode", "--out", str(out), "--no-plot"])
    return rc, json.loads((out / "results.json").read_text())


def test_gda_sweep_checks_and_times_every_registered_strategy(gda_run):
    rc, doc = gda_run
    assert rc == 0
    names = {r["method"] for r in doc["results"]}
    assert names == {"standard", "v1_auto", *_registry_names()}
    assert {r["mode"] for r in doc["results"]} == {"fwd", "fwd_bwd", "decode"}
    for r in doc["results"]:
        assert r["status"] == "ok" and r["median_s"] > 0, r
        assert r["ratio"] is not None and r["ratio_second"] is not None, r
        if r["method"] == "v1_auto":
            assert r["ratio_second"] == 1.0
    assert {c["status"] for c in doc["checks"]} == {"pass"}
    chunked = {c["mode"]: c["detail"] for c in doc["checks"] if c["method"] == "gda_chunked"}
    assert all(f"d{n}" in chunked["fwd_bwd"] for n in "qkv"), chunked  # the gradients were compared too
    assert doc["config"]["second_yardstick"] == "v1_auto" and "r=2" in doc["config"]["note"]
    assert next(r for r in doc["results"] if r["method"] == "gda_auto")["resolved"] in grouped.REGISTRY_GROUPED.names()


def test_report_shows_the_second_ratio_column(gda_run):
    from multihead_sdpadiff.bench.report import format_report

    text = format_report(gda_run[1])
    assert "x v1_auto" in text and "GDA: N_s=4 signal heads, N_n=2 noise heads (r=2), P=1 kv pairs, d=8" in text


def test_report_prints_every_row_with_both_ratios(gda_run):
    """One table line per (mode, method), each with its two ratio cells, as the results file has them."""
    from multihead_sdpadiff.bench.report import format_report

    doc = gda_run[1]
    lines = format_report(doc).splitlines()
    for mode in ("fwd", "fwd_bwd", "decode"):
        start = lines.index(f"[{mode}]")
        header = lines[start + 1].split()
        assert header[:10] == ["method", "N", "status", "median", "ms", "IQR", "ms", "x", "standard", "x"]
        body = lines[start + 3:start + 3 + len(_registry_names()) + 2]
        rows = {r["method"]: r for r in doc["results"] if r["mode"] == mode}
        assert {line.split()[0] for line in body} == set(rows)
        for line in body:
            r = rows[line.split()[0]]
            cells = line.split()
            at = cells.index("ok")  # method (resolved) N ok median IQR x-standard x-v1_auto ...
            assert cells[at + 3:at + 5] == [f"{r['ratio']:.2f}", f"{r['ratio_second']:.2f}"], line


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plots_add_the_ratio_to_the_second_yardstick(gda_run, tmp_path):
    from multihead_sdpadiff.bench.plot import PLOTS, plot_results, plots_of

    doc = gda_run[1]
    names = [p.name for p in plot_results(doc, tmp_path)]
    assert names == ["time.png", "ratio.png", "ratio-v1_auto.png", "memory.png"]
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
    assert plots_of({**doc, "config": {**doc["config"], "second_yardstick": None}}) == PLOTS  # V1, V2 runs


# ---- the guard, with strategies registered in a copy of GDA's registry --------------------------------


def _off_lambda(qs, qn, k, v, lam, mask, scale):
    return grouped.reference_grouped(qs, qn, k, v, lam * 1.01, mask, scale)


def _swapped_noise(qs, qn, k, v, lam, mask, scale):  # signal j subtracts the wrong noise head
    return grouped.reference_grouped(qs, qn.flip(1), k, v, lam, mask, scale)


def _raises(qs, qn, k, v, lam, mask, scale):
    raise RuntimeError("deliberately broken")


@pytest.fixture
def registry_copy(monkeypatch):
    original = grouped.REGISTRY_GROUPED
    copy = Registry(original.op)
    for s in original.strategies.values():
        copy.register(s)
    copy.rules = original.rules
    for name, fn in (("off_lambda", _off_lambda), ("swapped_noise", _swapped_noise), ("raises", _raises)):
        copy.register(Strategy(name, fn, "test double", flops=1.0, score_memory="O(N^2)"))
    copy.register(Strategy("renamed", grouped.reference_grouped, "test double: the reference under another name",
                           flops=1.0, score_memory="O(N^2)"))
    copy.register(Strategy("cuda_only", grouped.reference_grouped, "test double", flops=1.0, score_memory="O(N^2)",
                           devices=frozenset({"cuda"})))
    monkeypatch.setattr(grouped, "REGISTRY_GROUPED", copy)
    yield copy
    assert not {"off_lambda", "swapped_noise", "raises", "renamed", "cuda_only"} & set(original.strategies)


def test_bench_marks_wrong_strategies_and_times_only_correct_ones(registry_copy, tmp_path):
    rc = main([*GDA_TINY, "--seq-lens", "40", "--modes", "fwd", "fwd_bwd", "--out", str(tmp_path), "--no-plot"])
    assert rc == 1  # a wrong method makes the run fail
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["method"], r["mode"]): r for r in doc["results"]}
    assert {m for m, _ in rows} == {"standard", "v1_auto", *(f"gda_{n}" for n in registry_copy.names())}
    for mode in ("fwd", "fwd_bwd"):
        for name in ("gda_off_lambda", "gda_swapped_noise"):
            assert rows[name, mode]["status"] == "wrong" and rows[name, mode]["median_s"] is None, rows[name, mode]
            assert "correctness check" in rows[name, mode]["reason"]
        assert rows["gda_raises", mode]["status"] == "error" and rows["gda_raises", mode]["median_s"] is None
        assert "deliberately broken" in rows["gda_raises", mode]["reason"]
        skipped = rows["gda_cuda_only", mode]
        assert skipped["status"] == "skipped" and "device cpu" in skipped["reason"]
        for name in ("gda_renamed", "gda_reference", "gda_chunked", "gda_auto", "v1_auto", "standard"):
            assert rows[name, mode]["status"] == "ok" and rows[name, mode]["median_s"] > 0, rows[name, mode]


def test_a_wrong_yardstick_is_not_timed_and_no_row_is_divided_by_it():
    methods = build_methods_gda("op", ratio=2)
    v1 = methods[1]
    assert v1.name == "v1_auto"
    methods[1] = dataclasses.replace(v1, run=lambda s: v1.run({**s, "lam": s["lam"] * 0.98}))
    cfg = BenchConfig(seq_lens=(24,), modes=("fwd", "fwd_bwd"), embed_dim=64, num_heads=8, num_kv_heads=2,
                      threads=1, min_time=0.0, min_reps=2, max_time=0.2, second_yardstick="v1_auto")
    doc = run_sweep(cfg, methods, progress=False)
    for r in doc["results"]:
        if r["method"] == "v1_auto":
            assert r["status"] == "wrong" and r["median_s"] is None and "correctness check" in r["reason"]
        else:
            assert r["status"] == "ok" and r["ratio"] is not None, r
        assert r["ratio_second"] is None, r


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "decode"])
def test_guard_compares_gda_with_the_gda_reference(mode):
    methods = {m.name: m for m in build_methods_gda("op", ratio=2)}
    chunked = methods["gda_chunked"]
    case = Case("op", mode, 2, 33, 64, 8, 2, torch.float32, "cpu")
    assert check_method(chunked, case).status == "pass"
    wrong = Method("gda_wrong", chunked.kind, "test double", chunked.flops, chunked.score_memory, chunked.unavailable,
                   chunked.prepare, lambda s: chunked.run({**s, "lam": s["lam"] * 0.98}), truth=chunked.truth)
    assert check_method(wrong, case).status == "wrong"
    no_truth = Method("gda_no_truth", chunked.kind, "test double", chunked.flops, chunked.score_memory,
                      chunked.unavailable, chunked.prepare, chunked.run)
    verdict = check_method(no_truth, case)
    assert verdict.status == "error" and "no truth" in verdict.detail


# ---- the truth the guard uses, against an independent statement ----------------------------------------


def _loop_gda(q, k, v, lam, ratio):
    """GDA on V1's tensors, written out per head: signal j is V1 map 2j, noise g is V1 map 2·g·r + 1,
    kv pair p = (k[2p], k[2p+1], v[p]); float64. Returns (B, N_s, Lq, 2d)."""
    q, k, v, lam = (t.to(torch.float64) for t in (q, k, v, lam))
    b, two_ns, lq, d = q.shape
    ns, pairs, lk = two_ns // 2, k.shape[1] // 2, k.shape[2]
    n_noise = ns // ratio
    vis = _visible(lq, lk, causal=True)
    out = torch.zeros(b, ns, lq, 2 * d, dtype=torch.float64)
    for bi in range(b):
        for j in range(ns):
            g = j // ratio
            ps, pn = j * pairs // ns, g * pairs // n_noise
            a_sig = softmax_visible(q[bi, 2 * j] @ k[bi, 2 * ps].T / math.sqrt(d), vis)
            a_noise = softmax_visible(q[bi, 2 * g * ratio + 1] @ k[bi, 2 * pn + 1].T / math.sqrt(d), vis)
            out[bi, j] = a_sig @ v[bi, ps] - lam[j] * (a_noise @ v[bi, pn])
    return out


@pytest.mark.parametrize(("ratio", "num_heads", "num_kv_heads"), [(2, 8, 2), (4, 16, 4), (1, 8, 4), (4, 16, 2)])
@pytest.mark.parametrize("mode", ["fwd", "decode"])
def test_bench_truth_and_plain_run_match_an_independent_statement(ratio, num_heads, num_kv_heads, mode):
    case = Case("op", mode, 2, 21, 8 * num_heads, num_heads, num_kv_heads, torch.float64, "cpu")
    t = make_tensors(case, seed=3)
    expected = _loop_gda(t["q"], t["k"], t["v"], t["lam"], ratio)
    truth = gda_truth(ratio)
    torch.testing.assert_close(truth(t["q"], t["k"], t["v"], t["lam"], True), expected, rtol=1e-12, atol=1e-12)
    # The plain run scales the guard's tolerance: in float64 it must be the same equation.
    torch.testing.assert_close(truth(t["q"], t["k"], t["v"], t["lam"], False), expected, rtol=1e-12, atol=1e-12)
    qs, qn, k, v = gda_inputs(t["q"], t["k"], t["v"], ratio)
    assert qs.is_contiguous() and qn.is_contiguous() and qn.shape[1] == num_heads // 2 // ratio
    torch.testing.assert_close(plain_gda(qs, qn, k, v, t["lam"]), expected, rtol=1e-12, atol=1e-12)


def _loop_separate_heads(q, k, v, lam):
    """N_s differential heads, each with its own signal map 2j and noise map 2j + 1 of V1's q, kv
    pair p = j·P / N_s; float64. Returns (B, N_s, Lq, 2d)."""
    q, k, v, lam = (t.to(torch.float64) for t in (q, k, v, lam))
    b, two_ns, lq, d = q.shape
    ns, pairs, lk = two_ns // 2, k.shape[1] // 2, k.shape[2]
    vis = _visible(lq, lk, causal=True)
    out = torch.zeros(b, ns, lq, 2 * d, dtype=torch.float64)
    for bi in range(b):
        for j in range(ns):
            p = j * pairs // ns
            a_sig = softmax_visible(q[bi, 2 * j] @ k[bi, 2 * p].T / math.sqrt(d), vis)
            a_noise = softmax_visible(q[bi, 2 * j + 1] @ k[bi, 2 * p + 1].T / math.sqrt(d), vis)
            out[bi, j] = (a_sig - lam[j] * a_noise) @ v[bi, p]
    return out


@pytest.mark.parametrize("v1_impl", ["auto", "chunked", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "decode"])
def test_the_v1_yardstick_is_ns_heads_each_with_its_own_noise_map(v1_impl, mode):
    """The yardstick computes N_s full differential heads on the case's tensors: the GDA rows' signal
    maps, plus a noise map per head where GDA reads only every r-th. A noise map GDA does not read
    changes the yardstick's output and not GDA's."""
    ratio = 2
    case = Case("op", mode, 1, 19, 64, 8, 2, torch.float64, "cpu")  # N_s = 4, N_n = 2, P = 1
    methods = {m.name: m for m in build_methods_gda("op", ratio=ratio, v1_impl=v1_impl)}
    v1 = methods[f"v1_{v1_impl}"]
    assert not v1.unavailable(case)
    t = make_tensors(case, seed=5)
    got = v1.run(v1.prepare(case, t))
    assert got.shape == (1, 4, case.q_len, 16)
    torch.testing.assert_close(got, _loop_separate_heads(t["q"], t["k"], t["v"], t["lam"]), rtol=1e-10, atol=1e-10)

    unread = 2 * 1 + 1  # head 1's noise map: GDA (r = 2) reads noise maps 1 and 5 only
    t2 = {**t, "q": t["q"].clone()}
    t2["q"][:, unread] += 1.0
    v1_diff = (v1.run(v1.prepare(case, t2)) - got).abs().amax(dim=(0, 2, 3))
    assert v1_diff[1] > 1e-6 and torch.all(v1_diff[[0, 2, 3]] == 0)
    truth = gda_truth(ratio)
    torch.testing.assert_close(truth(t2["q"], t2["k"], t2["v"], t2["lam"], True),
                               truth(t["q"], t["k"], t["v"], t["lam"], True), rtol=0, atol=0)


def test_at_r1_the_gda_case_is_the_v1_case():
    case = Case("op", "fwd", 1, 19, 64, 8, 4, torch.float64, "cpu")
    t = make_tensors(case, seed=1)
    v1 = msd.diff_attention(t["q"], t["k"], t["v"], t["lam"], is_causal=True, impl="reference")
    torch.testing.assert_close(gda_truth(1)(t["q"], t["k"], t["v"], t["lam"], True), v1, rtol=1e-12, atol=1e-12)


# ---- the command line ----------------------------------------------------------------------------------


def _cfg(argv):
    parser = bench_cli._parser()
    return bench_cli._config(parser.parse_args(argv), parser)


def test_gda_defaults_and_options_parse():
    cfg = _cfg(["--op", "gda", "--device", "cpu"])
    # N_s = 8 signal heads of d = 64, r = 4 (N_n = 2), P = N_n = 2 kv pairs.
    assert (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads) == (1024, 16, 4)
    assert cfg.second_yardstick == "v1_auto" and "N_n=2 noise heads (r=4), P=2 kv pairs, d=64" in cfg.note
    cfg = _cfg(["--op", "gda", "--device", "cpu", "--gda-ratio", "2", "--gda-v1", "chunked"])
    assert cfg.num_kv_heads == 8 and cfg.second_yardstick == "v1_chunked" and "(r=2)" in cfg.note
    cfg = _cfg(["--op", "gda", "--device", "cpu", "--embed-dim", "768", "--num-kv-heads", "2"])
    assert (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads) == (768, 16, 2)
    v1 = _cfg(["--device", "cpu"])  # the V1 defaults are unchanged
    assert (v1.embed_dim, v1.num_heads, v1.num_kv_heads, v1.second_yardstick, v1.note) == (768, 12, 12, None, "")


def test_cli_default_ratio_is_the_cases_default():
    from multihead_sdpadiff.bench.cases_gda import DEFAULT_RATIO

    assert bench_cli.DEFAULT_GDA_RATIO == DEFAULT_RATIO == 4


@pytest.mark.parametrize("argv", [
    ["--op", "gda", "--gda-ratio", "3"],  # 3 does not divide N_s = 8
    ["--op", "gda", "--gda-ratio", "0"],
    ["--op", "gda", "--num-kv-heads", "8"],  # P = 4 kv pairs do not divide N_n = 2
    ["--op", "gda", "--gda-v1", "nonsense"],
    ["--gda-ratio", "2"],  # without --op gda
    ["--op", "v2", "--gda-v1", "auto"],
])
def test_bad_gda_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _cfg(["--device", "cpu", *argv])
    assert exc.value.code == 2
    assert "--gda" in capsys.readouterr().err  # the message names the option


@pytest.mark.parametrize("extra", [["--level", "module"], ["--window", "8"], ["--docs", "2"],
                                   ["--impls", "gda_nonsense"]])
def test_gda_refuses_what_it_cannot_run(extra, tmp_path):
    with pytest.raises(SystemExit):
        main([*GDA_TINY, "--out", str(tmp_path), *extra])


def test_impls_keeps_both_yardsticks(tmp_path):
    rc = main([*GDA_TINY, "--seq-lens", "32", "--modes", "fwd", "--impls", "gda_chunked", "--gda-v1", "chunked",
               "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in doc["results"]} == {"standard", "v1_chunked", "gda_chunked"}


def test_build_methods_gda_rejects_bad_arguments():
    with pytest.raises(ValueError, match="op level"):
        build_methods_gda("module")
    with pytest.raises(ValueError, match="ratio"):
        build_methods_gda("op", ratio=0)
    with pytest.raises(ValueError, match="v1_impl"):
        build_methods_gda("op", v1_impl="nonsense")
