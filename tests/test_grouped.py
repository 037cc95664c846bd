"""GroupedDiffAttn (Motif-2's GDA) and its op against an independent float64 statement."""

from __future__ import annotations

import math

import pytest
import torch

from multihead_sdpadiff import KVCache, MultiheadDiffAttn, RotaryEmbedding
from multihead_sdpadiff.layers_grouped import GroupedDiffAttn, motif_lambda_init
from multihead_sdpadiff.ops.grouped import IMPLS_GROUPED, grouped_diff_attention
from tests.oracle_released import oracle_gda

STRATEGIES = [n for n in IMPLS_GROUPED if n != "auto"]

CASES = [
    # (E, H, N_n, Hkv, d, L, rope, mask)
    (48, 6, 2, 4, 8, 13, True, None),  # r = 2, P = 2: one pair per noise head
    (64, 5, 1, 2, 24, 11, True, "padding"),  # r = 4, one noise head, one pair, d = 24
    (64, 10, 2, 2, 40, 17, False, "bool"),  # r = 4, P = 1 serves both noise heads, d = 40
    (48, 6, 2, 2, 8, 9, True, "additive"),  # per-noise-group additive mask with a dead row
]


def case_id(c):
    return f"E{c[0]}-H{c[1]}-Nn{c[2]}-Hkv{c[3]}-d{c[4]}-L{c[5]}-rope{c[6]}-{c[7]}"


def oracle(m, x, **kw):
    return oracle_gda(dict(m.named_parameters()), x, num_heads=m.num_heads, num_noise_heads=m.num_noise_heads,
                      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, lambda_init=m.lambda_init,
                      eps=m.subln.eps, causal=m.causal, **kw)


def _inputs(c, dtype=torch.float64):
    e, h, n_n, hkv, d, length, rope, kind = c
    torch.manual_seed(e + h + length)
    m = GroupedDiffAttn(e, h, n_n, hkv, d, layer_idx=3, dtype=dtype)
    with torch.no_grad():
        m.subln.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, length, e, dtype=dtype)
    rel_pos = positions = None
    if rope:
        rel_pos = RotaryEmbedding(d)(length + 2, dtype=dtype)
        positions = torch.arange(length).expand(2, length)
    mask, okw = None, {}
    if kind == "padding":
        mask = torch.ones(2, 1, 1, length, dtype=torch.bool)
        mask[1, ..., :3] = False
        okw["bool_mask"] = mask
    elif kind == "bool":
        mask = torch.rand(2, n_n, length, length) > 0.3
        okw["bool_mask"] = mask
    elif kind == "additive":
        mask = torch.randn(2, n_n, length, length, dtype=torch.float64)
        mask[mask > 1.0] = -math.inf
        mask[0, 1, 4] = -math.inf  # a row of one noise group that sees nothing
        okw["add_mask"] = mask
    return m, x, rel_pos, positions, mask, okw


@pytest.mark.parametrize("impl", STRATEGIES)
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_module_matches_oracle_outputs_and_grads(c, impl, monkeypatch):
    monkeypatch.setenv("SDPADIFF_CHUNK", "4")  # several query blocks
    m, x, rel_pos, positions, mask, okw = _inputs(c)
    m.impl = impl
    x.requires_grad_(True)
    out = m(x, rel_pos, mask)
    want = oracle(m, x, positions=positions, **okw)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    got_grads = torch.autograd.grad(out, params, g)
    want_grads = torch.autograd.grad(want, params, g)
    for name, a, b in zip(["x", *dict(m.named_parameters())], got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("impl", STRATEGIES)
def test_float32_and_bfloat16_near_oracle(impl):
    c = (48, 6, 2, 4, 8, 13, True, None)
    m, x, rel_pos, positions, _, _ = _inputs(c, dtype=torch.float32)
    m.impl = impl
    want = oracle(m, x, positions=positions)
    torch.testing.assert_close(m(x, rel_pos).double(), want, rtol=2e-5, atol=2e-5)
    m16 = m.to(torch.bfloat16)
    got = m16(x.bfloat16(), (rel_pos[0].bfloat16(), rel_pos[1].bfloat16())).double()
    want16 = oracle(m16, x.bfloat16(), positions=positions)
    assert (got - want16).abs().max() / want16.abs().max() < 3e-2


@pytest.mark.parametrize("impl", STRATEGIES)
def test_cached_decoding_matches_full_pass(impl):
    c = (48, 6, 2, 4, 8, 10, True, None)
    m, x, _, _, _, _ = _inputs(c)
    m.impl = impl
    rel_pos = RotaryEmbedding(m.head_dim)(16, dtype=torch.float64)
    full = m(x, rel_pos)
    cache = KVCache()
    with torch.no_grad():
        pieces = [m(x[:, :4], rel_pos, cache=cache)] + [m(x[:, t:t + 1], rel_pos, cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert len(cache) == 10 and tuple(cache.keys().shape) == (2, 4, 10, 8) and tuple(cache.values().shape) == (2, 2, 10, 16)


def test_strict_load_with_motif_names():
    e, h, n_n, hkv, d = 64, 10, 2, 4, 8
    sd = {
        "q_proj.weight": torch.randn(h * d, e), "k_proj.weight": torch.randn(hkv * d, e),
        "v_proj.weight": torch.randn(hkv * d, e), "o_proj.weight": torch.randn(e, (h - n_n) * 2 * d),
        "lambda_q1": torch.randn(d), "lambda_k1": torch.randn(d), "lambda_q2": torch.randn(d),
        "lambda_k2": torch.randn(d), "subln.weight": torch.randn(2 * d),
    }
    m = GroupedDiffAttn(e, h, n_n, hkv, d, layer_idx=0)
    m.load_state_dict(sd, strict=True)
    assert set(m.state_dict()) == set(sd)
    assert m.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(0.3))  # Motif's (l - 1) shift
    assert motif_lambda_init(1) == pytest.approx(0.2)


def _neox_to_gptj_rows(w, heads, d):
    """Rows of each head from NeoX pair order (i, i + d/2) to GPT-J order (2i, 2i + 1)."""
    w = w.view(heads, 2, d // 2, -1)  # (heads, half, i, E)
    return w.transpose(1, 2).reshape(heads * d, -1)


@pytest.mark.parametrize("rope", [False, True])
def test_r1_equals_multihead_diff_attn(rope):
    e, n_n, hkv, d, length = 64, 4, 4, 8, 12
    torch.manual_seed(1)
    g = GroupedDiffAttn(e, 2 * n_n, n_n, hkv, d, layer_idx=3, dtype=torch.float64)
    with torch.no_grad():
        g.subln.weight.uniform_(0.5, 1.5)
    lib = MultiheadDiffAttn(e, 2, 2 * n_n, hkv, dtype=torch.float64)  # depth = layer_idx - 1
    assert lib.lambda_init == pytest.approx(g.lambda_init)
    sd = g.state_dict()
    q_w, k_w = sd["q_proj.weight"], sd["k_proj.weight"]
    if rope:
        q_w, k_w = _neox_to_gptj_rows(q_w, 2 * n_n, d), _neox_to_gptj_rows(k_w, hkv, d)
    lib.load_state_dict({"q_proj.weight": q_w, "k_proj.weight": k_w, "v_proj.weight": sd["v_proj.weight"],
                         "out_proj.weight": sd["o_proj.weight"], "subln.weight": sd["subln.weight"],
                         **{n: sd[n] for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}})
    x = torch.randn(2, length, e, dtype=torch.float64)
    rel_pos = RotaryEmbedding(d)(length, dtype=torch.float64) if rope else None
    torch.testing.assert_close(g(x, rel_pos), lib(x, rel_pos), rtol=1e-10, atol=1e-12)


def test_op_reuses_noise_and_matches_reference_op():
    torch.manual_seed(2)
    qs, qn = torch.randn(1, 8, 7, 16, dtype=torch.float64), torch.randn(1, 2, 7, 16, dtype=torch.float64)
    k, v = torch.randn(1, 4, 9, 16, dtype=torch.float64), torch.randn(1, 2, 9, 32, dtype=torch.float64)
    lam = torch.rand(8, dtype=torch.float64)
    a = grouped_diff_attention(qs, qn, k, v, lam, is_causal=True, impl="reference")
    b = grouped_diff_attention(qs, qn, k, v, lam, is_causal=True, impl="chunked")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Signal head j of noise group g = j // 4 equals plain differential attention with that noise map:
    for j in range(8):
        g = j // 4
        s1 = (qs[0, j] @ k[0, 2 * g].T / 4).masked_fill(torch.ones(7, 9, dtype=torch.bool).triu(3), -math.inf)
        s2 = (qn[0, g] @ k[0, 2 * g + 1].T / 4).masked_fill(torch.ones(7, 9, dtype=torch.bool).triu(3), -math.inf)
        want = (s1.softmax(-1) - lam[j] * s2.softmax(-1)) @ v[0, g]
        torch.testing.assert_close(a[0, j], want, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_value_errors_and_leave_cache():
    m = GroupedDiffAttn(48, 6, 2, 4, 8, layer_idx=1, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_noise_heads"):
        GroupedDiffAttn(48, 6, 4, layer_idx=0)
    with pytest.raises(ValueError, match="kv pairs must divide"):
        GroupedDiffAttn(48, 6, 2, 8, layer_idx=0)
    with pytest.raises(ValueError, match="impl"):
        m.impl = "cpu_fused"  # no fused kernel for GDA on this branch
    cache = KVCache()
    x = torch.randn(1, 5, 48, dtype=torch.float64)
    with torch.no_grad():
        m(x, cache=cache)
        with pytest.raises(ValueError, match="attn_mask"):
            m(x[:, :1], attn_mask=torch.ones(1, 1, 1, 3, dtype=torch.bool), cache=cache)
    assert len(cache) == 5
    keys = cache.keys().clone()
    m.impl = "chunked"
    with pytest.raises(ValueError, match="cannot run these inputs"):  # refused after the cache write
        m(x[:, :1], attn_mask=torch.zeros(1, 1, 1, 6, dtype=torch.float64, requires_grad=True), cache=cache)
    assert len(cache) == 5 and torch.equal(cache.keys(), keys)
    qs, qn = torch.randn(1, 4, 3, 8), torch.randn(1, 3, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        grouped_diff_attention(qs, qn, torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 16), 0.5)


@pytest.mark.parametrize("lq, lk", [(7, 11), (9, 5)], ids=["cache", "more-queries-than-keys"])
def test_chunked_gradients_match_reference_with_per_head_lambda(lq, lk, monkeypatch):
    monkeypatch.setenv("SDPADIFF_CHUNK", "3")
    torch.manual_seed(4)
    t = [torch.randn(2, 6, lq, 8, dtype=torch.float64), torch.randn(2, 3, lq, 8, dtype=torch.float64),
         torch.randn(2, 6, lk, 8, dtype=torch.float64), torch.randn(2, 3, lk, 16, dtype=torch.float64),
         torch.rand(6, dtype=torch.float64)]
    t = [x.requires_grad_() for x in t]
    g = torch.randn(2, 6, lq, 16, dtype=torch.float64)
    outs = {impl: grouped_diff_attention(*t, is_causal=True, impl=impl) for impl in STRATEGIES}
    torch.testing.assert_close(outs["chunked"], outs["reference"], rtol=1e-12, atol=1e-12)
    got, want = (torch.autograd.grad(outs[i], t, g) for i in ("chunked", "reference"))
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
