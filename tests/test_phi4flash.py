"""Phi-4-mini-flash's differential attention block (SambaY): window layers, YOCO KV sharing, weights."""

from __future__ import annotations

import math

import pytest
import torch

from multihead_sdpadiff import KVCache
from multihead_sdpadiff.phi4flash import Phi4FlashDiffAttention, sliding_window_mask
from tests.oracle_released import oracle_phi4flash_layer

E, HEADS, KV, D = 32, 4, 2, 8  # a tiny Phi-4-mini-flash: 2 differential heads, 1 kv group
F64 = torch.float64


def _layer(layer_idx, dtype=F64, **kw):
    m = Phi4FlashDiffAttention(E, HEADS, KV, layer_idx=layer_idx, dtype=dtype, **kw)
    with torch.no_grad():
        m.subln.weight.uniform_(0.5, 1.5)
        m.Wqkv.bias.normal_()
        m.out_proj.bias.normal_()
    return m


def _stack(dtype=F64, **kw):
    """Layer 2 slides over a window of 3 keys, layer 5 is full attention and writes the shared cache,
    layer 9 is a YOCO cross layer reading it (indices among all decoder layers, Mamba ones included)."""
    torch.manual_seed(0)
    return (_layer(2, dtype, sliding_window=3, **kw), _layer(5, dtype, **kw), _layer(9, dtype, yoco_cross=True, **kw))


def _run_stack(layers, x, caches):
    window, full, cross = layers
    h = x + window(x, cache=caches[0])
    h = h + full(h, cache=caches[1])
    return h + cross(h, cache=caches[1])  # reads layer 5's cache, writes nothing


def _oracle_stack(layers, x, **kw):
    window, full, cross = layers

    def run(m, h, **extra):
        return oracle_phi4flash_layer(dict(m.named_parameters()), h, hidden=E, num_heads=HEADS, num_kv_heads=KV,
                                      layer_idx=m.layer_idx, **kw, **extra)

    h = x + run(window, x, window=3)[0]
    out, shared = run(full, h)
    h = h + out
    return h + run(cross, h, shared_kv=shared)[0]


@pytest.mark.parametrize("impl", ["reference", "chunked", "sdpa_2pass"])
def test_stack_matches_oracle_outputs_and_grads(impl):
    layers = _stack(impl=impl)
    x = torch.randn(2, 11, E, dtype=F64, requires_grad=True)
    out = _run_stack(layers, x, [KVCache(), KVCache()])
    want = _oracle_stack(layers, x)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    params = [x, *(p for m in layers for p in m.parameters())]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_stack_decoding_token_by_token_matches_full_pass():
    layers = _stack()
    x = torch.randn(2, 9, E, dtype=F64)
    want = _oracle_stack(layers, x)
    caches = [KVCache(), KVCache()]
    with torch.no_grad():
        steps = [_run_stack(layers, x[:, :3], caches)] + [_run_stack(layers, x[:, t:t + 1], caches) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-9, atol=1e-10)
    assert len(caches[1]) == 9  # the cross layer wrote nothing


def test_window_hides_old_keys():
    # Without the window the sliding layer would differ: the band is really applied.
    torch.manual_seed(1)
    m = _layer(0, sliding_window=2)
    full = _layer(0)
    full.load_state_dict(m.state_dict())
    x = torch.randn(1, 6, E, dtype=F64)
    assert not torch.allclose(m(x), full(x))
    torch.testing.assert_close(m(x)[:, :2], full(x)[:, :2])  # the first two rows see at most 2 keys anyway
    assert sliding_window_mask(2, 5, 3).tolist() == [[False, True, True, True, True],
                                                     [False, False, True, True, True]]


def test_float32_exact_by_default_and_bf16_option_rounds_like_the_shipped_code(monkeypatch):
    import multihead_sdpadiff.phi4flash as phi

    seen = []
    real = phi.diff_attention

    def spy(q, k, v, lam, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, lam.dtype))
        return real(q, k, v, lam, **kw)

    monkeypatch.setattr(phi, "diff_attention", spy)
    torch.manual_seed(2)
    m = _layer(4, dtype=torch.float32)
    x = torch.randn(2, 7, E)
    params = dict(m.named_parameters())
    kw = {"hidden": E, "num_heads": HEADS, "num_kv_heads": KV, "layer_idx": 4}
    want = oracle_phi4flash_layer(params, x, **kw)[0]
    torch.testing.assert_close(m(x).double(), want, rtol=1e-5, atol=1e-5)
    assert seen.pop() == (torch.float32,) * 4
    m.bf16_attention = True
    got = m(x)
    assert seen.pop() == (torch.bfloat16,) * 4 and got.dtype == torch.float32
    rounded = oracle_phi4flash_layer(params, x, round_bf16=True, **kw)[0]
    # bf16 q, k, v and lambda, float32 inside the op, a bf16 attention output: within bf16 rounding
    # of the statement that rounds at the same places.
    assert ((got.double() - rounded).abs().max() / rounded.abs().max()).item() < 5e-3


def test_strict_load_with_the_published_layout():
    h, kv, d = 40, 20, 64
    e = h * d
    shapes = {"Wqkv.weight": (e + 2 * kv * d, e), "Wqkv.bias": (e + 2 * kv * d,), "out_proj.weight": (e, e),
              "out_proj.bias": (e,), "lambda_q1": (d,), "lambda_k1": (d,), "lambda_q2": (d,), "lambda_k2": (d,),
              "subln.weight": (2 * d,)}
    m = Phi4FlashDiffAttention(layer_idx=3, device="meta")
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    cross = Phi4FlashDiffAttention(layer_idx=20, yoco_cross=True, device="meta")
    assert tuple(cross.state_dict()["Wqkv.weight"].shape) == (e, e) and tuple(cross.Wqkv.bias.shape) == (e,)
    assert m.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.9)) and m.subln.eps == 1e-5
    small = _layer(1)
    sd = {k: torch.randn_like(v) for k, v in small.state_dict().items()}
    small.load_state_dict(sd, strict=True)
    with pytest.raises(RuntimeError):
        small.load_state_dict({**sd, "Wqkv.weight": torch.randn(E, E, dtype=F64)}, strict=True)


def test_bad_calls_raise_and_leave_the_cache():
    m, cross = _layer(0), _layer(1, yoco_cross=True)
    x = torch.randn(1, 4, E, dtype=F64)
    with pytest.raises(ValueError, match="shared KVCache"):
        cross(x)
    cache = KVCache()
    with torch.no_grad():
        m(x, cache=cache)
        with pytest.raises(ValueError, match="attn_mask"):
            m(x[:, :1], attn_mask=torch.ones(1, 1, 1, 3, dtype=torch.bool), cache=cache)
        with pytest.raises(ValueError, match="at least L=5"):
            cross(torch.randn(1, 5, E, dtype=F64), cache=cache)
    assert len(cache) == 4
    with pytest.raises(TypeError, match="layer_idx"):
        Phi4FlashDiffAttention(E, HEADS, KV, layer_idx=1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        Phi4FlashDiffAttention(E, HEADS, KV, layer_idx=0, sliding_window=4, yoco_cross=True)
