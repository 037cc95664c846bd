"""cpu_fused beyond the generated tests: float32 gradients on every case (the generated float64 tests
skip it), odd sizes and several key tiles, bf16 at large magnitudes, the torch op contract
(opcheck, fullgraph compile, export) and the refusal when no compiler is available."""

from __future__ import annotations

import pytest
import torch

from multihead_sdpadiff import choose_impl, diff_attention, diff_attention_varlen
from multihead_sdpadiff.ops import _prepare, cpu_fused, get_strategy
from tests.ops.test_diff_attention import CASES, case_id, make_inputs
from tests.ops.test_window_varlen import WINDOW_CASES, cu, to_op, wid, window_inputs
from tests.oracle import naive_low_precision, oracle_attention

pytestmark = pytest.mark.skipif(
    bool(cpu_fused.not_supported_reasons()), reason="; ".join(cpu_fused.not_supported_reasons()) or "supported"
)


def _check_against_oracle(q, k, v, lam, mask, causal, okw, tol=3e-5, window=None):
    out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, window=window, impl="cpu_fused")
    want = oracle_attention(q.double(), k.double(), v.double(), lam.double(), causal=causal, window=window, **okw)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v, lam), g.to(out.dtype))
    exp = torch.autograd.grad(want, (q, k, v, lam), g)
    for name, a, b in zip("qkvλ", got, exp, strict=True):
        assert a.dtype == b.dtype or a.dtype == torch.float32, name
        scale = b.abs().max().item() or 1.0
        torch.testing.assert_close(a.double() / scale, b.double() / scale, rtol=tol, atol=tol, msg=f"grad of {name}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_outputs_and_gradients(case):
    q, k, v, lam, mask, causal, okw = make_inputs(case, torch.float32, requires_grad=True)
    lam = lam.detach().float().requires_grad_()
    _check_against_oracle(q, k, v, lam, mask, causal, okw)


@pytest.mark.parametrize("shape", [
    (1, 2, 1, 97, 97, 80, True),  # GQA 2:1, d = 80
    (1, 1, 1, 1025, 1025, 24, True),  # three key tiles, the last one ragged
    (2, 2, 2, 300, 1025, 40, True),  # Lq < Lk across tiles (chunked prefill)
    (1, 3, 1, 1, 1025, 40, True),  # decode step: the dot-product path, GQA 3:1
    (1, 2, 2, 3, 203, 20, True),  # decode path with d and Lk not multiples of the vector or key blocks
], ids=lambda s: "B{}-H{}-Hkv{}-Lq{}-Lk{}-d{}".format(*s[:6]))
def test_odd_sizes_and_several_key_tiles(shape):
    b, h, hkv, lq, lk, d, causal = shape
    g = torch.Generator().manual_seed(lq + lk + d)
    q = torch.randn(b, 2 * h, lq, d, generator=g).requires_grad_()
    k = torch.randn(b, 2 * hkv, lk, d, generator=g).requires_grad_()
    v = torch.randn(b, hkv, lk, 2 * d, generator=g).requires_grad_()
    lam = torch.rand(h, generator=g).requires_grad_()
    pad = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    pad[0, ..., : lk // 3] = False  # left padding: the first key tile is skipped for batch 0's rows
    _check_against_oracle(q, k, v, lam, pad, causal, {"bool_mask": pad})


@pytest.mark.parametrize("keys", [130, 200])
def test_long_key_ranges_take_tall_forward_blocks(keys, monkeypatch):
    """From LONG_KEYS keys on the forward stacks FWD_BLOCK_ROWS_LONG rows per block; the threshold is
    lowered here so that a small call crosses it, with a block height that is no multiple of the
    GQA group and blocks that end inside a key tile."""
    monkeypatch.setattr(cpu_fused, "LONG_KEYS", 150)
    monkeypatch.setattr(cpu_fused, "FWD_BLOCK_ROWS", 8)
    monkeypatch.setattr(cpu_fused, "FWD_BLOCK_ROWS_LONG", 21)
    monkeypatch.setattr(cpu_fused, "KEY_TILE", 32)
    assert cpu_fused.forward_block_rows(keys) == (21 if keys >= 150 else 8)
    g = torch.Generator().manual_seed(keys)
    h, hkv, d = 4, 2, 16
    q = torch.randn(1, 2 * h, keys, d, generator=g).requires_grad_()
    k = torch.randn(1, 2 * hkv, keys, d, generator=g).requires_grad_()
    v = torch.randn(1, hkv, keys, 2 * d, generator=g).requires_grad_()
    lam = torch.rand(h, generator=g).requires_grad_()
    pad = torch.ones(1, 1, 1, keys, dtype=torch.bool)
    pad[..., :7] = False
    _check_against_oracle(q, k, v, lam, pad, True, {"bool_mask": pad})


def test_tall_blocks_keep_the_exp_buffer_bounded():
    rows = cpu_fused.forward_block_rows
    assert rows(cpu_fused.LONG_KEYS - 1) == cpu_fused.FWD_BLOCK_ROWS
    assert rows(16384) == cpu_fused.FWD_BLOCK_ROWS_LONG
    for keys in (16384, 20000, 32768, 65536, 1 << 20):
        assert rows(keys) * keys * 8 <= cpu_fused.LONG_EXP_BYTES or rows(keys) == cpu_fused.FWD_BLOCK_ROWS
    assert rows(32768) == 64 and rows(1 << 20) == cpu_fused.FWD_BLOCK_ROWS


@pytest.mark.parametrize("case", WINDOW_CASES, ids=wid)
def test_float32_windows(case):
    """Sliding windows are per-row key intervals (AttentionMask.row_bounds), as causal is."""
    q, k, v, lam, mask, okw = window_inputs(case)
    q, k, v, lam = (t.detach().float().requires_grad_() for t in (q, k, v, lam))
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
        okw = {"add_mask": mask}
    _check_against_oracle(q, k, v, lam, mask, case[5], okw, window=case[6])


@pytest.mark.parametrize("causal,window", [(True, None), (False, (3, 2))])
def test_float32_packed_sequences(causal, window):
    lens_q, lens_k, h, hkv, d = [5, 0, 9, 1], [7, 3, 9, 4], 2, 1, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lens_q), 2 * h, d, generator=g).requires_grad_()
    k = torch.randn(sum(lens_k), 2 * hkv, d, generator=g).requires_grad_()
    v = torch.randn(sum(lens_k), hkv, 2 * d, generator=g).requires_grad_()
    lam = torch.rand(h, generator=g).requires_grad_()
    out = diff_attention_varlen(q, k, v, lam, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                is_causal=causal, window=window, impl="cpu_fused")
    want = oracle_attention(*(to_op(t.double()) for t in (q, k, v)), lam.double(), causal=causal, window=window,
                            seqlens=(lens_q, lens_k))[0].transpose(0, 1)
    torch.testing.assert_close(out.double(), want, rtol=3e-5, atol=3e-5)
    gr = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v, lam), gr.float())
    exp = torch.autograd.grad(want, (q, k, v, lam), gr)
    for name, a, b in zip("qkvλ", got, exp, strict=True):
        scale = b.abs().max().item() or 1.0
        torch.testing.assert_close(a.double() / scale, b.double() / scale, rtol=3e-5, atol=3e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_at_large_magnitudes(dtype):
    """Scores of magnitude ~100: the softmax statistics must stay in float32 (2x a plain run's error)."""
    q, k, v, lam, mask, causal, okw = make_inputs(CASES[2], torch.float64)
    q, k = q * 4, k * 4  # |scores| up to ~100 at d = 24
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, impl="cpu_fused")
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = oracle_attention(q.double(), k.double(), v.double(), lam, causal=causal, **okw)
    plain = naive_low_precision(q, k, v, lam, causal=causal, **okw)
    err = (out.double() - want).abs().max().item()
    plain_err = (plain.double() - want).abs().max().item()
    assert err <= 2 * plain_err + 1e-3, (err, plain_err)


def test_low_precision_gradients_are_finite_and_close():
    q, k, v, lam, mask, causal, okw = make_inputs(CASES[3], torch.bfloat16, requires_grad=True)
    lam = lam.detach().float().requires_grad_()
    out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, impl="cpu_fused")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, lam), g)
    want_out = oracle_attention(q.double(), k.double(), v.double(), lam.double(), causal=causal, **okw)
    want = torch.autograd.grad(want_out, (q, k, v, lam), g.double())
    for name, a, b in zip("qkvλ", got, want, strict=True):
        assert torch.isfinite(a).all(), name
        rel = (a.double() - b).norm() / b.norm()
        assert rel < 2e-2, (name, rel.item())


def _op_args(case=CASES[3], dtype=torch.float32):
    q, k, v, lam, mask, causal, _ = make_inputs(case, dtype, requires_grad=True)
    inputs = _prepare(q, k, v, lam.detach().float().requires_grad_(), mask, causal, None)
    lo, hi = cpu_fused.row_intervals(inputs.mask, q.device)
    return (inputs.q, inputs.k, inputs.v, inputs.lam, lo, hi, inputs.mask.tensor, inputs.scale,
            cpu_fused.FWD_BLOCK_ROWS, 4)  # key tiles of 4: several tiles even at these sizes


def test_opcheck():
    torch.library.opcheck(torch.ops.sdpadiff.cpu_fused_fwd.default, _op_args())
    torch.library.opcheck(torch.ops.sdpadiff.cpu_fused_fwd.default, _op_args(CASES[1]))


def test_auto_picks_it_and_compiles_fullgraph_forward_and_backward():
    q, k, v = torch.randn(1, 4, 33, 16), torch.randn(1, 2, 33, 16), torch.randn(1, 1, 33, 32)
    assert choose_impl(q, k, v, 0.5, is_causal=True)[0] == "cpu_fused"
    assert choose_impl(q[:, :, :1], k, v, 0.5, is_causal=True)[0] == "cpu_fused"  # decode
    lam = torch.tensor([0.3, 0.6], requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def run(q, k, v, lam):
        return diff_attention(q, k, v, lam, is_causal=True)

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = run(qs, ks, vs, lam)
    want = diff_attention(q, k, v, lam.detach(), is_causal=True, impl="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qs, ks, vs, lam))


def test_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return diff_attention(q, k, v, 0.5, is_causal=True, impl="cpu_fused")

    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 16)
    ep = torch.export.export(M(), (q, k, v))
    assert any("cpu_fused_fwd" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(q, k, v), M()(q, k, v), rtol=0, atol=0)


def test_no_compiler_refuses_with_the_reason_and_auto_moves_on(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_module", None)
    monkeypatch.setattr(cpu_fused, "_compiler", lambda: None)
    monkeypatch.setattr(cpu_fused, "_TOOLCHAIN", None)  # looked up again, now without a compiler
    q, k, v = torch.randn(1, 4, 33, 8), torch.randn(1, 4, 33, 8), torch.randn(1, 2, 33, 16)
    reasons = get_strategy("cpu_fused").not_supported_reasons(_prepare(q, k, v, 0.5, None, True, None))
    assert any("no C++ compiler" in r for r in reasons)
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        diff_attention(q, k, v, 0.5, is_causal=True, impl="cpu_fused")
    assert choose_impl(q, k, v, 0.5, is_causal=True)[0] == "chunked"


def test_a_learnable_mask_is_refused():
    q, k, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 16)
    bias = torch.zeros(1, 2, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="gives the mask no gradient"):
        diff_attention(q, k, v, 0.5, attn_mask=bias, impl="cpu_fused")


def test_capability_flags_fall_back():
    assert "-DCPU_CAPABILITY_AVX512" in cpu_fused.capability_flags("AVX512")[1]
    assert "-DCPU_CAPABILITY_AVX2" in cpu_fused.capability_flags("AVX2")[1]
    tag, flags = cpu_fused.capability_flags("DEFAULT")
    assert tag == "default" and not any(f.startswith("-m") for f in flags)
    assert cpu_fused._load().vec_is_native() == (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


@pytest.mark.parametrize("lq", [1, 3, 40])
def test_reads_a_preallocated_cache_slice_in_place(lq):
    """k and v as a KV cache hands them out (a prefix of a longer buffer, so not contiguous) are read
    in place, not copied, and give the oracle's outputs and gradients."""
    b, h, hkv, d, lk, cap = 2, 4, 2, 16, 37, 64
    kbuf, vbuf = torch.randn(b, 2 * hkv, cap, d), torch.randn(b, hkv, cap, 2 * d)
    k, v = kbuf[:, :, :lk], vbuf[:, :, :lk]
    assert not k.is_contiguous() and cpu_fused._rows_dense(k) is k and cpu_fused._rows_dense(v) is v
    q = torch.randn(b, 2 * h, lq, d, requires_grad=True)
    kl, vl = k.clone().requires_grad_(), v.clone().requires_grad_()
    lam = torch.tensor([0.2, 0.5, 0.7, 0.4], requires_grad=True)
    with torch.no_grad():  # the decode path: the kernel without the op's dispatcher
        got = diff_attention(q, k, v, lam, is_causal=True, impl="cpu_fused")
    want = oracle_attention(q.double(), k.double(), v.double(), lam.double(), causal=True)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # With gradients the op path runs on strided leaves of the same layout.
    ks = kbuf.clone()[:, :, :lk].detach().requires_grad_()
    vs = vbuf.clone()[:, :, :lk].detach().requires_grad_()
    assert not ks.is_contiguous()
    out = diff_attention(q, ks, vs, lam, is_causal=True, impl="cpu_fused")
    g = torch.randn_like(out)
    got_g = torch.autograd.grad(out, (q, ks, vs, lam), g)
    want_out = oracle_attention(q.double(), kl.double(), vl.double(), lam.double(), causal=True)
    want_g = torch.autograd.grad(want_out, (q, kl, vl, lam), g.double())
    for name, a, w in zip("qkvλ", got_g, want_g, strict=True):
        assert (a.double() - w).abs().max() < 1e-5 * (1 + w.abs().max()), name


@pytest.mark.parametrize("lq, lk, mask", [(1, 1030, None), (3, 777, "padding"), (2, 600, "additive"), (1, 513, "dead")])
def test_decode_split_over_the_key_range_matches_the_oracle(lq, lk, mask):
    """With fewer (batch, kv group) tasks than threads, a decode step cuts the cache into chunks
    (one per thread) and merges them: the same outputs, and the same saved statistics, so the
    gradients through them are exact too."""
    b, h, hkv, d = 1, 2, 1, 16  # one kv group: one task
    q = torch.randn(b, 2 * h, lq, d, requires_grad=True)
    k = torch.randn(b, 2 * hkv, lk, d, requires_grad=True)
    v = torch.randn(b, hkv, lk, 2 * d, requires_grad=True)
    lam = torch.tensor([0.3, 0.7], requires_grad=True)
    okw, attn_mask = {}, None
    if mask == "padding":
        attn_mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        attn_mask[..., :100] = False
        okw["bool_mask"] = attn_mask
    elif mask in ("additive", "dead"):
        attn_mask = torch.randn(b, h, lq, lk)
        attn_mask[attn_mask > 1.0] = float("-inf")
        if mask == "dead":
            attn_mask[0, 1, 0] = float("-inf")  # a row that sees nothing
        okw["add_mask"] = attn_mask
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lo = torch.zeros(1, lq, dtype=torch.int32)
        chunks = cpu_fused._load().decode_chunks(q, k, v, lo, cpu_fused.FWD_BLOCK_ROWS, cpu_fused.KEY_TILE)
        assert chunks == 2  # the split path runs
        with torch.no_grad():
            got = diff_attention(q, k, v, lam, attn_mask=attn_mask, is_causal=True, impl="cpu_fused")
        out = diff_attention(q, k, v, lam, attn_mask=attn_mask, is_causal=True, impl="cpu_fused")
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v, lam), g)
    finally:
        torch.set_num_threads(threads)
    want = oracle_attention(q.double(), k.double(), v.double(), lam.double(), causal=True, **okw)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, got)
    want_g = torch.autograd.grad(want, (q, k, v, lam), g.double())
    for name, a, w in zip("qkvλ", grads, want_g, strict=True):
        assert (a.double() - w).abs().max() < 1e-5 * (1 + w.abs().max()), name
