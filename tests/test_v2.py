"""MultiheadDiffAttnV2 against the float64 oracle module, cached decoding, unilm checkpoints, errors."""

from __future__ import annotations

import math

import pytest
import torch

from multihead_sdpadiff import IMPLS_V2, KVCache, MultiheadDiffAttnV2, RotaryEmbedding
from multihead_sdpadiff.ops.v2 import REGISTRY_V2
from tests.conftest import precision_for
from tests.oracle import oracle_module_v2
from tests.test_cache import CACHE_KINDS, _run_in_pieces, make_cache

STRATEGIES_V2 = [name for name in IMPLS_V2 if name != "auto"]


def oracle(m, x, **kw):
    params = dict(m.named_parameters())
    return oracle_module_v2(params, x, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                            head_dim=m.head_dim, **kw)


MODULE_CASES = [
    # (E, num_heads, num_kv_heads, head_dim, L, rope, mask kind)
    (64, 4, None, None, 13, False, None),  # the authors' default: Hkv = H
    (96, 4, 2, 24, 17, True, None),  # GQA 2:1, d = 24
    (64, 3, 1, 24, 11, True, "padding"),  # GQA 3:1 (6 maps per kv head), H*d = 72 != E
    (64, 4, 4, None, 9, True, "bool"),
    (64, 4, 2, None, 10, False, "additive"),
]


def case_id(c):
    return f"E{c[0]}-H{c[1]}-Hkv{c[2]}-d{c[3]}-L{c[4]}-rope{c[5]}-{c[6]}"


def _module_inputs(e, h, hkv, d, length, rope, kind, dtype=torch.float64):
    torch.manual_seed(e + h + length)
    m = MultiheadDiffAttnV2(e, h, hkv, d, dtype=dtype)
    x = torch.randn(2, length, e, dtype=dtype)
    rel_pos, positions = None, None
    if rope:
        rel_pos = RotaryEmbedding(m.head_dim)(length + 3, dtype=dtype)
        positions = torch.arange(length).expand(2, length)
    mask, okw = None, {}
    if kind == "padding":
        mask = torch.ones(2, 1, 1, length, dtype=torch.bool)
        mask[1, ..., :4] = False
        okw["bool_mask"] = mask
    elif kind == "bool":
        mask = torch.rand(2, 1, length, length) > 0.3
        okw["bool_mask"] = mask
    elif kind == "additive":
        mask = torch.randn(2, m.num_heads, length, length, dtype=torch.float64)
        mask[mask > 1.0] = -math.inf
        mask[0, 1, 2] = -math.inf  # a row that sees nothing
        okw["add_mask"] = mask
        mask = mask.to(dtype)
    return m, x, rel_pos, positions, mask, okw


@pytest.mark.parametrize("impl", STRATEGIES_V2)
@pytest.mark.parametrize("case", MODULE_CASES, ids=case_id)
def test_module_forward_and_parameter_gradients(impl, case):
    dtype, tol, gtol = precision_for(REGISTRY_V2, impl)  # cpu_fused: float32 against the same statement
    m, x, rel_pos, positions, mask, okw = _module_inputs(*case, dtype=dtype)
    m.impl = impl
    x.requires_grad_(True)
    out = m(x, rel_pos=rel_pos, attn_mask=mask)
    want = oracle(m, x, positions=positions, causal=True, **okw)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), want, **(tol if dtype != torch.float64 else dict(rtol=1e-9, atol=1e-10)))
    g = torch.randn_like(want)
    params = [x, *m.parameters()]
    got = torch.autograd.grad(out, params, g.to(out.dtype))
    exp = torch.autograd.grad(want, params, g)
    names = ["x", *(n for n, _ in m.named_parameters())]
    assert set(names) == {"x", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                          "lambda_proj.weight"}
    for name, a, b in zip(names, got, exp, strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"grad of {name}")
        else:  # relative to the gradient's size: float32 rounding through the projections
            assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 1e-4, name


def test_non_causal_long_sequence_float32():
    """Odd length 97, head dim 24, float32 against the float64 oracle."""
    m64, x, rel_pos, positions, _, _ = _module_inputs(48, 2, 1, 24, 97, True, None)
    m = MultiheadDiffAttnV2(48, 2, 1, 24, causal=False)
    m.load_state_dict(m64.state_dict())
    out = m(x.float(), rel_pos=tuple(t.float() for t in rel_pos))
    want = oracle(m64, x, positions=positions, causal=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_module_within_twice_plain_error(dtype):
    m64, x, rel_pos, positions, mask, okw = _module_inputs(96, 4, 2, 24, 17, True, "padding")
    m = MultiheadDiffAttnV2(96, 4, 2, 24).to(dtype)
    m.load_state_dict(m64.state_dict())
    xl = x.to(dtype)
    assert m.lambda_full(xl).dtype == torch.float32  # the sigmoid never runs in half precision
    out = m(xl, rel_pos=tuple(t.to(dtype) for t in rel_pos), attn_mask=mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = oracle(m, xl, positions=positions, **okw)  # float64 from the rounded weights and input
    plain = oracle(m, xl, positions=positions, dtype=dtype, **okw)
    err = (out.double() - want).abs().max().item()
    plain_err = (plain.double() - want).abs().max().item()
    assert err <= 2 * plain_err + 1e-3, (err, plain_err)


def test_impl_can_change_after_construction():
    m, x, rel_pos, _, mask, _ = _module_inputs(*MODULE_CASES[2])
    outs = []
    for impl in IMPLS_V2:
        if precision_for(REGISTRY_V2, impl)[0] != torch.float64:
            continue  # cpu_fused refuses float64; its float32 tests cover it
        m.impl = impl
        outs.append(m(x, rel_pos=rel_pos, attn_mask=mask))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="impl must be one of"):
        m.impl = "sdpa_4pass"  # a V1 strategy


def test_unilm_v2_state_dict_loads_strict_and_matches_the_oracle():
    """The key names and shapes of unilm's MultiheadFlashDiffV2(True, d_model, H, Hkv, head_dim)."""
    e, h, hkv, d = 64, 4, 2, 24
    g = torch.Generator().manual_seed(3)
    unilm = {
        "q_proj.weight": torch.randn(2 * h * d, e, generator=g) / 8,
        "k_proj.weight": torch.randn(hkv * d, e, generator=g) / 8,
        "v_proj.weight": torch.randn(hkv * d, e, generator=g) / 8,
        "o_proj.weight": torch.randn(e, h * d, generator=g) / 8,
        "lambda_proj.weight": torch.randn(h, e, generator=g) / 8,
    }
    m = MultiheadDiffAttnV2(e, h, hkv, d)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in unilm.items()}
    m.load_state_dict(unilm, strict=True)
    x = torch.randn(2, 12, e, generator=g)
    rel_pos = RotaryEmbedding(d)(12)
    want = oracle_module_v2(unilm, x, num_heads=h, num_kv_heads=hkv, head_dim=d,
                            positions=torch.arange(12).expand(2, 12))
    torch.testing.assert_close(m(x, rel_pos=rel_pos).double(), want, rtol=1e-5, atol=1e-5)


def test_authors_default_kv_heads_and_head_dim():
    m = MultiheadDiffAttnV2(128, 8)
    assert (m.num_heads, m.num_kv_heads, m.head_dim) == (8, 8, 16)
    assert m.q_proj.weight.shape == (256, 128) and m.k_proj.weight.shape == (128, 128)
    assert m.o_proj.weight.shape == (128, 128) and m.lambda_proj.weight.shape == (8, 128)


# Cached decoding


def _setup(gqa, rope, length=13, batch=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = MultiheadDiffAttnV2(96, 4, 2 if gqa else 4, dtype=dtype)  # d = 24
    x = torch.randn(batch, length, 96, dtype=dtype)
    rel_pos = RotaryEmbedding(m.head_dim)(64, dtype=dtype) if rope else None
    return m, x, rel_pos


def _close(impl):
    """The tolerance of a piecewise run against the full pass: float64's, or float32's for cpu_fused."""
    if precision_for(REGISTRY_V2, impl)[0] == torch.float64:
        return torch.float64, dict(rtol=1e-10, atol=1e-12)
    return torch.float32, dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("gqa,rope", [(False, False), (True, True)])
@pytest.mark.parametrize("impl", STRATEGIES_V2)
def test_prefill_then_steps_and_chunks_equal_full_pass(impl, gqa, rope, kind):
    dtype, tol = _close(impl)
    m, x, rel_pos = _setup(gqa, rope, dtype=dtype)
    m.impl = impl
    with torch.no_grad():
        full = m(x, rel_pos=rel_pos)
        steps = _run_in_pieces(m, x, rel_pos, make_cache(kind, 2), [5] + [1] * 8)
        chunks = _run_in_pieces(m, x, rel_pos, make_cache(kind, 2), [3, 3, 3, 3, 1])
    torch.testing.assert_close(steps, full, **tol)
    torch.testing.assert_close(chunks, full, **tol)


@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("impl", STRATEGIES_V2)
def test_left_padded_batch_equals_each_sequence_alone(impl, kind):
    """Sequences of lengths 9 and 6, left-padded to 9, then 4 decode steps each."""
    dtype, tol = _close(impl)
    m, _, rel_pos = _setup(True, True, dtype=dtype)
    m.impl = impl
    torch.manual_seed(1)
    lengths, total, steps = [9, 6], 9, 4
    seqs = [torch.randn(1, n + steps, 96, dtype=dtype) for n in lengths]
    with torch.no_grad():
        alone = [m(s, rel_pos=rel_pos) for s in seqs]
        pad = [total - n for n in lengths]
        prompt = torch.zeros(2, total, 96, dtype=dtype)
        real = torch.zeros(2, total + steps, dtype=torch.bool)
        for i, n in enumerate(lengths):
            prompt[i, pad[i]:] = seqs[i][0, :n]
            real[i, pad[i]:] = True
        pos_all = (real.long().cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
        cache = make_cache(kind, 2)
        out = m(prompt, rel_pos=rel_pos, attn_mask=real[:, None, None, :total], position_ids=pos_all[:, :total],
                cache=cache)
        assert torch.isfinite(out).all()  # pad query rows included
        for i, n in enumerate(lengths):
            torch.testing.assert_close(out[i, pad[i]:], alone[i][0, :n], **tol)
        for t in range(steps):
            tok = torch.stack([seqs[i][0, lengths[i] + t] for i in range(2)])[:, None]  # (2, 1, 96)
            lk = total + t + 1
            y = m(tok, rel_pos=rel_pos, attn_mask=real[:, None, None, :lk], position_ids=pos_all[:, lk - 1 : lk],
                  cache=cache)
            for i, n in enumerate(lengths):
                torch.testing.assert_close(y[i, 0], alone[i][0, n + t], **tol)


def test_cache_holds_compact_v2_keys_and_values():
    m, x, rel_pos = _setup(True, True)
    cache = KVCache(32, 2)
    with torch.no_grad():
        m(x[:, :4], rel_pos=rel_pos, cache=cache)
        buf = cache._k
        assert cache.keys().shape == cache.values().shape == (2, m.num_kv_heads, 4, m.head_dim)
        for t in range(4, 7):
            m(x[:, t : t + 1], rel_pos=rel_pos, cache=cache)
        assert cache._k is buf and buf.shape[2] == 32  # written in place, never reallocated


def test_gradients_flow_through_a_cache_in_training():
    m, x, rel_pos = _setup(True, True, length=7)
    x = x.requires_grad_(True)
    y = _run_in_pieces(m, x, rel_pos, KVCache(), [4, 1, 1, 1])
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *m.parameters()], g)
    want = torch.autograd.grad(m(x, rel_pos=rel_pos), [x, *m.parameters()], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# Errors

BAD_CONFIGS = [
    ((64.0, 4), {}, TypeError, "embed_dim must be an int"),
    ((64, 0), {}, ValueError, "num_heads must be positive"),
    ((64, 4, 3), {}, ValueError, "num_kv_heads 3 must divide num_heads 4"),
    ((64, 4, 8), {}, ValueError, "must divide num_heads"),  # 2H/Hkv = 1: maps 0 and 1 on kv heads 0 and 1
    ((64, 3, 2, 16), {}, ValueError, "maps 2i and 2i\\+1"),  # 2H/Hkv = 3
    ((64, 4, 0), {}, ValueError, "num_kv_heads must be positive"),
    ((100, 8), {}, ValueError, "divisible by num_heads 8 when head_dim is not given"),
    ((64, 4, None, 0), {}, ValueError, "head_dim must be positive"),
    ((64, 4, None, 16.0), {}, TypeError, "head_dim must be an int"),
    ((64, 4), {"causal": 1}, TypeError, "causal must be a bool"),
    ((64, 4), {"impl": "flash"}, ValueError, "impl must be one of"),
    ((64, 4), {"impl": None}, TypeError, "impl must be a str"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", BAD_CONFIGS)
def test_bad_configs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MultiheadDiffAttnV2(*args, **kwargs)


def test_bad_forward_inputs():
    m = MultiheadDiffAttnV2(64, 4, 2)  # d = 16
    x = torch.randn(1, 5, 64)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(5, 64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m(x.tolist())
    with pytest.raises(ValueError, match="rel_pos covers 4 positions"):
        m(x, rel_pos=RotaryEmbedding(16)(4))
    with pytest.raises(ValueError, match="head_dim / 2 = 8"):
        m(x, rel_pos=RotaryEmbedding(8)(8))
    with pytest.raises(TypeError, match="rel_pos must be"):
        m(x, rel_pos=torch.ones(8, 8))
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        m(x, attn_mask=torch.ones(5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not broadcast"):
        m(x, attn_mask=torch.ones(1, 1, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):  # per 2H map, not per output head
        m(x, attn_mask=torch.ones(1, 8, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids must be"):
        m(x, position_ids=torch.arange(3)[None])
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        m(x, cache={})
