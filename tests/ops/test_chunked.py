"""The chunked strategy with several blocks (the generic tests use shapes that fit in one block)."""

import pytest
import torch

from multihead_sdpadiff.ops import _prepare
from multihead_sdpadiff.ops.chunked import _Plan, block_size, chunked
from tests.ops.test_diff_attention import CASES, case_id, make_inputs
from tests.oracle import oracle_attention


@pytest.mark.parametrize("block", [1, 5, 16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_blocks_forward_and_gradients(case, block):
    q, k, v, lam, mask, causal, okw = make_inputs(case, requires_grad=True)
    inputs = _prepare(q, k, v, lam, mask, causal, None)
    out = chunked(inputs.q, inputs.k, inputs.v, inputs.lam, inputs.mask, inputs.scale, block)
    want = oracle_attention(q, k, v, lam, causal=causal, **okw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, lam), g)
    exp = torch.autograd.grad(want, (q, k, v, lam), g)
    for name, a, b in zip("qkvλ", got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_hidden_key_blocks_are_skipped():
    b, h, lq, lk, d = 2, 2, 64, 64, 8
    q, k, v = torch.randn(b, 2 * h, lq, d), torch.randn(b, 2 * h, lk, d), torch.randn(b, h, lk, 2 * d)
    pad = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    pad[..., :20] = False  # every sequence left-padded by 20
    plan = _Plan(q, k, _prepare(q, k, v, 0.5, pad, True, None).mask, 16)
    assert [(i0, k0, k1) for i0, _, k0, k1 in plan.blocks] == [(0, 0, 0), (16, 20, 32), (32, 20, 48), (48, 20, 64)]
    # Block 0 sees nothing (k1 <= k0): it is skipped and gives zeros.
    out = chunked(q, k, v, torch.full((h,), 0.5), plan.mask, d**-0.5, 16)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))


def test_block_size_rule_and_override(monkeypatch):
    assert block_size(1, 6, 2048, torch.device("cpu")) == 128
    assert 16 <= block_size(8, 32, 1 << 16, torch.device("cpu")) <= 1024
    monkeypatch.setenv("SDPADIFF_CHUNK", "48")
    assert block_size(1, 6, 2048, torch.device("cpu")) == 48


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients(dtype):
    q, k, v, lam, mask, causal, okw = make_inputs(CASES[3], dtype, requires_grad=True)
    inputs = _prepare(q, k, v, lam, mask, causal, None)
    out = chunked(inputs.q, inputs.k, inputs.v, inputs.lam, inputs.mask, inputs.scale, 4)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == t.dtype and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_a_learnable_mask_is_refused_not_silently_frozen():
    from multihead_sdpadiff import choose_impl, diff_attention

    q, k, v = torch.randn(1, 4, 32, 8), torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 16)
    bias = torch.zeros(1, 2, 32, 32, requires_grad=True)
    with pytest.raises(ValueError, match="gives the mask no gradient"):
        diff_attention(q, k, v, 0.5, attn_mask=bias, impl="chunked")
    assert choose_impl(q, k, v, 0.5, attn_mask=bias)[0] != "chunked"
    diff_attention(q, k, v, 0.5, attn_mask=bias).sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
