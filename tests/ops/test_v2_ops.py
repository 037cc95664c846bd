"""diff_attention_v2: every V2 strategy against the independent float64 oracle (tests/oracle.py).

Generated from IMPLS_V2, so a strategy added to ops/v2.py is covered the day it is registered.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multihead_sdpadiff import IMPLS_V2, diff_attention_v2
from multihead_sdpadiff.ops.v2 import REGISTRY_V2
from tests.conftest import precision_for
from tests.oracle import oracle_attention_v2

STRATEGIES_V2 = [name for name in IMPLS_V2 if name != "auto"]

# (B, H, Hkv, Lq, Lk, d, causal, mask kind)
CASES = [
    (2, 4, 4, 33, 33, 16, False, None),  # MHA, the authors' default (Hkv = H)
    (2, 4, 4, 33, 33, 16, True, None),
    (1, 4, 2, 97, 97, 24, True, None),  # GQA 2:1, odd length, head dim 24
    (2, 6, 2, 17, 17, 8, True, "padding"),  # GQA 3:1, key padding + causal
    (2, 4, 1, 9, 30, 16, True, None),  # all maps on one kv head, Lq < Lk (KV cache), bottom-right
    (1, 2, 2, 1, 21, 8, True, None),  # a single decode step
    (1, 2, 1, 12, 5, 8, True, None),  # Lq > Lk: early rows see nothing
    (2, 4, 4, 20, 20, 16, False, "bool"),
    (2, 4, 2, 20, 20, 16, True, "bool_2d"),
    (2, 4, 2, 20, 25, 16, False, "bool_heads"),  # a different mask per output head
    (1, 6, 3, 19, 19, 40, False, "additive"),
    (1, 4, 2, 11, 23, 16, True, "additive"),
]


def case_id(case):
    b, h, hkv, lq, lk, d, causal, kind = case
    return f"B{b}-H{h}-Hkv{hkv}-Lq{lq}-Lk{lk}-d{d}-{'causal' if causal else 'full'}-{kind or 'nomask'}"


def make_inputs(case, dtype=torch.float64, requires_grad=False):
    b, h, hkv, lq, lk, d, causal, kind = case
    g = torch.Generator().manual_seed(lq * 1000 + lk * 10 + d + 7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    q, k, v = rnd(b, 2 * h, lq, d), rnd(b, hkv, lk, d), rnd(b, hkv, lk, d)
    lam = torch.rand(b, h, lq, generator=g, dtype=torch.float64).requires_grad_(requires_grad)  # per token
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


@pytest.mark.parametrize("impl", IMPLS_V2)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_float64(impl, case):
    dtype, tol, _ = precision_for(REGISTRY_V2, impl)  # cpu_fused: float32 against the same statement
    q, k, v, lam, mask, causal, okw = make_inputs(case, dtype)
    out = diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
    want = oracle_attention_v2(q, k, v, lam, causal=causal, **okw)
    assert out.shape == want.shape == q[:, ::2].shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), want, **tol)


@pytest.mark.parametrize("impl", STRATEGIES_V2)
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4], CASES[9], CASES[11]], ids=case_id)
def test_forward_float32(impl, case):
    q, k, v, lam, mask, causal, okw = make_inputs(case, torch.float32)
    out = diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
    want = oracle_attention_v2(q, k, v, lam, causal=causal, **okw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", STRATEGIES_V2)
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=case_id)
def test_low_precision_within_twice_plain_error(impl, case, dtype):
    """As flash-attention's tests: error vs float64 at most 2x that of a plain low-precision run."""
    q, k, v, lam, mask, causal, okw = make_inputs(case, dtype)
    out = diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
    assert out.dtype == dtype
    want = oracle_attention_v2(q, k, v, lam, causal=causal, **okw)
    plain = oracle_attention_v2(q, k, v, lam, causal=causal, dtype=dtype, **okw)
    err = (out.double() - want).abs().max().item()
    plain_err = (plain.double() - want).abs().max().item()
    assert err <= 2 * plain_err + 1e-3, (err, plain_err)


@pytest.mark.parametrize("impl", STRATEGIES_V2)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[6], CASES[9], CASES[11]], ids=case_id)
def test_gradients_float64(impl, case):
    dtype, _, gtol = precision_for(REGISTRY_V2, impl)
    q, k, v, lam, mask, causal, okw = make_inputs(case, dtype, requires_grad=True)
    out = diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, lam), grad_out)
    want_out = oracle_attention_v2(q, k, v, lam, causal=causal, **okw)
    want = torch.autograd.grad(want_out, (q, k, v, lam), grad_out)
    for name, g_got, g_want in zip("qkvλ", got, want, strict=True):
        assert torch.isfinite(g_got).all(), name
        torch.testing.assert_close(g_got.double(), g_want.double(), **gtol, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", IMPLS_V2)
def test_rows_that_see_nothing_are_zero(impl):
    q, k, v, lam, _, _, _ = make_inputs(CASES[6], torch.float32, requires_grad=True)
    out = diff_attention_v2(q, k, v, lam, is_causal=True, impl=impl)  # Lq 12 > Lk 5
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    assert out[:, :, 7:].abs().sum() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, lam))


@pytest.mark.parametrize("impl", STRATEGIES_V2)
def test_lambda_forms_agree(impl):
    dtype, tol, _ = precision_for(REGISTRY_V2, impl)
    q, k, v, _, _, _, _ = make_inputs(CASES[2], dtype)
    b, h, lq = q.shape[0], q.shape[1] // 2, q.shape[2]
    forms = [0.3, torch.tensor(0.3, dtype=torch.float64), torch.full((h,), 0.3, dtype=torch.float64),
             torch.full((b, h, lq), 0.3, dtype=torch.float64)]
    outs = [diff_attention_v2(q, k, v, lam, is_causal=True, impl=impl) for lam in forms]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)
    per_head = torch.tensor([0.1, 0.9, 0.4, 0.6], dtype=torch.float64)
    torch.testing.assert_close(
        diff_attention_v2(q, k, v, per_head, is_causal=True, impl=impl).double(),
        oracle_attention_v2(q, k, v, per_head, causal=True), **tol,
    )


def test_sdpa_is_one_call_with_gqa(monkeypatch):
    """The 2H maps go through SDPA once, with Hkv kv heads (never repeated on CPU)."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw.get("enable_gqa")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v, lam, mask, causal, _ = make_inputs(CASES[3])  # GQA 3:1 with a padding mask
    diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal, impl="sdpa")
    assert calls == [(q.shape, k.shape, True)]


def test_auto_is_cpu_fused_on_cpu_and_sdpa_for_float64():
    q, k, v, lam, mask, causal, _ = make_inputs(CASES[3])
    torch.testing.assert_close(
        diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal),
        diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal, impl="sdpa"), rtol=0, atol=0,
    )
    q, k, v, lam, mask, causal, _ = make_inputs(CASES[3], torch.float32)
    torch.testing.assert_close(
        diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal),
        diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal, impl="cpu_fused"), rtol=0, atol=0,
    )


def test_cpu_fused_op_passes_opcheck_compiles_fullgraph_and_reads_a_cache_slice():
    from multihead_sdpadiff.ops import cpu_fused
    from multihead_sdpadiff.ops.v2 import _prepare
    q, k, v, lam, mask, causal, _ = make_inputs(CASES[3], torch.float32)
    inputs = _prepare(q, k, v, lam, mask, causal, None)
    lo, hi = cpu_fused.row_intervals(inputs.mask, q.device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
            inputs.lam.contiguous().requires_grad_(), lo, hi, inputs.mask.tensor, inputs.scale, 8, 4)
    torch.library.opcheck(torch.ops.sdpadiff.cpu_fused_v2_fwd.default, args)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def run(q, k, v, lam):
        return diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal)  # auto: cpu_fused

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, lam)]
    eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, lam)]
    out = run(*leaves)
    eager = diff_attention_v2(*eager_leaves, attn_mask=mask, is_causal=causal, impl="cpu_fused")
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    eager.sum().backward()
    for a, b in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    # A decode step on k, v as a preallocated cache hands them out (a prefix of a longer buffer).
    kbuf, vbuf = torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    kc, vc = kbuf[:, :, :17], vbuf[:, :, :17]
    assert not kc.is_contiguous() and cpu_fused._rows_dense(kc) is kc
    qd, lamd = torch.randn(2, 12, 1, 8), torch.rand(2, 6, 1)
    got = diff_attention_v2(qd, kc, vc, lamd, is_causal=True, impl="cpu_fused")
    want = oracle_attention_v2(qd, kc, vc, lamd, causal=True)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), rep=st.integers(1, 3), lq=st.integers(1, 16),
    extra_k=st.integers(0, 8), d=st.sampled_from([4, 8, 24]), causal=st.booleans(),
    mask_kind=st.sampled_from([None, "bool", "additive", "padding"]), seed=st.integers(0, 2**16),
)
def test_random_shapes_and_masks(b, hkv, rep, lq, extra_k, d, causal, mask_kind, seed):
    g = torch.Generator().manual_seed(seed)
    h, lk = hkv * rep, lq + extra_k
    q = torch.randn(b, 2 * h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    lam = torch.rand(b, h, lq, generator=g, dtype=torch.float64)
    mask, okw = None, {}
    if mask_kind == "bool":
        mask = torch.rand(b, h, lq, lk, generator=g) > 0.5
        okw["bool_mask"] = mask
    elif mask_kind == "additive":
        mask = torch.randn(lq, lk, generator=g, dtype=torch.float64)
        mask[torch.rand(lq, lk, generator=g) > 0.7] = -math.inf
        okw["add_mask"] = mask
    elif mask_kind == "padding":
        mask = torch.rand(b, 1, 1, lk, generator=g) > 0.3
        okw["bool_mask"] = mask
    want = oracle_attention_v2(q, k, v, lam, causal=causal, **okw)
    for impl in STRATEGIES_V2:
        dtype, tol, _ = precision_for(REGISTRY_V2, impl)
        if dtype == torch.float64:
            out = diff_attention_v2(q, k, v, lam, attn_mask=mask, is_causal=causal, impl=impl)
            torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9, msg=impl)
            continue
        # float32 inputs against the statement of those rounded inputs.
        q32, k32, v32 = q.float(), k.float(), v.float()
        m32 = mask.float() if mask is not None and mask.is_floating_point() else mask
        out = diff_attention_v2(q32, k32, v32, lam, attn_mask=m32, is_causal=causal, impl=impl)
        want32 = oracle_attention_v2(q32, k32, v32, lam, causal=causal, **okw)
        torch.testing.assert_close(out.double(), want32, **tol, msg=impl)


def good():
    return torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)


BAD = [
    ("q odd maps", lambda q, k, v: (q[:, :3], k, v, 0.5, {}), ValueError, "q must be"),
    ("q not 4-D", lambda q, k, v: (q[0], k, v, 0.5, {}), ValueError, "q must be 4-D"),
    ("q not tensor", lambda q, k, v: (q.tolist(), k, v, 0.5, {}), TypeError, "q must be a torch.Tensor"),
    ("integer q", lambda q, k, v: (q.long(), k, v, 0.5, {}), ValueError, "q must be float"),
    ("dtype mismatch", lambda q, k, v: (q, k.double(), v, 0.5, {}), ValueError, "one dtype"),
    ("head dims differ", lambda q, k, v: (q, torch.randn(2, 2, 6, 4), v, 0.5, {}), ValueError, "k must be"),
    ("k batch", lambda q, k, v: (q, k[:1], v, 0.5, {}), ValueError, "k must be"),
    ("v doubled like V1", lambda q, k, v: (q, k, torch.randn(2, 2, 6, 16), 0.5, {}), ValueError, "v must be"),
    ("v heads", lambda q, k, v: (q, k, torch.randn(2, 1, 6, 8), 0.5, {}), ValueError, "v must be"),
    # 2H = 4 maps over 4 kv heads: maps 0 and 1 would read kv heads 0 and 1.
    ("maps across groups", lambda q, k, v: (q, torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), 0.5, {}),
     ValueError, "must divide the 2 heads"),
    # H = 3, Hkv = 2: 2H / Hkv = 3 maps per kv head, head 1 = maps 2 and 3 straddles two.
    ("odd maps per kv head", lambda q, k, v: (torch.randn(2, 6, 5, 8), k, v, 0.5, {}), ValueError, "even"),
    ("lambda shape", lambda q, k, v: (q, k, v, torch.ones(3), {}), ValueError, r"lam must have shape"),
    ("lambda per token, wrong L", lambda q, k, v: (q, k, v, torch.ones(2, 2, 4), {}), ValueError,
     r"\(B, H, Lq\)=\(2, 2, 5\)"),
    ("lambda int tensor", lambda q, k, v: (q, k, v, torch.ones(2, dtype=torch.long), {}), ValueError,
     "lam must be a real floating tensor"),
    ("lambda type", lambda q, k, v: (q, k, v, "0.5", {}), TypeError, "lam must be"),
    ("mask int dtype", lambda q, k, v: (q, k, v, 0.5, {"attn_mask": torch.ones(5, 6, dtype=torch.long)}),
     ValueError, "attn_mask must be bool"),
    ("mask key length", lambda q, k, v: (q, k, v, 0.5, {"attn_mask": torch.ones(5, 7, dtype=torch.bool)}),
     ValueError, "key length 6"),
    ("mask on the 2H map axis", lambda q, k, v: (q, k, v, 0.5, {"attn_mask": torch.ones(2, 4, 5, 6, dtype=torch.bool)}),
     ValueError, "does not broadcast"),
    ("mask type", lambda q, k, v: (q, k, v, 0.5, {"attn_mask": [[True]]}), TypeError, "attn_mask must be"),
    ("is_causal type", lambda q, k, v: (q, k, v, 0.5, {"is_causal": 1}), TypeError, "is_causal"),
    ("scale", lambda q, k, v: (q, k, v, 0.5, {"scale": -1.0}), ValueError, "scale"),
    ("impl", lambda q, k, v: (q, k, v, 0.5, {"impl": "sdpa_4pass"}), ValueError, "impl must be one of"),
    ("impl type", lambda q, k, v: (q, k, v, 0.5, {"impl": None}), TypeError, "impl must be a str"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, make, exc, match):
    q, k, v, lam, kw = make(*good())
    with pytest.raises(exc, match=match):
        diff_attention_v2(q, k, v, lam, **kw)
