"""Tests of the fused Triton differential attention, run on CPU tensors with the
Triton interpreter, against an independent float64 reference."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

import subprocess
import sys

import pytest
import torch

import multihead_sdpadiff.ops.triton_fused as ft  # noqa: E402
from multihead_sdpadiff.ops.triton_fused import triton_diff_attention, triton_not_supported_reasons  # noqa: E402

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton not installed")


# ---------------------------------------------------------------------------
# reference: plain torch, explicit loop over differential heads, explicit
# visibility mask; rows that see no key give exactly zero.
# ---------------------------------------------------------------------------

def reference(q, k, v, lam, attn_mask, is_causal, scale):
    B, H2, Lq, d = q.shape
    Lk = k.shape[2]
    H, Hkv = H2 // 2, k.shape[1] // 2
    group = H // Hkv
    visible = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    additive = torch.zeros(B, H, Lq, Lk, dtype=q.dtype)
    if attn_mask is not None:
        full = attn_mask.expand(B, H, Lq, Lk)
        if full.dtype == torch.bool:
            visible &= full
        else:
            additive = additive + full.to(q.dtype)
            visible &= full != float("-inf")
    if is_causal:
        rows = torch.arange(Lq)[:, None]
        cols = torch.arange(Lk)[None, :]
        visible &= cols <= rows + (Lk - Lq)
    heads = []
    for i in range(H):
        g = i // group
        out = torch.zeros(B, Lq, 2 * d, dtype=q.dtype)
        for part in (0, 1):
            s = q[:, 2 * i + part] @ k[:, 2 * g + part].transpose(-1, -2) * scale + additive[:, i]
            s = s.masked_fill(~visible[:, i], float("-inf"))
            top = s.amax(-1, keepdim=True).detach()
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            p = torch.exp(s - top)
            denom = p.sum(-1, keepdim=True)
            attn = p / torch.where(denom > 0, denom, torch.ones_like(denom))
            term = attn @ v[:, g]
            out = out + term if part == 0 else out - lam[i] * term
        heads.append(out)
    return torch.stack(heads, 1)


def make_inputs(B, H, Hkv, Lq, Lk, d, dtype=torch.float32, seed=0, layout="bhld"):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)

    if layout == "blhd":  # (B, L, heads, d) transposed to (B, heads, L, d): non-contiguous
        q = rnd(B, Lq, 2 * H, d).transpose(1, 2)
        k = rnd(B, Lk, 2 * Hkv, d).transpose(1, 2)
        v = rnd(B, Lk, Hkv, 2 * d).transpose(1, 2)
    else:
        q, k, v = rnd(B, 2 * H, Lq, d), rnd(B, 2 * Hkv, Lk, d), rnd(B, Hkv, Lk, 2 * d)
    lam = (0.2 + 0.6 * torch.rand(H, generator=gen)).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    return q, k, v, lam


def run_both(q, k, v, lam, mask, causal, scale=None, dout=None):
    """Kernel output + grads, float64 reference output + grads (same dout)."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, lam)]
    out = triton_diff_attention(*leaves, mask, causal, scale)
    if dout is None:
        gen = torch.Generator().manual_seed(123)
        dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dout)

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, lam)]
    ref_mask = mask.double() if (mask is not None and mask.is_floating_point()) else mask
    ref = reference(*ref_leaves, ref_mask, causal, scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    return out, grads, ref, ref_grads, dout


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_fp32(out, grads, ref, ref_grads, tol=1e-5):
    assert torch.isfinite(out).all()
    names = ("out", "dq", "dk", "dv", "dlam")
    for name, a, b in zip(names, (out, *grads), (ref, *ref_grads), strict=True):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        bound = tol * max(1.0, b.abs().max().item())
        err = max_err(a, b)
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def set_blocks(monkeypatch, bm, bn):
    for kind in ("fwd", "bwd_kv", "bwd_q", "bwd_pre"):
        monkeypatch.setitem(ft.CONFIG_OVERRIDE, kind, dict(BLOCK_M=bm, BLOCK_N=bn))


# ---------------------------------------------------------------------------
# float32 against the float64 reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,d,causal", [
    (2, 2, 2, 37, 37, 16, False),   # MHA, odd length, 3 tiles of 16
    (1, 4, 2, 33, 33, 32, True),    # GQA 2, causal square
    (1, 3, 1, 20, 29, 16, False),   # GQA 3, Lq != Lk
    (1, 3, 1, 97, 97, 16, True),    # GQA 3, causal, odd length 97
    (1, 1, 1, 16, 24, 64, True),    # d = 64
])
def test_fp32_basic(B, H, Hkv, Lq, Lk, d, causal):
    check_fp32(*run_both(*make_inputs(B, H, Hkv, Lq, Lk, d), None, causal)[:4])


def test_noncontiguous_inputs_and_grad():
    q, k, v, lam = make_inputs(2, 4, 2, 19, 23, 16, layout="blhd")
    assert not q.is_contiguous() and not v.is_contiguous()
    # upstream gradient with non-unit strides as well
    gen = torch.Generator().manual_seed(5)
    dout = torch.randn(2, 19, 4, 32, generator=gen).transpose(1, 2)
    check_fp32(*run_both(q, k, v, lam, None, False, dout=dout)[:4])


def test_bool_mask_with_empty_rows():
    B, H, Hkv, Lq, Lk, d = 2, 3, 1, 21, 26, 16
    q, k, v, lam = make_inputs(B, H, Hkv, Lq, Lk, d, seed=1)
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(B, H, Lq, Lk, generator=gen) > 0.4
    mask[0, 1, 3] = False  # a row that sees nothing
    mask[1, :, 20] = False
    out, grads, ref, ref_grads, _ = run_both(q, k, v, lam, mask, False)
    check_fp32(out, grads, ref, ref_grads)
    assert (out[0, 1, 3] == 0).all() and (out[1, :, 20] == 0).all()
    assert (grads[0][0, 2:4, 3] == 0).all()  # dq of the empty row, both maps


def test_additive_mask_with_neg_inf():
    B, H, Hkv, Lq, Lk, d = 1, 2, 2, 18, 35, 16
    q, k, v, lam = make_inputs(B, H, Hkv, Lq, Lk, d, seed=3)
    gen = torch.Generator().manual_seed(4)
    mask = torch.randn(B, 1, Lq, Lk, generator=gen)  # broadcast over heads
    mask[torch.rand(mask.shape, generator=gen) < 0.3] = float("-inf")
    mask[0, 0, 5] = float("-inf")  # fully hidden row
    out, grads, ref, ref_grads, _ = run_both(q, k, v, lam, mask, False)
    check_fp32(out, grads, ref, ref_grads)
    assert (out[:, :, 5] == 0).all()


def test_key_padding_mask_gqa():
    B, H, Hkv, Lq, Lk, d = 2, 4, 2, 17, 30, 32
    q, k, v, lam = make_inputs(B, H, Hkv, Lq, Lk, d, seed=5)
    lengths = torch.tensor([30, 11])
    mask = (torch.arange(Lk)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    check_fp32(*run_both(q, k, v, lam, mask, False)[:4])


def test_causal_with_bool_mask():
    B, H, Hkv, Lq, Lk, d = 1, 2, 1, 25, 31, 16
    q, k, v, lam = make_inputs(B, H, Hkv, Lq, Lk, d, seed=6)
    gen = torch.Generator().manual_seed(7)
    mask = torch.rand(B, H, 1, Lk, generator=gen) > 0.3
    check_fp32(*run_both(q, k, v, lam, mask, True)[:4])


@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("Lq,Lk", [(7, 40), (1, 97), (40, 23), (33, 34)])
def test_causal_rectangular(monkeypatch, bm, bn, Lq, Lk):
    """Bottom-right causal with Lq < Lk (chunked prefill, decode) and Lq > Lk."""
    set_blocks(monkeypatch, bm, bn)
    q, k, v, lam = make_inputs(1, 2, 1, Lq, Lk, 16, seed=Lq + Lk)
    out, grads, ref, ref_grads, _ = run_both(q, k, v, lam, None, True)
    check_fp32(out, grads, ref, ref_grads)
    if Lq > Lk:  # the first Lq - Lk rows see no key at all
        empty = Lq - Lk
        assert (out[:, :, :empty] == 0).all()
        assert (grads[0][:, :, :empty] == 0).all()


def test_float64():
    q, k, v, lam = make_inputs(1, 2, 1, 23, 29, 16, dtype=torch.float64, seed=8)
    check_fp32(*run_both(q, k, v, lam, None, True)[:4], tol=1e-10)


def test_custom_scale_and_partial_requires_grad():
    q, k, v, lam = make_inputs(1, 2, 2, 9, 13, 16, seed=9)
    q.requires_grad_()
    v.requires_grad_()
    out = triton_diff_attention(q, k, v, lam, None, False, 0.3)
    dq, dv = torch.autograd.grad(out.sum(), (q, v))  # upstream grad: expanded, strides 0
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, lam)]
    ref = reference(*ref_leaves, None, False, 0.3)
    rdq, _, rdv, _ = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
    assert max_err(out, ref) < 1e-5 and max_err(dq, rdq) < 1e-5 and max_err(dv, rdv) < 1e-5
    with torch.no_grad():  # the inference path (no auxiliary outputs) agrees
        assert max_err(triton_diff_attention(q, k, v, lam, None, False, 0.3), out) == 0


def test_empty_key_sequence():
    q, k, v, lam = make_inputs(1, 2, 1, 5, 0, 16)
    q.requires_grad_()
    out = triton_diff_attention(q, k, v, lam, None, True, 0.25)
    assert out.shape == (1, 2, 5, 32) and (out == 0).all()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert (dq == 0).all()


# ---------------------------------------------------------------------------
# low precision: held to ~2x the error of a plain torch run in that dtype
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,causal", [(torch.bfloat16, True), (torch.float16, False)])
def test_low_precision(dtype, causal):
    B, H, Hkv, Lq, Lk, d = 1, 2, 1, 40, 40, 32
    q, k, v, lam = make_inputs(B, H, Hkv, Lq, Lk, d, dtype=dtype, seed=10)
    out, grads, ref, ref_grads, dout = run_both(q, k, v, lam, None, causal)
    assert out.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, (q, k, v, lam), strict=True))

    low = [t.detach().clone().requires_grad_() for t in (q, k, v, lam.to(dtype))]
    low_out = reference(*low, None, causal, d ** -0.5)
    low_grads = torch.autograd.grad(low_out, low, dout)
    names = ("out", "dq", "dk", "dv", "dlam")
    for name, a, b, base in zip(names, (out, *grads), (ref, *ref_grads), (low_out, *low_grads), strict=True):
        err, base_err = max_err(a, b), max_err(base, b)
        assert err <= 2 * base_err + 1e-6, f"{name}: {err:.3e} vs torch {dtype} {base_err:.3e}"


# ---------------------------------------------------------------------------
# support checks and packaging
# ---------------------------------------------------------------------------

def test_supported_reasons():
    q, k, v, lam = make_inputs(1, 2, 1, 8, 8, 16)
    assert triton_not_supported_reasons(q, k, v, lam, None, True) == []
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    assert triton_not_supported_reasons(q, k, v, lam, mask, False) == []

    q48, k48, v48, _ = make_inputs(1, 2, 1, 8, 8, 48)
    assert any("head dim" in r for r in triton_not_supported_reasons(q48, k48, v48, lam, None, False))
    qi = q.to(torch.int32)
    assert any("dtype" in r for r in triton_not_supported_reasons(qi, k, v, lam, None, False))
    bad_mask = torch.ones(1, 3, 8, 8, dtype=torch.bool)
    assert any("broadcast" in r for r in triton_not_supported_reasons(q, k, v, lam, bad_mask, False))
    int_mask = torch.ones(1, 1, 8, 8, dtype=torch.int64)
    assert any("attn_mask" in r for r in triton_not_supported_reasons(q, k, v, lam, int_mask, False))
    q3, k3, v3, lam3 = make_inputs(1, 3, 2, 8, 8, 16)
    assert any("multiple" in r for r in triton_not_supported_reasons(q3, k3, v3, lam3, None, False))


def test_supported_reasons_environment(monkeypatch):
    q, k, v, lam = make_inputs(1, 2, 1, 8, 8, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("CPU" in r for r in triton_not_supported_reasons(q, k, v, lam, None, False))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    real = ft.importlib.util.find_spec
    monkeypatch.setattr(ft.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    assert any("not installed" in r for r in triton_not_supported_reasons(q, k, v, lam, None, False))


def test_import_does_not_import_triton():
    code = ("import sys, multihead_sdpadiff, multihead_sdpadiff.ops.triton_fused; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
