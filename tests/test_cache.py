"""Incremental decoding with KVCache equals one full pass, for every strategy."""

from __future__ import annotations

import pytest
import torch

from multihead_sdpadiff import KVCache, MultiheadDiffAttn, MultiheadSdpaDiff3, RotaryEmbedding
from tests.conftest import STRATEGIES, skip_if_refused

CACHE_KINDS = ["growing", "static"]


def make_cache(kind, batch, max_len=64):
    return KVCache() if kind == "growing" else KVCache(max_len, batch)


def _setup(gqa, rope, length=13, batch=2, seed=0):
    torch.manual_seed(seed)
    m = MultiheadDiffAttn(96, 1, 6 if gqa else 4, 2 if gqa else 4, dtype=torch.float64)
    x = torch.randn(batch, length, 96, dtype=torch.float64)
    rel_pos = RotaryEmbedding(m.head_dim)(64, dtype=torch.float64) if rope else None
    return m, x, rel_pos


def _run_in_pieces(m, x, rel_pos, cache, sizes):
    outs, start = [], 0
    for size in sizes:
        outs.append(m(x[:, start : start + size], rel_pos=rel_pos, cache=cache))
        start += size
    assert len(cache) == start == x.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("gqa,rope", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("impl", STRATEGIES)
def test_prefill_then_steps_and_chunks_equal_full_pass(impl, gqa, rope, kind):
    m, x, rel_pos = _setup(gqa, rope)
    m.impl = impl
    with torch.no_grad(), skip_if_refused():
        full = m(x, rel_pos=rel_pos)
        steps = _run_in_pieces(m, x, rel_pos, make_cache(kind, 2), [5] + [1] * 8)
        chunks = _run_in_pieces(m, x, rel_pos, make_cache(kind, 2), [3, 3, 3, 3, 1])
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunks, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("impl", STRATEGIES)
def test_left_padded_batch_equals_each_sequence_alone(impl, kind):
    """Sequences of lengths 9 and 6, left-padded to 9, then 4 decode steps each."""
    m, _, rel_pos = _setup(True, True)
    m.impl = impl
    torch.manual_seed(1)
    lengths, total, steps = [9, 6], 9, 4
    seqs = [torch.randn(1, n + steps, 96, dtype=torch.float64) for n in lengths]
    with torch.no_grad(), skip_if_refused():
        alone = [m(s, rel_pos=rel_pos) for s in seqs]

        pad = [total - n for n in lengths]
        prompt = torch.zeros(2, total, 96, dtype=torch.float64)
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
            torch.testing.assert_close(out[i, pad[i]:], alone[i][0, :n], rtol=1e-10, atol=1e-12)
        for t in range(steps):
            tok = torch.stack([seqs[i][0, lengths[i] + t] for i in range(2)])[:, None]  # (2, 1, 96)
            lk = total + t + 1
            y = m(tok, rel_pos=rel_pos, attn_mask=real[:, None, None, :lk], position_ids=pos_all[:, lk - 1 : lk],
                  cache=cache)
            for i, n in enumerate(lengths):
                torch.testing.assert_close(y[i, 0], alone[i][0, n + t], rtol=1e-10, atol=1e-12)


def test_transformers_style_4d_mask_and_its_length_check():
    m, x, rel_pos = _setup(False, True)
    cache = KVCache()
    with torch.no_grad():
        m(x[:, :5], rel_pos=rel_pos, cache=cache)
        mask = torch.ones(2, 1, 3, 8, dtype=torch.bool)  # (B, 1, Lq, len(cache) + Lq)
        y = m(x[:, 5:8], rel_pos=rel_pos, attn_mask=mask, cache=cache)
        torch.testing.assert_close(y, m(x[:, :8], rel_pos=rel_pos)[:, 5:8], rtol=1e-10, atol=1e-12)
        with pytest.raises(ValueError, match="key length 10"):
            m(x[:, 8:10], rel_pos=rel_pos, attn_mask=torch.ones(2, 1, 2, 9, dtype=torch.bool), cache=cache)


def test_static_cache_overflow_keeps_contents():
    m, x, rel_pos = _setup(True, True)
    cache = KVCache(10, 2)
    with torch.no_grad():
        m(x[:, :8], rel_pos=rel_pos, cache=cache)
        k_before, v_before = cache.keys().clone(), cache.values().clone()
        with pytest.raises(ValueError, match="exceed the cache's max_len 10"):
            m(x[:, 8:11], rel_pos=rel_pos, cache=cache)
    assert len(cache) == 8
    assert torch.equal(cache.keys(), k_before) and torch.equal(cache.values(), v_before)


def test_static_cache_is_compact_preallocated_and_reusable():
    m, x, rel_pos = _setup(True, False)  # 3 heads, 1 kv group
    cache = KVCache(32, 2)
    with torch.no_grad():
        m(x[:, :4], cache=cache)
        buf = cache._k
        assert cache.keys().shape == (2, 2 * m.num_kv_heads, 4, m.head_dim)  # not repeated to H
        assert cache.values().shape == (2, m.num_kv_heads, 4, 2 * m.head_dim)
        for t in range(4, 8):
            m(x[:, t : t + 1], cache=cache)
        assert cache._k is buf and buf.shape[2] == 32  # written in place, never reallocated
        cache.reset()
        assert len(cache) == 0
        y = m(x[:, :3], cache=cache)
        torch.testing.assert_close(y, m(x[:, :3]), rtol=1e-10, atol=1e-12)


def test_preset_accepts_cache_keywords():
    torch.manual_seed(0)
    m = MultiheadSdpaDiff3(64, 0, 4, 2)
    x = torch.randn(1, 6, 64)
    cache = KVCache()
    with torch.no_grad():
        y = torch.cat([m(x[:, :4], cache=cache, position_ids=torch.arange(4)[None]), m(x[:, 4:], cache=cache)], 1)
        torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_gradients_flow_through_a_cache_in_training(kind):
    m, x, rel_pos = _setup(True, True, length=7)
    x = x.requires_grad_(True)
    y = _run_in_pieces(m, x, rel_pos, make_cache(kind, 2), [4, 1, 1, 1])
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *m.parameters()], g)
    full = m(x, rel_pos=rel_pos)
    want = torch.autograd.grad(full, [x, *m.parameters()], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_cache_errors():
    with pytest.raises(ValueError, match="both max_len and batch_size"):
        KVCache(8)
    with pytest.raises(ValueError, match="max_len must be"):
        KVCache(0, 1)
    cache = KVCache(8, 2)
    with pytest.raises(ValueError, match="batch_size 2"):
        cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 1, 8))
    cache.update(torch.zeros(2, 2, 1, 4), torch.zeros(2, 1, 1, 8))
    with pytest.raises(ValueError, match="do not match"):
        cache.update(torch.zeros(2, 4, 1, 4), torch.zeros(2, 2, 1, 8))
    m = MultiheadDiffAttn(64, 0, 4)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        m(torch.randn(1, 2, 64), cache={})
    with pytest.raises(ValueError, match="position_ids must be"):
        m(torch.randn(1, 2, 64), position_ids=torch.arange(3)[None])


def test_a_refused_call_leaves_the_cache_unchanged():
    m, x, rel_pos = _setup(False, True)
    cache = KVCache()
    with torch.no_grad():
        m(x[:, :3], rel_pos=rel_pos, cache=cache)
        with pytest.raises(ValueError, match="key length 4"):
            m(x[:, 3:4], rel_pos=rel_pos, attn_mask=torch.ones(2, 1, 1, 3, dtype=torch.bool), cache=cache)
    assert len(cache) == 3


def test_reset_drops_the_graph_and_frozen_kv_still_backpropagates():
    m, x, rel_pos = _setup(True, True, length=6)
    for p in (*m.k_proj.parameters(), *m.v_proj.parameters()):
        p.requires_grad_(False)  # only q's side trains, as with adapters on q
    cache = KVCache(16, 2)
    for _ in range(2):
        y = _run_in_pieces(m, x, rel_pos, cache, [3, 1, 1, 1])
        y.sum().backward()  # in-place writes would have clobbered keys saved for backward
        cache.reset()
    assert m.q_proj.weight.grad is not None
