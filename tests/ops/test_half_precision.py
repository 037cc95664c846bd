"""Half precision at large score magnitudes: every strategy within 2x of a plain low-precision SDPA run.

Scores this large are where a strategy that forms QKᵀ in the input dtype breaks: float16 scores
past 65504 overflow to inf (and the output to NaN), and bfloat16's 8-bit mantissa gives errors of
several percent once |q|, |k| reach about 8. The yardstick is the equation computed with one plain
``F.scaled_dot_product_attention`` call per map in the low dtype (torch's own kernels keep their
scores in float32); the truth is the float64 oracle on the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multihead_sdpadiff import diff_attention
from tests.conftest import STRATEGIES, skip_unless_supported
from tests.oracle import oracle_attention

IMPLS = [*STRATEGIES, "auto"]


def plain_sdpa(q, k, v, lam, causal):
    """(softmax(q1 k1ᵀ) − λ softmax(q2 k2ᵀ)) v with two plain SDPA calls in the inputs' dtype."""
    h, hkv = q.shape[1] // 2, k.shape[1] // 2
    k2 = k.unflatten(1, (hkv, 2))  # (B, Hkv, 2, Lk, d)
    o1, o2 = (F.scaled_dot_product_attention(q[:, c::2], k2[:, :, c], v, is_causal=causal, enable_gqa=True)
              for c in (0, 1))  # (B, H, L, 2d) each
    return o1 - lam.to(q.dtype).view(1, h, 1, 1) * o2


def large_inputs(kind, b=1, h=4, hkv=2, length=40, d=32, seed=0, magnitude=8.0, requires_grad=False):
    """``"fp16_overflow"``: q and k share a sign pattern, so scaled scores pass 65504 (checked below).
    ``"bf16_large"``: i.i.d. normal q and k times ``magnitude`` (|q|, |k| about 8 by default)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "fp16_overflow":
        dtype = torch.float16
        sign = torch.randn(d, generator=g).sign()
        q = (sign + 0.3 * torch.randn(b, 2 * h, length, d, generator=g)) * 100
        k = (sign + 0.3 * torch.randn(b, 2 * hkv, length, d, generator=g)) * 100
    else:
        dtype = torch.bfloat16
        q = torch.randn(b, 2 * h, length, d, generator=g) * magnitude
        k = torch.randn(b, 2 * hkv, length, d, generator=g) * magnitude
    v = torch.randn(b, hkv, length, 2 * d, generator=g)
    lam = 0.1 + 0.8 * torch.rand(h, generator=g)
    q, k, v = (t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))
    return q, k, v, lam


def max_score(q, k):
    kk = k.double().unflatten(1, (k.shape[1] // 2, 2)).repeat_interleave(q.shape[1] // k.shape[1], dim=1).flatten(1, 2)
    return (q.double() @ kk.transpose(-1, -2)).abs().max().item() * q.shape[-1] ** -0.5


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.fixture(params=[None, "16"], ids=["default-block", "block16"])
def chunk_env(request, monkeypatch):
    """chunked with one block (k read in place) and with several (k transposed once)."""
    if request.param:
        monkeypatch.setenv("SDPADIFF_CHUNK", request.param)


@pytest.mark.parametrize("kind", ["fp16_overflow", "bf16_large"])
@pytest.mark.parametrize("impl", IMPLS)
def test_large_scores_forward_within_twice_plain_sdpa(impl, kind, chunk_env):
    q, k, v, lam = large_inputs(kind)
    if kind == "fp16_overflow":
        assert max_score(q, k) > 65504  # the case really overflows float16 if formed in it
    skip_unless_supported(impl, q, k, v, lam, None, True)
    out = diff_attention(q, k, v, lam, is_causal=True, impl=impl)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    want = oracle_attention(q, k, v, lam, causal=True)
    err, plain = rel_err(out, want), rel_err(plain_sdpa(q, k, v, lam, True), want)
    assert err <= 2 * plain, (err, plain)


# The gradients' yardstick is the same plain SDPA run, whose backward (math path: V is 2d wide)
# keeps dS in float32 on CPU. The sdpa_* strategies run torch's flash backward, which rounds dS to
# the input dtype (about 7x the yardstick's error on dq here, torch's own choice), so they are not
# held to it. The Triton kernel rounds dS to the input dtype too (as FlashAttention-2 does): in
# float16 at these magnitudes the small dS entries underflow and dq loses about a third of its
# RMS. Recorded as a known gap, not fixed without a GPU to measure the cost of the fix.
TRITON_DS_GAP = pytest.mark.xfail(
    strict=True, reason="triton backward rounds dS to the input dtype before dQ/dK (FlashAttention-2 style)")


@pytest.mark.parametrize("kind", ["fp16_overflow", "bf16_large"])
@pytest.mark.parametrize("impl", ["reference", "chunked", "auto", pytest.param("triton", marks=TRITON_DS_GAP)])
def test_large_scores_gradients_within_twice_plain_sdpa(impl, kind, chunk_env):
    q, k, v, lam = large_inputs(kind, requires_grad=True)
    skip_unless_supported(impl, q, k, v, lam, None, True)
    out = diff_attention(q, k, v, lam, is_causal=True, impl=impl)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    plain = torch.autograd.grad(plain_sdpa(q, k, v, lam, True), (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(oracle_attention(q64, k64, v64, lam, causal=True), (q64, k64, v64), grad_out.double())
    for name, a, p, w in zip("qkv", got, plain, want, strict=True):
        assert torch.isfinite(a).all(), name
        err, plain_err = rel_err(a, w), rel_err(p, w)
        assert err <= 2 * plain_err + 1e-3, (name, err, plain_err)


# Property test over the strategies that keep scores, softmax and the difference in float32 (the
# ones this file's fix is about). The sdpa_* strategies run torch's flash kernel, whose float16
# error at scores past 65504 reached about 7x the math path's at some shapes (e.g. sdpa_4pass,
# L = 30, d = 32, GQA 2:1): torch's rounding, recorded here rather than hidden. The fixed cases
# above hold every strategy to the yardstick. derandomize: the same examples on every run.
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    impl=st.sampled_from(["chunked", "reference"]),
    fp16=st.booleans(),
    length=st.integers(1, 40),
    d=st.sampled_from([8, 24, 32]),
    gqa=st.booleans(),
    magnitude=st.floats(4.0, 12.0),
    seed=st.integers(0, 2**16),
)
def test_property_half_precision_at_large_magnitudes(impl, fp16, length, d, gqa, magnitude, seed):
    """Any shape, either half dtype, |q|,|k| from 4 to 12 (fp16: scores past 65504 when aligned)."""
    h, hkv = 4, (2 if gqa else 4)
    q, k, v, lam = large_inputs("fp16_overflow" if fp16 else "bf16_large", h=h, hkv=hkv, length=length, d=d,
                                seed=seed, magnitude=magnitude)
    out = diff_attention(q, k, v, lam, is_causal=True, impl=impl)
    assert torch.isfinite(out).all()
    want = oracle_attention(q, k, v, lam, causal=True)
    err, plain = rel_err(out, want), rel_err(plain_sdpa(q, k, v, lam, True), want)
    assert err <= 2 * plain + 1e-3, (err, plain)
