"""timm DiffAttention conversion (without importing timm) against a float64 statement of timm's forward."""

from __future__ import annotations

import math

import pytest
import torch

from multihead_sdpadiff.timm import VisionDiffAttn, from_timm, state_dict_from_timm, to_timm
from tests.oracle_released import oracle_timm

DIM, HEADS = 48, 3  # 3 differential heads of d = 8
D = DIM // HEADS // 2

OPTIONS = [
    # timm constructor arguments besides dim and num_heads
    {"qkv_bias": False, "qk_norm": False, "scale_norm": False, "proj_bias": True, "depth": 0, "dual_lambda": False},
    {"qkv_bias": True, "qk_norm": True, "scale_norm": True, "proj_bias": False, "depth": 3, "dual_lambda": True},
    {"qkv_bias": True, "qk_norm": False, "scale_norm": True, "proj_bias": True, "depth": 5, "dual_lambda": False},
]


def opt_id(o):
    return "-".join(k for k, v in o.items() if v is True) + f"-depth{o['depth']}"


def timm_state_dict(o, seed=0):
    """A random state dict with timm DiffAttention's keys and shapes for these arguments."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, shift=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift

    sd = {"qkv.weight": rnd(3 * DIM, DIM), "proj.weight": rnd(DIM, DIM), "sub_norm.weight": rnd(2 * D, shift=1.0)}
    if o["qkv_bias"]:
        sd["qkv.bias"] = rnd(3 * DIM)
    if o["proj_bias"]:
        sd["proj.bias"] = rnd(DIM)
    if o["qk_norm"]:
        sd["q_norm.weight"], sd["k_norm.weight"] = rnd(D, shift=1.0), rnd(D, shift=1.0)
    if o["scale_norm"]:
        sd["norm.weight"] = rnd(DIM, shift=1.0)
    if o["dual_lambda"]:
        sd["lambda_a"], sd["lambda_b"] = rnd(), rnd()
    else:
        sd.update({n: rnd(D) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")})
    return sd


@pytest.mark.parametrize("o", OPTIONS, ids=opt_id)
def test_round_trips_are_bit_exact(o):
    sd = timm_state_dict(o)
    layer = from_timm(sd, dim=DIM, num_heads=HEADS, dtype=torch.float64, **o)
    back, kwargs = to_timm(layer)
    assert kwargs == {"dim": DIM, "num_heads": HEADS, **o}
    assert set(back) == set(sd)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    again = from_timm(back, **kwargs, dtype=torch.float64)
    for name, t in layer.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


@pytest.mark.parametrize("o", OPTIONS, ids=opt_id)
@pytest.mark.parametrize("mask_kind", [None, "bool", "causal"])
def test_converted_layer_matches_timm_equations(o, mask_kind):
    sd = timm_state_dict(o, seed=1)
    layer = from_timm(sd, dim=DIM, num_heads=HEADS, dtype=torch.float64, **o)
    torch.manual_seed(3)
    x = torch.randn(2, 10, DIM, dtype=torch.float64, requires_grad=True)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 10, 10) > 0.3
        mask[:, :, :, 0] = True
    causal = mask_kind == "causal"
    out = layer(x, mask, is_causal=causal)
    want = oracle_timm(sd, x, dim=DIM, num_heads=HEADS, attn_mask=mask, is_causal=causal, **o)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-8, atol=1e-10)


def test_float32_layer_near_oracle():
    o = OPTIONS[1]
    sd = {k: v.float() for k, v in timm_state_dict(o, seed=2).items()}
    layer = from_timm(sd, dim=DIM, num_heads=HEADS, **o)
    assert layer.lambda_full().dtype == torch.float32 and layer.lambda_a.dtype == torch.float32
    x = torch.randn(1, 9, DIM)
    want = oracle_timm(sd, x, dim=DIM, num_heads=HEADS, **o)
    torch.testing.assert_close(layer(x).double(), want, rtol=2e-5, atol=2e-5)
    assert layer.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.9))


def test_bad_state_dicts_and_arguments_raise():
    o = OPTIONS[0]
    sd = timm_state_dict(o)
    with pytest.raises(ValueError, match="missing \\['qkv.bias'\\]"):
        state_dict_from_timm(sd, dim=DIM, num_heads=HEADS, **{**o, "qkv_bias": True})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        state_dict_from_timm({**sd, "extra": torch.zeros(1)}, dim=DIM, num_heads=HEADS)
    with pytest.raises(ValueError, match="shape"):
        state_dict_from_timm({**sd, "proj.weight": torch.zeros(DIM, DIM + 1)}, dim=DIM, num_heads=HEADS)
    with pytest.raises(ValueError, match="norm_layer"):
        from_timm(sd, dim=DIM, num_heads=HEADS, norm_layer=torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="divisible"):
        VisionDiffAttn(50, 3)
    with pytest.raises(TypeError, match="depth"):
        VisionDiffAttn(DIM, HEADS, depth=1.5)
