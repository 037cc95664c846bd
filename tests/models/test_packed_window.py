"""Packed rows, sliding windows and the rolling cache in the layers and the model.

Packed rows are compared with each document run alone; windowed layers with the float64 oracle
module under an explicit band mask; the rolling cache with a full cache.
"""

from __future__ import annotations

import pytest
import torch

from multihead_sdpadiff import (
    DiffTransformer,
    DiffTransformerConfig,
    KVCache,
    MultiheadDiffAttn,
    MultiheadDiffAttnV2,
)
from multihead_sdpadiff.models import StandardAttention
from multihead_sdpadiff.rotary import RotaryEmbedding
from tests.oracle import oracle_module

DOCS = (7, 1, 12, 5)
E = 32


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def restart_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]  # (1, total)


def make_layer(kind, impl, window=None):
    if kind == "diff":
        return MultiheadDiffAttn(E, 1, 4, 4, impl=impl, sliding_window=window).double()
    if kind == "diff_gqa":
        return MultiheadDiffAttn(E, 1, 4, 2, impl=impl, sliding_window=window).double()
    if kind == "v2":
        return MultiheadDiffAttnV2(E, 2, 1, impl=impl, sliding_window=window).double()
    return StandardAttention(E, 4, 2, sliding_window=window).double()


LAYERS = [("diff", "reference"), ("diff", "chunked"), ("diff_gqa", "sdpa_2pass"), ("diff_gqa", "auto"),
          ("diff_gqa", "triton"), ("v2", "sdpa"), ("v2", "reference"), ("standard", None)]


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("kind, impl", LAYERS, ids=lambda x: str(x))
def test_packed_row_equals_each_document_alone(kind, impl, window):
    layer = make_layer(kind, impl or "auto", window) if kind != "standard" else make_layer(kind, None, window)
    if impl == "triton":
        pytest.importorskip("triton")
        layer = MultiheadDiffAttn(64, 1, 4, 2, impl="triton", sliding_window=window).double()  # head_dim 16
    e = layer.embed_dim
    rope = RotaryEmbedding(layer.head_dim)(64, dtype=torch.float64)
    x = torch.randn(1, sum(DOCS), e, dtype=torch.float64, requires_grad=True)
    packed = layer(x, rope, cu_seqlens=cu(DOCS))
    by_positions = layer(x, rope, position_ids=restart_positions(DOCS))
    alone, a = [], 0
    for n in DOCS:
        alone.append(layer(x[:, a:a + n], rope))
        a += n
    alone = torch.cat(alone, dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(by_positions, alone, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(packed)
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad(packed, [x, *params], g)
    want = torch.autograd.grad(alone, [x, *params], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", ["reference", "chunked", "sdpa_4pass"])
def test_sliding_window_layer_equals_oracle_band(impl):
    w, length = 5, 19
    layer = MultiheadDiffAttn(E, 2, 4, 2, impl=impl, sliding_window=w).double()
    rope = RotaryEmbedding(layer.head_dim)(length, dtype=torch.float64)
    x = torch.randn(2, length, E, dtype=torch.float64)
    j, t = torch.arange(length)[:, None], torch.arange(length)[None]
    band = (t <= j) & (t > j - w)  # itself and the w - 1 tokens before it
    want = oracle_module(layer, x, positions=torch.arange(length).expand(2, length), bool_mask=band, causal=False)
    torch.testing.assert_close(layer(x, rope), want, rtol=1e-10, atol=1e-10)


def test_packed_layer_errors():
    layer = MultiheadDiffAttn(E, 0, 4).double()
    x = torch.randn(2, 10, E, dtype=torch.float64)
    c = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens needs one packed row"):
        layer(x, cu_seqlens=c)
    with pytest.raises(ValueError, match="attn_mask cannot be combined with cu_seqlens"):
        layer(x[:1], attn_mask=torch.ones(10, 10, dtype=torch.bool), cu_seqlens=c)
    cache = KVCache()
    with torch.no_grad():
        layer(x[:1, :3], cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens cannot be combined with a non-empty cache"):
        layer(x[:1], cu_seqlens=c, cache=cache)
    assert len(cache) == 3
    with pytest.raises(ValueError, match="cu_seqlens must end at the total length 10"):
        layer(x[:1], cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="sliding_window"):
            MultiheadDiffAttn(E, 0, 4, sliding_window=bad)
    with pytest.raises(TypeError, match="sliding_window"):
        MultiheadDiffAttnV2(E, 2, sliding_window=2.5)


# ------------------------------------------------------------------------------------------ model

TINY = {"vocab_size": 29, "embed_dim": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 64,
        "init_std": 0.2}


@pytest.mark.parametrize("attention", ["diff", "diff_v2", "standard"])
def test_model_packed_equals_each_document_alone(attention):
    cfg = DiffTransformerConfig(**TINY, attention=attention, sliding_window=4,
                                layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    model = DiffTransformer(cfg).double()
    ids = torch.randint(0, 29, (1, sum(DOCS)))
    packed = model(ids, cu_seqlens=cu(DOCS)).logits
    by_positions = model(ids, position_ids=restart_positions(DOCS)).logits
    alone, a = [], 0
    for n in DOCS:
        alone.append(model(ids[:, a:a + n]).logits)
        a += n
    alone = torch.cat(alone, dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(by_positions, alone, rtol=1e-9, atol=1e-9)


def test_model_window_pattern_changes_only_windowed_layers():
    base = DiffTransformer(DiffTransformerConfig(**TINY)).double()
    cfg = DiffTransformerConfig(**TINY, sliding_window=3, layer_types=("full_attention",) * 2 + ("sliding_attention",))
    windowed = DiffTransformer(cfg).double()
    windowed.load_state_dict(base.state_dict())
    assert [b.attn.sliding_window for b in windowed.layers] == [None, None, 3]
    ids = torch.randint(0, 29, (2, 20))
    assert not torch.allclose(windowed(ids).logits, base(ids).logits)  # the window matters
    # With a window as long as the sequence, it hides nothing.
    wide = DiffTransformer(DiffTransformerConfig(**TINY, sliding_window=20)).double()
    wide.load_state_dict(base.state_dict())
    torch.testing.assert_close(wide(ids).logits, base(ids).logits, rtol=1e-10, atol=1e-10)


def test_config_window_errors():
    with pytest.raises(ValueError, match="sliding_window"):
        DiffTransformerConfig(**TINY, sliding_window=0)
    with pytest.raises(ValueError, match="layer_types"):
        DiffTransformerConfig(**TINY, sliding_window=4, layer_types=("sliding_attention",))
    with pytest.raises(ValueError, match="layer_types"):
        DiffTransformerConfig(**TINY, layer_types=("sliding_attention",) * 3)
    with pytest.raises(ValueError, match="layer_types"):
        DiffTransformerConfig(**TINY, sliding_window=4, layer_types=("local",) * 3)


@pytest.mark.parametrize("attention", ["diff", "diff_v2", "standard"])
def test_rolling_cache_equals_full_cache(attention):
    w = 5
    cfg = DiffTransformerConfig(**TINY, attention=attention, sliding_window=w,
                                layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    model = DiffTransformer(cfg).double().eval()
    prompt = torch.randint(0, 29, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    rolling = model.new_cache()
    assert [c.is_rolling for c in rolling] == [True, False, True]
    full = [KVCache() for _ in model.layers]
    with torch.no_grad():
        a = model(prompt, attention_mask=mask, cache=rolling).logits
        b = model(prompt, attention_mask=mask, cache=full).logits
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        for _ in range(8):
            nxt = a[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
            a = model(nxt, attention_mask=mask, cache=rolling).logits
            b = model(nxt, attention_mask=mask, cache=full).logits
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            assert len(rolling[0]) == w - 1 and rolling[0].seen_tokens == len(full[0])
    # generate's tokens match a run on full caches.
    prompt_mask = mask[:, :9]
    got = model.generate(prompt, 10, temperature=0, attention_mask=prompt_mask)
    model.new_cache = lambda b=None, n=None: [KVCache(n, b) for _ in model.layers]
    want = model.generate(prompt, 10, temperature=0, attention_mask=prompt_mask)
    assert torch.equal(got, want)


def test_rolling_cache_keeps_memory_bounded():
    c = KVCache(keep=3)
    k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 1, 10, 8)
    with torch.no_grad():
        fk, fv = c.update(k, v)
        assert fk.shape[2] == 10 and len(c) == 3 and c.seen_tokens == 10
        torch.testing.assert_close(c.keys(), k[:, :, -3:])
        fk, _ = c.update(k[:, :, :1], v[:, :, :1])
        assert fk.shape[2] == 4 and len(c) == 3 and c.seen_tokens == 11
        torch.testing.assert_close(c.keys(), torch.cat((k[:, :, -2:], k[:, :, :1]), dim=2))
    with pytest.raises(ValueError, match="keep"):
        KVCache(keep=-1)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(10, 1, keep=3)


# ------------------------------------------------------------------------------- ragged decoding


@pytest.mark.parametrize("attention", ["diff", "diff_v2", "standard"])
def test_ragged_decoding_equals_each_sequence_alone(attention):
    cfg = DiffTransformerConfig(**TINY, attention=attention, sliding_window=4,
                                layer_types=("sliding_attention", "full_attention", "full_attention"))
    model = DiffTransformer(cfg).double().eval()
    lens = (5, 9, 3)
    ids = torch.randint(0, 29, (1, sum(lens)))
    cache = model.new_ragged_cache(len(lens))
    with torch.no_grad():
        logits = model(ids, cu_seqlens=cu(lens), cache=cache).logits[0]  # (total, V)
        last = logits[cu(lens)[1:].long() - 1]  # (B, V): each document's last token
        assert cache[0].cache_seqlens.tolist() == list(lens)
        steps = [last]
        for _ in range(5):
            nxt = steps[-1].argmax(-1, keepdim=True)  # (B, 1), no padding anywhere
            steps.append(model(nxt, cache=cache).logits[:, -1])
        assert cache[0].cache_seqlens.tolist() == [n + 5 for n in lens]
        got = torch.stack(steps, dim=1)  # (B, 6, V)
        a = 0
        for b, n in enumerate(lens):
            alone_cache = [KVCache() for _ in model.layers]
            out = [model(ids[:, a:a + n], cache=alone_cache).logits[:, -1]]
            for _ in range(5):
                out.append(model(out[-1].argmax(-1, keepdim=True), cache=alone_cache).logits[:, -1])
            torch.testing.assert_close(got[b], torch.cat(out), rtol=1e-9, atol=1e-9)
            a += n


def test_ragged_cache_errors_and_rollback():
    model = DiffTransformer(DiffTransformerConfig(**TINY)).double().eval()
    cache = model.new_ragged_cache(2)
    with torch.no_grad():
        model(torch.randint(0, 29, (1, 7)), cu_seqlens=cu((3, 4)), cache=cache)
        with pytest.raises(ValueError, match="attention_mask cannot be combined with ragged caches"):
            model(torch.zeros(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 8), cache=cache)
        with pytest.raises(ValueError, match="ragged cache holds batch_size 2"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="packed row of 2 documents"):
            model(torch.randint(0, 29, (1, 7)), cu_seqlens=cu((3, 2, 2)), cache=cache)
    assert cache[0].cache_seqlens.tolist() == [3, 4] and all(c.cache_seqlens.tolist() == [3, 4] for c in cache)
    with pytest.raises(ValueError, match="ragged cache needs batch_size"):
        KVCache(ragged=True)
