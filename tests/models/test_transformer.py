"""DiffTransformer: forward against a float64 oracle, cache, generation, maps, checkpoints, config."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from multihead_sdpadiff import DiffTransformer, DiffTransformerConfig
from multihead_sdpadiff.models import StandardAttention
from tests.models.oracle_model import oracle_logits

TINY = {"vocab_size": 29, "embed_dim": 48, "num_layers": 2, "num_heads": 4, "max_seq_len": 40, "init_std": 0.1}
KINDS = [("diff", 4, 4), ("diff", 4, 2), ("standard", 4, 4), ("standard", 6, 2)]


def tiny(attention="diff", num_heads=4, num_kv_heads=None, dtype=torch.float64, seed=0, **over):
    torch.manual_seed(seed)
    cfg = DiffTransformerConfig(**{**TINY, "attention": attention, "num_heads": num_heads,
                                   "num_kv_heads": num_kv_heads, **over})
    model = DiffTransformer(cfg, dtype=dtype)
    with torch.no_grad():  # non-trivial norm weights, so that a swapped or skipped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("subln.weight"):
                p.uniform_(0.5, 1.5)
    return model


def left_padded(lengths, total, vocab=29, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, total - n:] = 1
        ids[i, : total - n] = 0  # pad id: any id, it must not matter
    return ids, mask


def kind_id(k):
    return f"{k[0]}-nh{k[1]}-kv{k[2]}"


# ------------------------------------------------------------------------------ forward and loss


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
@pytest.mark.parametrize("padded", [False, True])
def test_forward_equals_oracle_composition(kind, padded):
    model = tiny(*kind)
    ids, mask = left_padded([11, 6], 11)
    out = model(ids, attention_mask=mask if padded else None)
    want = oracle_logits(model, ids, mask if padded else None)
    torch.testing.assert_close(out.logits, want, rtol=1e-9, atol=1e-10)
    assert out.loss is None and out.attentions is None


def test_loss_shifts_labels_and_ignores_minus_100():
    model = tiny()
    ids, _ = left_padded([9, 9], 9)
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 29), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    assert out.loss.dtype == torch.float64  # float32 or wider: a float64 model keeps float64


def test_low_precision_model_runs_and_keeps_float32_rope_and_loss():
    model = tiny(dtype=torch.bfloat16)
    ids, mask = left_padded([7, 4], 7)
    out = model(ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("kind", KINDS[1:3], ids=kind_id)
@pytest.mark.parametrize("static", [False, True])
def test_chunks_through_the_cache_equal_one_pass(kind, static):
    model = tiny(*kind)
    ids, mask = left_padded([12, 8], 12)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache(2, 12) if static else model.new_cache()
        parts = [model(ids[:, a:b], attention_mask=mask[:, :b], cache=cache).logits
                 for a, b in [(0, 5), (5, 6), (6, 9), (9, 12)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-11)
    assert all(len(c) == 12 for c in cache)


# ------------------------------------------------------------------------------------ generation


def greedy_without_cache(model, ids, n, mask=None):
    for _ in range(n):
        logits = model(ids, attention_mask=mask).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        if mask is not None:
            mask = F.pad(mask, (0, 1), value=1)
    return ids


@pytest.mark.parametrize("kind", KINDS[1:3], ids=kind_id)
def test_cached_greedy_generate_equals_uncached_decoding(kind):
    model = tiny(*kind)
    ids, mask = left_padded([9, 5, 1], 9)
    with torch.no_grad():
        got = model.generate(ids, 8, temperature=0, attention_mask=mask)
        assert torch.equal(got, greedy_without_cache(model, ids, 8, mask))
        # Each left-padded row continues as its sequence would alone.
        for i, n in enumerate([9, 5, 1]):
            alone = model.generate(ids[i : i + 1, 9 - n :], 8, temperature=0)
            assert torch.equal(got[i, 9 - n :], alone[0])
        assert torch.equal(model.generate(ids[:1], 8, temperature=0), greedy_without_cache(model, ids[:1], 8))


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny()
    ids, mask = left_padded([6, 3], 6)
    a = model.generate(ids, 6, temperature=0.8, attention_mask=mask, generator=torch.Generator().manual_seed(3))
    b = model.generate(ids, 6, temperature=0.8, attention_mask=mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 12)
    greedy = model.generate(ids, 6, temperature=0, attention_mask=mask)
    assert torch.equal(model.generate(ids, 6, temperature=1.5, top_k=1, attention_mask=mask), greedy)


def test_eos_fills_finished_rows_and_stops_early():
    model = tiny()
    ids, _ = left_padded([5, 5], 5)
    free = model.generate(ids, 6, temperature=0)
    eos = int(free[0, 6])  # row 0's second new token
    got = model.generate(ids, 6, temperature=0, eos_token_id=eos)
    assert (got[0, 6:] == eos).all()
    row1 = free[1, 5:]
    hits = (row1 == eos).nonzero()
    stop = int(hits[0]) + 1 if len(hits) else 6
    assert torch.equal(got[1, 5 : 5 + stop], row1[:stop])
    assert got.shape[1] == 5 + max(2, stop)  # stops once both rows are finished


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 3, "temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 3, "top_k": 0}, "top_k"),
    ({"max_new_tokens": 40}, "max_seq_len"),
    ({"max_new_tokens": 3, "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}, "left padding"),
])
def test_generate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny().generate(torch.zeros(2, 3, dtype=torch.long), **kwargs)


# -------------------------------------------------------------------------------- attention maps


def _layer0_input(model, ids):
    return model.layers[0].attn_norm(model.embed_tokens(ids))


@pytest.mark.parametrize("kind", KINDS[1:3], ids=kind_id)
def test_returned_maps_rebuild_the_layer_output(kind):
    model = tiny(*kind)
    ids, mask = left_padded([10, 6], 10)
    out = model(ids, attention_mask=mask, return_attention=True)
    torch.testing.assert_close(out.logits, model(ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert len(out.attentions) == 2
    maps = out.attentions[0]
    attn, x = model.layers[0].attn, _layer0_input(model, ids)
    b, length, _ = x.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    rel_pos = model.rotary(40, dtype=torch.float64)
    want = attn(x, rel_pos, mask.bool()[:, None, None], position_ids=pos)
    real = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]  # (B, 1, Lq, Lk) real pairs
    if kind[0] == "diff":
        for a in (maps.a1, maps.a2):
            torch.testing.assert_close(a.sum(-1)[:, :, -1], torch.ones(b, attn.num_heads, dtype=torch.float64))
            assert (a.masked_select(~real.expand_as(a) & (mask == 1)[:, None, :, None]) == 0).all()
        torch.testing.assert_close(maps.a, maps.a1 - maps.lam * maps.a2)
        v = attn.v_proj(x).view(b, length, attn.num_kv_heads, 2 * attn.head_dim).transpose(1, 2)
        v = v.repeat_interleave(attn.n_rep, dim=1)  # (B, H, L, 2d)
        o = attn.subln(maps.a @ v) * (1 - attn.lambda_init)
    else:
        assert maps.a1 is None and maps.lam is None
        v = attn.v_proj(x).view(b, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        o = maps.a @ v.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    got = attn.out_proj(o.transpose(1, 2).reshape(b, length, -1))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS[1:4:2], ids=kind_id)
def test_maps_through_a_cache_are_the_last_rows_of_the_full_maps(kind):
    model = tiny(*kind)
    ids, mask = left_padded([9, 7], 9)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, return_attention=True).attentions
        cache = model.new_cache()
        model(ids[:, :6], attention_mask=mask[:, :6], cache=cache)
        part = model(ids[:, 6:], attention_mask=mask, cache=cache, return_attention=True).attentions
    for f, p in zip(full, part, strict=True):
        for name in ("a", "a1", "a2") if kind[0] == "diff" else ("a",):
            torch.testing.assert_close(getattr(p, name), getattr(f, name)[:, :, 6:], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = tiny("diff", 4, 2, dtype=torch.float32, impl="reference")
    path = tmp_path / "model.pt"
    model.save_checkpoint(path)
    blob = torch.load(path, weights_only=True)
    assert blob["config"]["impl"] == "reference"
    back = DiffTransformer.from_checkpoint(path)
    assert back.config == model.config
    ids, mask = left_padded([8, 5], 8)
    torch.testing.assert_close(back(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=0, atol=0)
    # The plain state_dict route works too, and keys do not depend on the instance.
    fresh = DiffTransformer(model.config)
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(),
                                                  strict=True))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DiffTransformer checkpoint"):
        DiffTransformer.from_checkpoint(tmp_path / "other.pt")


# -------------------------------------------------------------------------------- parameter match


@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2)])
def test_diff_matches_standard_parameters_as_the_paper_does(nh, nkv):
    cfg = {**TINY, "embed_dim": 64, "num_heads": nh, "num_kv_heads": nkv}
    diff = DiffTransformer(attention="diff", **cfg)
    std = DiffTransformer(attention="standard", **cfg)
    d = 64 // nh
    a, b = diff.num_parameters(breakdown=True), std.num_parameters(breakdown=True)
    assert a["total"] == sum(v for k, v in a.items() if k != "total") == diff.num_parameters()
    # Same projections; each layer adds lambda_q1/k1/q2/k2 (4d) and the sub-norm weight (2d).
    assert a["attention"] - b["attention"] == TINY["num_layers"] * 6 * d
    assert (a["embedding"], a["ffn"], a["norm"]) == (b["embedding"], b["ffn"], b["norm"])
    for blk_d, blk_s in zip(diff.layers, std.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert getattr(blk_d.attn, name).weight.shape == getattr(blk_s.attn, name).weight.shape


def test_v2_is_matched_through_the_ffn_and_decodes():
    cfg = {**TINY, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2}
    v2 = tiny("diff_v2", 4, 2, **{k: v for k, v in cfg.items() if k not in ("num_heads", "num_kv_heads")})
    std = DiffTransformer(attention="standard", **cfg)
    assert abs(v2.num_parameters() - std.num_parameters()) <= TINY["num_layers"] * 3 * 64 // 2
    ids, mask = left_padded([8, 5], 8)
    with torch.no_grad():
        got = v2.generate(ids, 5, temperature=0, attention_mask=mask)
        assert torch.equal(got, greedy_without_cache(v2, ids, 5, mask))


# ---------------------------------------------------------------------------------------- config


BAD_CONFIGS = [
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_layers": 2.0}, "num_layers"),
    ({"embed_dim": 50}, "num_heads .*must divide embed_dim 50"),
    ({"embed_dim": 40, "num_heads": 8}, "num_heads .*even head_dim"),
    ({"num_heads": 3, "embed_dim": 48}, "num_heads .*must be even for attention='diff'"),
    ({"num_kv_heads": 3}, "num_kv_heads .*must divide num_heads 4"),
    ({"num_heads": 8, "num_kv_heads": 1}, "num_kv_heads .*must be even"),
    ({"num_kv_heads": 8}, "num_kv_heads"),
    ({"attention": "linear"}, "attention .*must be one of"),
    ({"impl": "flash"}, "impl .*must be one of"),
    ({"intermediate_size": 0}, "intermediate_size"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"max_seq_len": -1}, "max_seq_len"),
    ({"match_params": 1}, "match_params"),
]


@pytest.mark.parametrize("fields,match", BAD_CONFIGS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_configs_name_the_field(fields, match):
    with pytest.raises(ValueError, match=r"DiffTransformerConfig\." + match):
        DiffTransformerConfig(**{**TINY, **fields})


def test_standard_allows_odd_heads_and_other_forward_errors():
    model = DiffTransformer(attention="standard", **{**TINY, "num_heads": 3})
    assert isinstance(model.layers[0].attn, StandardAttention) and model.layers[0].attn.head_dim == 16
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len 40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(TypeError, match="list of 2 KVCache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=model.new_cache()[:1])
    with pytest.raises(TypeError, match="not both"):
        DiffTransformer(DiffTransformerConfig(), vocab_size=3)


def test_import_pulls_in_nothing_but_torch():
    code = textwrap.dedent("""
        import sys, torch
        before = set(sys.modules)
        import multihead_sdpadiff
        new = {m.split(".")[0] for m in set(sys.modules) - before} - {"multihead_sdpadiff"}
        print(sorted(new))
    """)
    src = importlib.util.find_spec("multihead_sdpadiff").submodule_search_locations[0].rsplit("/", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src, "PATH": ""})
    assert out.stdout.strip() == "[]", out.stdout
