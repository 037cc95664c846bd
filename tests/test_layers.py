"""MultiheadDiffAttn and the original's four presets against the float64 oracle module."""

from __future__ import annotations

import pytest
import torch

from multihead_sdpadiff import (
    IMPLS,
    MultiheadDiffAttn,
    MultiheadSdpaDiff1,
    MultiheadSdpaDiff2,
    MultiheadSdpaDiff3,
    MultiheadSdpaDiff4,
    RotaryEmbedding,
)
from tests.conftest import STRATEGIES, skip_if_refused
from tests.oracle import oracle_module

PRESETS = (MultiheadSdpaDiff1, MultiheadSdpaDiff2, MultiheadSdpaDiff3, MultiheadSdpaDiff4)


ORIGINAL_EXAMPLE = """
import torch
from multihead_sdpadiff import MultiheadSdpaDiff1, MultiheadSdpaDiff2, MultiheadSdpaDiff3, MultiheadSdpaDiff4
x = torch.randn(2, 3, 768)
m = MultiheadSdpaDiff4(768, 12, 12, 12)   # embed_dim, depth, num_heads, num_kv_heads
assert m(x).shape == x.shape
"""


def test_original_usage_example_verbatim():
    exec(ORIGINAL_EXAMPLE, {})


def test_presets_agree_with_each_other_and_the_reference():
    """The original project's own sanity check: at MHA its four variants give one output."""
    x = torch.randn(2, 33, 128)
    torch.manual_seed(1)
    base = MultiheadDiffAttn(128, 3, 8, impl="reference")
    want = base(x)
    for cls in PRESETS:
        m = cls(128, 3, 8)
        m.load_state_dict(base.state_dict())
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,impl", list(zip(PRESETS, ["sdpa_4pass", "sdpa_2pass", "sdpa_stacked", "sdpa_paired"],
                                              strict=True)))
def test_presets_are_thin(cls, impl):
    m = cls(64, 0, 4, 2)
    assert isinstance(m, MultiheadDiffAttn) and m.impl == impl
    assert m.num_heads == 2 and m.num_kv_heads == 1 and m.head_dim == 16


MODULE_CASES = [
    # (E, num_heads, num_kv_heads, L, rope, mask kind)
    (64, 4, 4, 13, False, None),
    (96, 4, 2, 17, True, None),  # GQA 2:1, d = 24
    (96, 6, 2, 11, True, "padding"),  # GQA 3:1, d = 16
    (64, 4, 4, 9, True, "bool"),
]


def _module_inputs(e, nh, nkv, length, rope, kind, dtype=torch.float64):
    torch.manual_seed(e + nh + length)
    m = MultiheadDiffAttn(e, 2, nh, nkv, dtype=dtype)
    with torch.no_grad():
        m.subln.weight.uniform_(0.5, 1.5)  # a non-trivial norm weight
    x = torch.randn(2, length, e, dtype=dtype)
    rel_pos, positions = None, None
    if rope:
        rel_pos = RotaryEmbedding(m.head_dim)(length + 3, dtype=dtype)
        positions = torch.arange(length).expand(2, length)
    mask = None
    if kind == "padding":
        mask = torch.ones(2, 1, 1, length, dtype=torch.bool)
        mask[1, ..., :4] = False
    elif kind == "bool":
        mask = torch.rand(2, 1, length, length) > 0.3
    return m, x, rel_pos, positions, mask


@pytest.mark.parametrize("impl", STRATEGIES)
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"E{c[0]}-nh{c[1]}-nkv{c[2]}-L{c[3]}-rope{c[4]}-{c[5]}")
def test_module_forward_and_parameter_gradients(impl, case):
    m, x, rel_pos, positions, mask = _module_inputs(*case)
    m.impl = impl
    x.requires_grad_(True)
    with skip_if_refused():
        out = m(x, rel_pos=rel_pos, attn_mask=mask)
    want = oracle_module(m, x, positions=positions, bool_mask=mask, causal=True)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    got = torch.autograd.grad(out, params, g)
    exp = torch.autograd.grad(want, params, g)
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_module_dtypes(dtype):
    m64, x, rel_pos, positions, mask = _module_inputs(96, 4, 2, 17, True, "padding")
    m = MultiheadDiffAttn(96, 2, 4, 2).to(dtype)
    m.load_state_dict(m64.state_dict())
    assert m.lambda_full().dtype == torch.float32  # never computed in half precision
    out = m(x.to(dtype), rel_pos=tuple(t.to(dtype) for t in rel_pos), attn_mask=mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = oracle_module(m64, x, positions=positions, bool_mask=mask)
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_gqa_pairs_like_unilm_flash_not_like_the_original():
    """Head i uses k maps 2g, 2g+1 (g = i // n_rep); the original repeated the doubled axis."""
    m, x, *_ = _module_inputs(96, 4, 2, 9, False, None)
    ours = m(x)
    assert torch.allclose(ours, oracle_module(m, x))
    # The original's pairing: repeat_interleave the 2Hkv maps, so head 0 gets (k0, k0), head 1 (k1, k1).
    k = m.k_proj(x).view(2, 9, 2, m.head_dim)
    wrong_k = k.repeat_interleave(2, dim=2)
    wrong = m.k_proj.weight.view(2, m.head_dim, 96).repeat_interleave(2, dim=0).reshape(-1, 96)
    m_wrong = MultiheadDiffAttn(96, 2, 4, 4, dtype=torch.float64)
    sd = m.state_dict()
    sd["k_proj.weight"] = wrong
    sd["v_proj.weight"] = m.v_proj.weight.view(1, 2 * m.head_dim, 96).repeat_interleave(2, dim=0).reshape(-1, 96)
    m_wrong.load_state_dict(sd)
    assert torch.equal(m_wrong.k_proj(x).view(2, 9, 4, m.head_dim), wrong_k)
    assert (m_wrong(x) - ours).abs().max() > 1e-3


def test_unilm_state_dict_round_trip():
    e, nh, nkv = 128, 8, 4
    d = e // nh
    unilm = {
        "q_proj.weight": torch.randn(e, e), "k_proj.weight": torch.randn(e // 2, e),
        "v_proj.weight": torch.randn(e // 2, e), "out_proj.weight": torch.randn(e, e),
        "lambda_q1": torch.randn(d), "lambda_k1": torch.randn(d), "lambda_q2": torch.randn(d),
        "lambda_k2": torch.randn(d), "subln.weight": torch.rand(2 * d),
    }
    for cls in (MultiheadDiffAttn, *PRESETS):
        m = cls(e, 5, nh, nkv)
        assert set(m.state_dict()) == set(unilm)
        m.load_state_dict(unilm, strict=True)
        for key, value in m.state_dict().items():
            assert torch.equal(value, unilm[key])


def test_impl_can_change_after_construction():
    m, x, *_ = _module_inputs(64, 4, 4, 9, False, None)
    outs = []
    for impl in IMPLS:
        m.impl = impl
        with skip_if_refused():
            outs.append(m(x))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="impl must be one of"):
        m.impl = "nope"


def test_lambda_init_follows_depth():
    assert MultiheadDiffAttn(64, 0, 4).lambda_init == pytest.approx(0.2)
    assert MultiheadDiffAttn(64, 10, 4).lambda_init == pytest.approx(0.8 - 0.6 * torch.exp(torch.tensor(-3.0)).item())


BAD_CONFIGS = [
    ((100, 0, 8), ValueError, "divisible"),
    ((64, 0, 3), ValueError, "num_heads must be even"),
    ((64, 0, 4, 3), ValueError, "num_kv_heads must be even"),
    ((64, 0, 4, 8), ValueError, "must divide num_heads"),
    ((96, 0, 12, 8), ValueError, "must divide num_heads"),
    ((64, -1, 4), ValueError, "depth"),
    ((64.0, 0, 4), TypeError, "embed_dim"),
    ((64, 0, 0), ValueError, "num_heads"),
]


@pytest.mark.parametrize("args,exc,match", BAD_CONFIGS)
def test_bad_configs(args, exc, match):
    with pytest.raises(exc, match=match):
        MultiheadDiffAttn(*args)


def test_bad_forward_inputs():
    m = MultiheadDiffAttn(64, 0, 4)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(5, 64))
    cos, sin = RotaryEmbedding(16)(4)
    with pytest.raises(ValueError, match="rel_pos covers 4 positions"):
        m(torch.randn(1, 5, 64), rel_pos=(cos, sin))
    cos, sin = RotaryEmbedding(8)(8)
    with pytest.raises(ValueError, match="head_dim / 2 = 8"):
        m(torch.randn(1, 5, 64), rel_pos=(cos, sin))
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 5, 64), attn_mask=torch.ones(5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not broadcast"):
        m(torch.randn(1, 5, 64), attn_mask=torch.ones(1, 1, 5, 6, dtype=torch.bool))
