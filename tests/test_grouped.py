"""GroupedDiffAttn (Motif-2's GDA) and its op against an independent float64 statement."""

from __future__ import annotations

import math

import pytest
import torch

from multihead_sdpadiff import KVCache, MultiheadDiffAttn, RotaryEmbedding
from multihead_sdpadiff.layers_grouped import GroupedDiffAttn, motif_lambda_init
from multihead_sdpadiff.ops import cpu_fused
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
        mask = torch.randn(2, n_n, length, length, dtype=dtype)
        mask[mask > 1.0] = -math.inf
        mask[0, 1, 4] = -math.inf  # a row of one noise group that sees nothing
        okw["add_mask"] = mask
    return m, x, rel_pos, positions, mask, okw


@pytest.mark.parametrize("impl", STRATEGIES)
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_module_matches_oracle_outputs_and_grads(c, impl, monkeypatch):
    monkeypatch.setenv("SDPADIFF_CHUNK", "4")  # several query blocks
    # cpu_fused runs float32 (it refuses float64), with blocks of 4 stacked rows and key tiles of 4.
    fused = impl == "cpu_fused"
    for name in ("FWD_BLOCK_ROWS", "BWD_BLOCK_ROWS", "KEY_TILE"):
        monkeypatch.setattr(cpu_fused, name, 4)
    m, x, rel_pos, positions, mask, okw = _inputs(c, torch.float32 if fused else torch.float64)
    m.impl = impl
    x.requires_grad_(True)
    out = m(x, rel_pos, mask)
    want = oracle(m, x, positions=positions, **okw)  # float64 from the module's parameters
    tol = dict(rtol=2e-5, atol=2e-5) if fused else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.double(), want, **tol)
    g = torch.randn_like(want)
    params = [x, *m.parameters()]
    got_grads = torch.autograd.grad(out, params, g.to(out.dtype))
    want_grads = torch.autograd.grad(want, params, g)
    for name, a, b in zip(["x", *dict(m.named_parameters())], got_grads, want_grads, strict=True):
        if fused:
            assert ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item() < 1e-4, name
        else:
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
    dtype = torch.float32 if impl == "cpu_fused" else torch.float64
    m, x, _, _, _, _ = _inputs(c, dtype)
    m.impl = impl
    rel_pos = RotaryEmbedding(m.head_dim)(16, dtype=dtype)
    full = m(x, rel_pos)
    cache = KVCache()
    with torch.no_grad():
        pieces = [m(x[:, :4], rel_pos, cache=cache)] + [m(x[:, t:t + 1], rel_pos, cache=cache) for t in range(4, 10)]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **tol)
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
        m.impl = "sdpa_4pass"  # a V1 strategy with no GDA form
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
    outs = {impl: grouped_diff_attention(*t, is_causal=True, impl=impl) for impl in ("reference", "chunked")}
    torch.testing.assert_close(outs["chunked"], outs["reference"], rtol=1e-12, atol=1e-12)
    got, want = (torch.autograd.grad(outs[i], t, g) for i in ("chunked", "reference"))
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- cpu_fused at the op level ------------------------------------------------------------------
# float32 against the float64 reference of the same (upcast) inputs: outputs and every gradient.

FUSED_CASES = [
    # (B, N_s, N_n, P, d, Lq, Lk, causal, mask)
    (2, 8, 2, 2, 16, 37, 37, True, None),  # r = 4, one pair per noise head
    (1, 8, 2, 1, 24, 29, 29, True, "bool"),  # r = 4, one pair for both noise heads, d = 24
    (2, 6, 3, 3, 8, 23, 23, False, "additive"),  # r = 2, a dead row
    (2, 4, 4, 2, 16, 19, 19, True, "padding"),  # r = 1 (V1's case), two noise heads per pair
    (1, 8, 2, 2, 16, 1, 40, True, None),  # decode step against a cache
    (1, 8, 2, 2, 16, 7, 31, True, None),  # a chunk of queries against a longer cache
    (1, 6, 2, 2, 8, 11, 5, True, None),  # more queries than keys: the first rows see nothing
]


def _fused_inputs(c, dtype=torch.float32):
    b, ns, nn_, p, d, lq, lk, causal, kind = c
    torch.manual_seed(ns + nn_ + lq + lk)
    qs, qn = torch.randn(b, ns, lq, d, dtype=dtype), torch.randn(b, nn_, lq, d, dtype=dtype)
    k, v = torch.randn(b, 2 * p, lk, d, dtype=dtype), torch.randn(b, p, lk, 2 * d, dtype=dtype)
    lam = torch.rand(ns) * 0.8
    mask = None
    if kind == "bool":
        mask = torch.rand(b, nn_, lq, lk) > 0.3
    elif kind == "additive":
        mask = torch.randn(b, nn_, lq, lk)
        mask[mask > 1.0] = -math.inf
        mask[0, 1, 4] = -math.inf
    elif kind == "padding":
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        mask[1, ..., :3] = False
    return [qs, qn, k, v, lam], mask, causal


@pytest.mark.parametrize("c", FUSED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_fused_op_matches_the_float64_reference(c, monkeypatch):
    for name in ("FWD_BLOCK_ROWS", "BWD_BLOCK_ROWS", "KEY_TILE"):
        monkeypatch.setattr(cpu_fused, name, 8)  # several query blocks and key tiles
    t, mask, causal = _fused_inputs(c)
    t = [x.requires_grad_() for x in t]
    t64 = [x.detach().double().requires_grad_() for x in t]
    out = grouped_diff_attention(*t, attn_mask=mask, is_causal=causal, impl="cpu_fused")
    want = grouped_diff_attention(*t64, attn_mask=None if mask is None else mask.double() if mask.is_floating_point()
                                  else mask, is_causal=causal, impl="reference")
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the kernel called directly (no autograd): the same numbers
        torch.testing.assert_close(grouped_diff_attention(*t, attn_mask=mask, is_causal=causal, impl="cpu_fused"), out)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, t, g.float())
    exp = torch.autograd.grad(want, t64, g)
    for name, a, b in zip(["q_signal", "q_noise", "k", "v", "lambda"], got, exp, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5, msg=name)


def test_cpu_fused_with_r1_equals_v1_cpu_fused():
    """r = 1 is V1: GDA's signal/noise queries are V1's two maps of each head."""
    from multihead_sdpadiff import diff_attention
    t, _, _ = _fused_inputs((2, 4, 4, 2, 16, 21, 21, True, None))
    qs, qn, k, v, lam = t
    q = torch.stack((qs, qn), dim=2).flatten(1, 2)  # (B, 2H, L, d): head h's maps at 2h, 2h + 1
    gda = grouped_diff_attention(qs, qn, k, v, lam, is_causal=True, impl="cpu_fused")
    v1 = diff_attention(q, k, v, lam, is_causal=True, impl="cpu_fused")
    torch.testing.assert_close(gda, v1, rtol=1e-6, atol=1e-6)


def test_cpu_fused_bfloat16_and_float16_near_the_reference():
    t, _, causal = _fused_inputs(FUSED_CASES[0])
    want = grouped_diff_attention(*[x.double() for x in t[:4]], t[4].double(), is_causal=True, impl="reference")
    for dtype in (torch.bfloat16, torch.float16):
        low = [x.to(dtype) for x in t[:4]]
        got = grouped_diff_attention(*low, t[4], is_causal=True, impl="cpu_fused").double()
        # A plain low-precision run of the reference (its inputs rounded the same way) as the yardstick.
        plain = grouped_diff_attention(*[x.double() for x in low], t[4].double(), is_causal=True, impl="reference")
        err, floor = (got - want).abs().max(), (plain - want).abs().max()
        assert err <= 2 * floor + 1e-2, (dtype, err.item(), floor.item())


def test_cpu_fused_op_passes_opcheck_and_compiles_fullgraph():
    t, mask, causal = _fused_inputs(FUSED_CASES[1])
    qs, qn, k, v, lam = t
    from multihead_sdpadiff.ops.grouped import _prepare
    inputs = _prepare(qs, qn, k, v, lam, mask, causal, None)
    lo, hi = cpu_fused.row_intervals(inputs.mask, qs.device)
    args = (inputs.q.requires_grad_(), inputs.q_noise.requires_grad_(), inputs.k.requires_grad_(),
            inputs.v.requires_grad_(), inputs.lam.requires_grad_(), lo, hi, inputs.mask.tensor, inputs.scale, 8, 4)
    torch.library.opcheck(torch.ops.sdpadiff.cpu_fused_gda_fwd.default, args)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def run(qs, qn, k, v, lam):
        return grouped_diff_attention(qs, qn, k, v, lam, attn_mask=mask, is_causal=causal)  # auto: cpu_fused

    leaves = [x.detach().clone().requires_grad_() for x in t]
    eager_leaves = [x.detach().clone().requires_grad_() for x in t]
    out = run(*leaves)
    eager = grouped_diff_attention(*eager_leaves, attn_mask=mask, is_causal=causal, impl="cpu_fused")
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    eager.sum().backward()
    for a, b in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_auto_takes_cpu_fused_on_cpu_and_chunked_for_float64():
    from multihead_sdpadiff.ops.grouped import REGISTRY_GROUPED, _prepare
    t, _, _ = _fused_inputs(FUSED_CASES[0])
    assert REGISTRY_GROUPED.resolve("auto", _prepare(*t, None, True, None))[0].name == "cpu_fused"
    t64 = [x.double() for x in t]
    assert REGISTRY_GROUPED.resolve("auto", _prepare(*t64, None, True, None))[0].name == "chunked"
