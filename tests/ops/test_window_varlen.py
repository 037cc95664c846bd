"""Sliding windows and packed sequences (flash-attn's window_size and varlen) in every strategy.

Windows are checked against the float64 oracle's own statement of the band (tests/oracle.py);
packed rows against each sequence run alone through the oracle, outputs and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from multihead_sdpadiff import (
    IMPLS_V2,
    diff_attention,
    diff_attention_v2,
    diff_attention_v2_varlen,
    diff_attention_varlen,
)
from multihead_sdpadiff.ops import _prepare
from multihead_sdpadiff.ops.chunked import _Plan, chunked
from multihead_sdpadiff.ops.triton_fused import _kv_tile_table
from multihead_sdpadiff.ops.v2 import REGISTRY_V2
from tests.conftest import STRATEGIES, leaves_as, precision_for, skip_unless_supported
from tests.oracle import oracle_attention, oracle_attention_v2

V2_STRATEGIES = [n for n in IMPLS_V2 if n != "auto"]

# (B, H, Hkv, Lq, Lk, causal, window, mask kind)
WINDOW_CASES = [
    (1, 4, 2, 37, 37, True, (5, 0), None),  # transformers' sliding window W = 6, GQA
    (1, 2, 1, 9, 30, False, (4, 3), "additive"),  # Lq < Lk: the band sits bottom-right
    (2, 4, 4, 33, 33, False, (-1, 2), "padding"),  # right bound only, with key padding
    (1, 2, 2, 20, 20, True, (0, 0), None),  # each query sees itself only
    (1, 2, 2, 12, 5, True, (2, 4), None),  # Lq > Lk: early rows see nothing; causal caps the right side
]


def wid(case):
    b, h, hkv, lq, lk, causal, window, kind = case
    return f"B{b}-H{h}-Hkv{hkv}-Lq{lq}-Lk{lk}-{'causal' if causal else 'full'}-w{window[0]}_{window[1]}-{kind or 'nomask'}"


def rnd(g, *shape, requires_grad=True):
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


def window_inputs(case, d=16):
    b, h, hkv, lq, lk, causal, window, kind = case
    g = torch.Generator().manual_seed(lq * 100 + lk)
    q, k, v = rnd(g, b, 2 * h, lq, d), rnd(g, b, 2 * hkv, lk, d), rnd(g, b, hkv, lk, 2 * d)
    lam = (0.1 + 0.8 * torch.rand(h, generator=g, dtype=torch.float64)).requires_grad_(True)
    mask, okw = None, {}
    if kind == "padding":
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        mask[0, ..., :7] = False
        okw["bool_mask"] = mask
    elif kind == "additive":
        mask = torch.randn(b, 1, lq, lk, generator=g, dtype=torch.float64)
        mask[..., 2, :] = -math.inf
        okw["add_mask"] = mask
    return q, k, v, lam, mask, okw


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("impl", STRATEGIES)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=wid)
def test_window_equals_the_oracle_band(impl, case):
    _, _, _, _, _, causal, window, _ = case
    q, k, v, lam, mask, okw = window_inputs(case)
    skip_unless_supported(impl, q, k, v, lam, mask, causal)
    out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, window=window, impl=impl)
    want = oracle_attention(q, k, v, lam, causal=causal, window=window, **okw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for name, a, b in zip("qkvλ", grads(out, (q, k, v, lam), g), grads(want, (q, k, v, lam), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("case", WINDOW_CASES[:3], ids=wid)
def test_window_chunked_several_blocks(case, block):
    _, _, _, _, _, causal, window, _ = case
    q, k, v, lam, mask, okw = window_inputs(case, d=8)
    i = _prepare(q, k, v, lam, mask, causal, None, window)
    out = chunked(i.q, i.k, i.v, i.lam, i.mask, i.scale, block)
    want = oracle_attention(q, k, v, lam, causal=causal, window=window, **okw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for name, a, b in zip("qkvλ", grads(out, (q, k, v, lam), g), grads(want, (q, k, v, lam), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_chunked_reads_only_the_band():
    q, k, v = torch.randn(1, 4, 1000, 8), torch.randn(1, 4, 1000, 8), torch.randn(1, 2, 1000, 16)
    plan = _Plan(q, k, _prepare(q, k, v, 0.5, None, True, None, (63, 0)).mask, None)
    assert all(k1 - k0 <= 64 + plan.block - 1 for i0, i1, k0, k1 in plan.blocks)
    assert all(k0 == max(0, i0 - 63) and k1 == i1 for i0, i1, k0, k1 in plan.blocks)


def test_window_errors_name_the_argument():
    q, k, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 16)
    for bad, exc in (((-2, 0), ValueError), ((1, 2, 3), TypeError), ((1.0, 0), TypeError), (4, TypeError),
                     ((True, 0), TypeError)):
        with pytest.raises(exc, match="window"):
            diff_attention(q, k, v, 0.5, window=bad)
        with pytest.raises(exc, match="window"):
            diff_attention_v2(q, k[:, :2], v[:, :, :, :8], 0.5, window=bad)


@pytest.mark.parametrize("impl", V2_STRATEGIES + ["auto"])
def test_window_v2(impl):
    dtype, tol, gtol = precision_for(REGISTRY_V2, impl)  # cpu_fused: float32 against the same statement
    g = torch.Generator().manual_seed(3)
    q, k, v = leaves_as(dtype, rnd(g, 2, 4, 23, 16), rnd(g, 2, 1, 23, 16), rnd(g, 2, 1, 23, 16))
    lam = torch.rand(2, 2, 23, generator=g, dtype=torch.float64).requires_grad_(True)
    out = diff_attention_v2(q, k, v, lam, is_causal=True, window=(4, 0), impl=impl)
    want = oracle_attention_v2(q, k, v, lam, causal=True, window=(4, 0))
    torch.testing.assert_close(out.double(), want, **tol)
    gr = torch.randn_like(want)
    for a, b in zip(grads(out, (q, k, v, lam), gr.to(out.dtype)), grads(want, (q, k, v, lam), gr), strict=True):
        torch.testing.assert_close(a.double(), b.double(), **gtol)


# ---------------------------------------------------------------------------------------- varlen

# (lengths of q, lengths of k, causal, window): an empty document, a KV-cache-like one (Lk > Lq).
VARLEN_CASES = [
    ((5, 0, 17, 9), (5, 3, 20, 9), True, None),
    ((6, 11, 4), (6, 11, 4), False, None),
    ((13, 7, 10), (13, 9, 10), True, (3, 0)),
]


def vid(case):
    lq, lk, causal, window = case
    return f"q{'_'.join(map(str, lq))}-k{'_'.join(map(str, lk))}-{'causal' if causal else 'full'}-w{window}"


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def alone(q, k, v, lens_q, lens_k, run):
    """``run(q_s, k_s, v_s)`` on each document alone, in the packed layout, concatenated."""
    outs, a, c = [], 0, 0
    for nq, nk in zip(lens_q, lens_k, strict=True):
        if nq:
            outs.append(run(q[a:a + nq], k[c:c + nk], v[c:c + nk], a, nq))
        a, c = a + nq, c + nk
    return torch.cat(outs)


def to_op(t):  # (L, heads, w) -> (1, heads, L, w)
    return t.transpose(0, 1).unsqueeze(0)


@pytest.mark.parametrize("impl", STRATEGIES + ["auto"])
@pytest.mark.parametrize("hkv", [2, 1])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=vid)
def test_varlen_equals_each_sequence_alone(impl, case, hkv):
    lens_q, lens_k, causal, window = case
    h, d = 2, 16
    g = torch.Generator().manual_seed(sum(lens_q) + hkv)
    q, k, v = rnd(g, sum(lens_q), 2 * h, d), rnd(g, sum(lens_k), 2 * hkv, d), rnd(g, sum(lens_k), hkv, 2 * d)
    lam = (0.2 + 0.6 * torch.rand(h, generator=g, dtype=torch.float64)).requires_grad_(True)
    skip_unless_supported(impl, to_op(q), to_op(k), to_op(v), lam, None, causal)
    out = diff_attention_varlen(q, k, v, lam, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                is_causal=causal, window=window, impl=impl)
    assert out.shape == (sum(lens_q), h, 2 * d)

    def one(qs, ks, vs, _, __):
        if ks.shape[0] == 0:
            return torch.zeros(qs.shape[0], h, 2 * d, dtype=qs.dtype)
        return oracle_attention(to_op(qs), to_op(ks), to_op(vs), lam, causal=causal, window=window)[0].transpose(0, 1)

    want = alone(q, k, v, lens_q, lens_k, one)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    # The oracle's own packed statement agrees too (documents, causal and window in one row).
    packed = oracle_attention(to_op(q), to_op(k), to_op(v), lam, causal=causal, window=window,
                              seqlens=(lens_q, lens_k))[0].transpose(0, 1)
    torch.testing.assert_close(packed, want, rtol=1e-12, atol=1e-12)
    gr = torch.randn_like(out)
    for name, a, b in zip("qkvλ", grads(out, (q, k, v, lam), gr), grads(want, (q, k, v, lam), gr), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", V2_STRATEGIES)
@pytest.mark.parametrize("case", VARLEN_CASES[::2], ids=vid)
def test_varlen_v2_equals_each_sequence_alone(impl, case):
    dtype, tol, gtol = precision_for(REGISTRY_V2, impl)
    lens_q, lens_k, causal, window = case
    h, hkv, d = 4, 2, 8
    g = torch.Generator().manual_seed(7)
    q, k, v = leaves_as(dtype, rnd(g, sum(lens_q), 2 * h, d), rnd(g, sum(lens_k), hkv, d), rnd(g, sum(lens_k), hkv, d))
    lam = torch.rand(sum(lens_q), h, generator=g, dtype=torch.float64).requires_grad_(True)  # per token
    out = diff_attention_v2_varlen(q, k, v, lam, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                   is_causal=causal, window=window, impl=impl)
    assert out.shape == (sum(lens_q), h, d)

    def one(qs, ks, vs, a, nq):
        if ks.shape[0] == 0:
            return torch.zeros(nq, h, d, dtype=qs.dtype)
        lam_s = lam[a:a + nq].transpose(0, 1).unsqueeze(0)  # (1, H, nq)
        return oracle_attention_v2(to_op(qs), to_op(ks), to_op(vs), lam_s, causal=causal,
                                   window=window)[0].transpose(0, 1)

    want = alone(q, k, v, lens_q, lens_k, one)
    torch.testing.assert_close(out.double(), want.double(), **tol)
    gr = torch.randn_like(want)
    for a, b in zip(grads(out, (q, k, v, lam), gr.to(out.dtype)), grads(want, (q, k, v, lam), gr), strict=True):
        torch.testing.assert_close(a.double(), b.double(), **gtol)


def test_chunked_packed_blocks_stay_inside_their_document():
    lens = (100, 37, 300)
    q, k, v = torch.randn(1, 4, 437, 8), torch.randn(1, 4, 437, 8), torch.randn(1, 2, 437, 16)
    c = tuple(cu(lens).tolist())
    plan = _Plan(q, k, _prepare(q, k, v, 0.5, None, True, None, None, (c, c)).mask, 32)
    for i0, i1, k0, k1 in plan.blocks:
        s = max(n for n in range(3) if c[n] <= i0)
        assert c[s] <= k0 and k1 == i1 and i1 <= c[s + 1]


def test_kv_tile_table_matches_brute_force():
    """Every (query tile, key tile) pair with a visible key is visited, and 'full' tiles are full."""
    for lens_q, lens_k, window in (((5, 0, 17, 9), (5, 3, 20, 9), (3, 0)), ((40,), (40,), (-1, -1)),
                                   ((12,), (5,), (2, 4))):
        c = (tuple(cu(lens_q).tolist()), tuple(cu(lens_k).tolist()))
        lq, lk = sum(lens_q), sum(lens_k)
        q, k, v = torch.randn(1, 2, lq, 16), torch.randn(1, 2, lk, 16), torch.randn(1, 1, lk, 32)
        mask = _prepare(q, k, v, 0.5, None, True, None, window, c).mask
        lo, hi = mask.row_bounds()
        vis = mask.interval_mask()
        bm, bn = 4, 8
        table = _kv_tile_table(lo, hi, lq, lk, bm, bn)
        for n, (m0, fs, fe, m1) in enumerate(table.tolist()):
            assert m0 <= fs <= fe <= m1
            cols = vis[:, n * bn:(n + 1) * bn]
            for mt in range(0, lq, bm):
                tile = cols[mt:mt + bm]
                if tile.any():
                    assert m0 <= mt < m1
                if fs <= mt < fe:
                    assert tile.shape == (bm, bn) and tile.all()


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1, 5, 9], dtype=torch.int32), "cu_seqlens_q must start at 0"),
    (torch.tensor([0, 6, 5, 9], dtype=torch.int32), "cu_seqlens_q must be non-decreasing"),
    (torch.tensor([0, 5, 8], dtype=torch.int32), "cu_seqlens_q must end at the total length 9"),
    (torch.tensor([0, 5, 9], dtype=torch.int64), "cu_seqlens_q must have dtype torch.int32"),
    (torch.tensor([[0, 5, 9]], dtype=torch.int32), "cu_seqlens_q must be 1-D"),
    (torch.tensor([0, 5, 9], dtype=torch.int32, device="meta"), "cu_seqlens_q must be on the queries' device"),
    ([0, 5, 9], "cu_seqlens_q must be an int32 tensor"),
])
def test_bad_cu_seqlens(bad, match):
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 1, 16)
    good = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises((ValueError, TypeError), match=match):
        diff_attention_varlen(q, k, v, 0.5, bad, good, 5, 5)
    with pytest.raises((ValueError, TypeError), match=match.replace("_q", "_k")):
        diff_attention_varlen(q, k, v, 0.5, good, bad, 5, 5)


def test_bad_varlen_arguments():
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 1, 16)
    c = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q 4 is smaller than the longest sequence"):
        diff_attention_varlen(q, k, v, 0.5, c, c, 4, 5)
    with pytest.raises(ValueError, match="same length"):
        diff_attention_varlen(q, k, v, 0.5, c, torch.tensor([0, 9], dtype=torch.int32), 5, 9)
    with pytest.raises(ValueError, match="q must be 3-D"):
        diff_attention_varlen(q[None], k, v, 0.5, c, c, 5, 5)
    with pytest.raises(ValueError, match="window"):
        diff_attention_varlen(q, k, v, 0.5, c, c, 5, 5, window=(-3, 0))
