"""Every registered strategy against the independent float64 oracle (tests/oracle.py).

Tests are generated from the registry: a new strategy is covered the day it is registered, and is
skipped with its own reasons where it cannot run the inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multihead_sdpadiff import IMPLS, choose_impl, diff_attention
from multihead_sdpadiff.ops import _prepare, get_strategy
from tests.conftest import STRATEGIES, skip_unless_supported
from tests.oracle import naive_low_precision, oracle_attention

# (B, H, Hkv, Lq, Lk, d, causal, mask kind)
CASES = [
    (2, 4, 4, 33, 33, 16, False, None),
    (2, 4, 4, 33, 33, 16, True, None),
    (1, 4, 2, 97, 97, 24, True, None),  # GQA 2:1, odd length and head dim
    (2, 6, 2, 17, 17, 8, True, "padding"),  # GQA 3:1, key padding + causal
    (2, 4, 2, 9, 30, 16, True, None),  # Lq < Lk (KV cache), bottom-right causal
    (1, 2, 2, 1, 21, 8, True, None),  # a single decode step
    (1, 2, 1, 12, 5, 8, True, None),  # Lq > Lk: early rows see nothing
    (2, 4, 4, 20, 20, 16, False, "bool"),
    (2, 4, 2, 20, 20, 16, True, "bool_2d"),
    (2, 4, 2, 20, 25, 16, False, "bool_heads"),
    (1, 6, 3, 19, 19, 40, False, "additive"),
    (1, 4, 2, 11, 23, 16, True, "additive"),
]


def case_id(case):
    b, h, hkv, lq, lk, d, causal, kind = case
    return f"B{b}-H{h}-Hkv{hkv}-Lq{lq}-Lk{lk}-d{d}-{'causal' if causal else 'full'}-{kind or 'nomask'}"


def make_inputs(case, dtype=torch.float64, requires_grad=False):
    b, h, hkv, lq, lk, d, causal, kind = case
    g = torch.Generator().manual_seed(lq * 1000 + lk * 10 + d)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    q, k, v = rnd(b, 2 * h, lq, d), rnd(b, 2 * hkv, lk, d), rnd(b, hkv, lk, 2 * d)
    lam = (0.1 + 0.8 * torch.rand(h, generator=g, dtype=torch.float64)).requires_grad_(requires_grad)
    mask, oracle_kw = None, {}
    if kind == "padding":
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        mask[0, ..., : lk // 2] = False  # left padding of the first sequence
        oracle_kw["bool_mask"] = mask
    elif kind == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.4
        mask[0, 0, 3] = False  # a row that sees nothing
        oracle_kw["bool_mask"] = mask
    elif kind == "bool_2d":
        mask = torch.rand(lq, lk, generator=g) > 0.3
        oracle_kw["bool_mask"] = mask
    elif kind == "bool_heads":
        mask = torch.rand(b, h, lq, lk, generator=g) > 0.5
        oracle_kw["bool_mask"] = mask
    elif kind == "additive":
        mask = torch.randn(b, 1, lq, lk, generator=g, dtype=torch.float64)
        mask[..., 1, :] = -math.inf  # a row that sees nothing
        mask[..., 2, ::2] = -math.inf
        oracle_kw["add_mask"] = mask
        mask = mask.to(dtype)
    return q, k, v, lam, mask, causal, oracle_kw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_float64(impl, case):
    q, k, v, lam, mask, causal, okw = make_inputs(case)
    skip_unless_supported(impl, q, k, v, lam, mask, causal)
    out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
    want = oracle_attention(q, k, v, lam, causal=causal, **okw)
    assert out.shape == want.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", STRATEGIES)
@pytest.mark.parametrize("case", CASES[1:5] + CASES[10:], ids=case_id)
def test_forward_float32(impl, case):
    q, k, v, lam, mask, causal, okw = make_inputs(case, torch.float32)
    skip_unless_supported(impl, q, k, v, lam, mask, causal)
    out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
    want = oracle_attention(q, k, v, lam, causal=causal, **okw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", STRATEGIES)
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=case_id)
def test_low_precision_within_twice_plain_error(impl, case, dtype):
    """As flash-attention's tests: error vs float64 at most 2x that of a plain low-precision run."""
    q, k, v, lam, mask, causal, okw = make_inputs(case, dtype)
    skip_unless_supported(impl, q, k, v, lam, mask, causal)
    out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
    assert out.dtype == dtype
    want = oracle_attention(q, k, v, lam, causal=causal, **okw)
    plain = naive_low_precision(q, k, v, lam, causal=causal, **okw)
    err = (out.double() - want).abs().max().item()
    plain_err = (plain.double() - want).abs().max().item()
    assert err <= 2 * plain_err + 1e-3, (err, plain_err)


@pytest.mark.parametrize("impl", STRATEGIES)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[6], CASES[11]], ids=case_id)
def test_gradients_float64(impl, case):
    q, k, v, lam, mask, causal, okw = make_inputs(case, requires_grad=True)
    skip_unless_supported(impl, q, k, v, lam, mask, causal)
    out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, lam), grad_out)
    want_out = oracle_attention(q, k, v, lam, causal=causal, **okw)
    want = torch.autograd.grad(want_out, (q, k, v, lam), grad_out)
    for name, g_got, g_want in zip("qkvλ", got, want, strict=True):
        assert torch.isfinite(g_got).all(), name
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_that_see_nothing_are_zero(impl):
    q, k, v, lam, mask, causal, _ = make_inputs(CASES[6], torch.float32, requires_grad=True)
    skip_unless_supported(impl, q, k, v, lam, mask, causal)
    out = diff_attention(q, k, v, lam, is_causal=True, impl=impl)  # Lq 12 > Lk 5
    assert torch.equal(out[:, :, : 12 - 5], torch.zeros_like(out[:, :, :7]))
    assert out[:, :, 7:].abs().sum() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, lam))


@pytest.mark.parametrize("impl", STRATEGIES)
def test_lambda_forms_agree(impl):
    q, k, v, _, mask, causal, _ = make_inputs(CASES[2])
    skip_unless_supported(impl, q, k, v, 0.3, mask, causal)
    h = q.shape[1] // 2
    a = diff_attention(q, k, v, 0.3, is_causal=True, impl=impl)
    b = diff_attention(q, k, v, torch.tensor(0.3, dtype=torch.float64), is_causal=True, impl=impl)
    c = diff_attention(q, k, v, torch.full((h,), 0.3, dtype=torch.float64), is_causal=True, impl=impl)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_auto_runs_what_choose_impl_names():
    q, k, v, lam, mask, causal, _ = make_inputs(CASES[3])
    name, reason = choose_impl(q, k, v, lam, attn_mask=mask, is_causal=causal)
    assert name in IMPLS and name != "auto" and reason
    torch.testing.assert_close(
        diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal),
        diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=name),
        rtol=0, atol=0,
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), rep=st.integers(1, 3), lq=st.integers(1, 24),
    extra_k=st.integers(0, 12), d=st.sampled_from([4, 8, 12, 24]), causal=st.booleans(),
    mask_kind=st.sampled_from([None, "bool", "additive", "padding"]), seed=st.integers(0, 2**16),
)
def test_random_shapes_and_masks(b, hkv, rep, lq, extra_k, d, causal, mask_kind, seed):
    g = torch.Generator().manual_seed(seed)
    h, lk = hkv * rep, lq + extra_k
    q = torch.randn(b, 2 * h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, 2 * hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, 2 * d, generator=g, dtype=torch.float64)
    lam = torch.rand(h, generator=g, dtype=torch.float64)
    mask, okw = None, {}
    if mask_kind == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.5
        okw["bool_mask"] = mask
    elif mask_kind == "additive":
        mask = torch.randn(lq, lk, generator=g, dtype=torch.float64)
        mask[torch.rand(lq, lk, generator=g) > 0.7] = -math.inf
        okw["add_mask"] = mask
    elif mask_kind == "padding":
        mask = torch.rand(b, 1, 1, lk, generator=g) > 0.3
        okw["bool_mask"] = mask
    want = oracle_attention(q, k, v, lam, causal=causal, **okw)
    for impl in STRATEGIES:
        if impl == "triton":
            continue  # the interpreter is too slow for a property sweep; tests/ops/test_triton.py covers it
        if get_strategy(impl).not_supported_reasons(_prepare(q, k, v, lam, mask, causal, None)):
            continue  # e.g. cpu_fused refuses float64; its float32 sweep is in tests/ops/test_cpu_fused.py
        out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9, msg=impl)
