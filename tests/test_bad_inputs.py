"""Wrong input gets a ValueError (TypeError for a wrong type) that names the argument.

Each case here used to pass silently (a wrapped offset, a NaN, a wrong dtype accepted) or to fail
deep inside torch (a reshape, an IndexError, a dtype mismatch in a matmul, an EOFError).
"""

from __future__ import annotations

import math

import pytest
import torch

from multihead_sdpadiff import (
    DiffTransformer,
    DiffTransformerConfig,
    KVCache,
    MultiheadDiffAttn,
    RotaryEmbedding,
    apply_rotary_emb,
    diff_attention,
)
from multihead_sdpadiff.layers import RMSNorm
from multihead_sdpadiff.layers_v2 import MultiheadDiffAttnV2
from multihead_sdpadiff.models.attention import StandardAttention
from multihead_sdpadiff.ops.v2 import diff_attention_v2

TINY = {"vocab_size": 32, "embed_dim": 32, "num_layers": 2, "num_heads": 4, "max_seq_len": 16}


# ---------------------------------------------------------------- item 3: negative RoPE offsets


def test_negative_int_offset_is_refused_not_wrapped():
    cos, sin = RotaryEmbedding(8)(8)
    x = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="seqlen_offsets must be >= 0"):
        apply_rotary_emb(x, cos, sin, True, -6)  # used to equal offset 2


def test_negative_tensor_offset_is_refused():
    cos, sin = RotaryEmbedding(8)(8)
    with pytest.raises(ValueError, match=r"seqlen_offsets \+ l\) must lie in \[0, 8\)"):
        apply_rotary_emb(torch.randn(2, 2, 1, 8), cos, sin, True, torch.tensor([0, -1]))


# ------------------------------------------------------------------- item 4: empty inputs


LAYERS = {
    "v1": lambda: MultiheadDiffAttn(32, 0, 4, 2),
    "v2": lambda: MultiheadDiffAttnV2(32, 4, 2),
    "standard": lambda: StandardAttention(32, 4, 2),
}


@pytest.mark.parametrize("shape", [(2, 0), (0, 3)], ids=["L0", "B0"])
@pytest.mark.parametrize("layer", LAYERS)
def test_layers_return_empty_outputs_and_leave_the_cache(layer, shape):
    m = LAYERS[layer]()
    rel = RotaryEmbedding(m.head_dim)(8)
    x = torch.randn(*shape, 32, requires_grad=True)
    y = m(x, rel_pos=rel)
    assert y.shape == (*shape, 32)
    y.sum().backward()  # an empty graph, as torch modules give
    fresh = KVCache()
    m(x, rel_pos=rel, cache=fresh)
    assert len(fresh) == 0 and fresh._k is None  # not even allocated
    if shape[0] == 2:
        c = KVCache()
        with torch.no_grad():
            m(torch.randn(2, 3, 32), rel_pos=rel, cache=c)
            before = c.keys().clone()
            mask = torch.ones(2, 1, 0, 3, dtype=torch.bool)  # (B, 1, L, len(cache) + L)
            assert m(x.detach(), rel_pos=rel, attn_mask=mask, cache=c).shape == (2, 0, 32)
        assert len(c) == 3 and torch.equal(c.keys(), before)


@pytest.mark.parametrize("attention", ["diff", "diff_v2", "standard"])
def test_model_on_empty_inputs(attention):
    model = DiffTransformer(attention=attention, **TINY)
    ids = torch.randint(0, 32, (2, 5))
    assert model(ids[:, :0]).logits.shape == (2, 0, 32)
    assert model(ids[:0]).logits.shape == (0, 5, 32)
    cache = model.new_cache()
    model(ids[:, :3], cache=cache)
    out = model(ids[:, :0], attention_mask=torch.ones(2, 3), cache=cache)
    assert out.logits.shape == (2, 0, 32) and all(len(c) == 3 for c in cache)


# -------------------------------------------------------------- item 5: numbers that gave NaN


@pytest.mark.parametrize("eps", [0.0, -1e-5, math.nan, math.inf])
def test_norm_eps_must_be_positive_and_finite(eps):
    with pytest.raises(ValueError, match="norm_eps must be positive"):
        MultiheadDiffAttn(32, 0, 4, norm_eps=eps)
    with pytest.raises(ValueError, match="eps must be positive"):
        RMSNorm(8, eps=eps)
    with pytest.raises(ValueError, match="norm_eps"):
        DiffTransformerConfig(norm_eps=eps)


@pytest.mark.parametrize("base", [0.0, -10.0, math.inf, math.nan, True])
def test_rotary_base_must_be_positive_and_finite(base):
    with pytest.raises(ValueError, match="base must be a positive finite number"):
        RotaryEmbedding(8, base=base)


@pytest.mark.parametrize("field", ["init_std", "rope_base", "norm_eps"])
@pytest.mark.parametrize("value", [math.inf, -0.02, math.nan])
def test_config_numbers_must_be_positive_and_finite(field, value):
    with pytest.raises(ValueError, match=f"DiffTransformerConfig.{field} must be a positive finite number"):
        DiffTransformerConfig(**{field: value})


# ------------------------------------------------------------- item 6: wrong dtypes accepted


def _qkv():
    return torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 16)


@pytest.mark.parametrize("lam", [torch.tensor(True), torch.ones(2, dtype=torch.bool), torch.tensor(0.5 + 0j),
                                 torch.tensor(1)], ids=["bool", "bool_heads", "complex", "int"])
def test_lambda_must_be_a_real_floating_tensor(lam):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="lambda_full must be a real floating tensor"):
        diff_attention(q, k, v, lam)
    with pytest.raises(ValueError, match="lam must be a real floating tensor"):
        diff_attention_v2(q, k[:, :2], k[:, :2], lam)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_rel_pos_tables_must_be_floating(dtype):
    m = MultiheadDiffAttn(32, 0, 4)
    cos, sin = RotaryEmbedding(8)(4)
    with pytest.raises(ValueError, match="rel_pos cos and sin must be floating"):
        m(torch.randn(1, 3, 32), rel_pos=(cos.to(dtype), sin.to(dtype)))
    with pytest.raises(ValueError, match="cos and sin must be floating"):
        apply_rotary_emb(torch.randn(1, 3, 2, 8), cos.to(dtype), sin.to(dtype))


def test_config_checks_the_v2_impl():
    with pytest.raises(ValueError, match="DiffTransformerConfig.impl must be one of"):
        DiffTransformerConfig(attention="diff_v2", impl="chunked")
    DiffTransformerConfig(attention="diff_v2", impl="sdpa")


# ---------------------------------------------------- item 7: raw torch errors, now named


@pytest.mark.parametrize("layer", LAYERS)
def test_x_of_another_dtype_or_device(layer):
    m = LAYERS[layer]()
    with pytest.raises(ValueError, match="x must have the layer's dtype torch.float32, got torch.float64"):
        m(torch.randn(1, 3, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be on the layer's device"):
        m(torch.randn(1, 3, 32, device="meta"))


def test_autocast_still_accepts_x_of_another_dtype():
    m = MultiheadDiffAttn(32, 0, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(1, 3, 32, dtype=torch.bfloat16)).shape == (1, 3, 32)


@pytest.mark.parametrize("layer", [*LAYERS, "model"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32"])
def test_layer_dtype_argument(layer, dtype):
    make = {"v1": lambda **kw: MultiheadDiffAttn(32, 0, 4, **kw), "v2": lambda **kw: MultiheadDiffAttnV2(32, 4, **kw),
            "standard": lambda **kw: StandardAttention(32, 4, **kw),
            "model": lambda **kw: DiffTransformer(**TINY, **kw)}[layer]
    with pytest.raises(TypeError if isinstance(dtype, str) else ValueError, match="dtype must be"):
        make(dtype=dtype)


def test_token_ids_and_labels_out_of_range_or_of_the_wrong_dtype():
    model = DiffTransformer(**TINY)
    ids = torch.randint(0, 32, (2, 5))
    for bad in (32, -1):
        with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=32\)"):
            model(ids.index_fill(1, torch.tensor([2]), bad))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, vocab_size=32\) or be -100"):
            model(ids, labels=ids.index_fill(1, torch.tensor([2]), bad))
    with pytest.raises(ValueError, match="labels must hold integer"):
        model(ids, labels=ids.float())
    with pytest.raises(TypeError, match="labels must be a tensor"):
        model(ids, labels=ids.tolist())
    assert model(ids, labels=ids.masked_fill(ids > 20, -100)).loss.isfinite()


def test_value_checks_are_skipped_off_cpu_unless_debugging(monkeypatch):
    from multihead_sdpadiff.models.transformer import check_values

    assert check_values(torch.zeros(1))
    assert not check_values(torch.zeros(1, device="meta"))
    monkeypatch.setenv("SDPADIFF_DEBUG", "1")
    assert check_values(torch.zeros(1, device="meta"))


def test_apply_rotary_emb_argument_types():
    cos, sin = RotaryEmbedding(8)(8)
    x = torch.randn(2, 3, 1, 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        apply_rotary_emb(x.tolist(), cos, sin)
    with pytest.raises(TypeError, match="seqlen_offsets must be an int"):
        apply_rotary_emb(x, cos, sin, True, 1.0)
    with pytest.raises(ValueError, match="seqlen_offsets must hold integers"):
        apply_rotary_emb(x, cos, sin, True, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="position_ids must hold integers"):
        apply_rotary_emb(x, cos, sin, True, position_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cos and sin must be on x's device"):
        apply_rotary_emb(x, cos.to("meta"), sin.to("meta"))


def test_uint8_position_ids_are_positions_not_a_mask():
    cos, sin = RotaryEmbedding(8)(8)
    x = torch.randn(2, 3, 1, 8)
    pos = torch.tensor([[0, 1, 2], [3, 4, 5]])
    want = apply_rotary_emb(x, cos, sin, True, position_ids=pos)
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin, True, position_ids=pos.to(torch.uint8)), want)
    m = MultiheadDiffAttn(32, 0, 4)
    rel = RotaryEmbedding(8)(8)
    xs = torch.randn(2, 3, 32)
    torch.testing.assert_close(m(xs, rel_pos=rel, position_ids=pos.to(torch.uint8)),
                               m(xs, rel_pos=rel, position_ids=pos))


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0])
def test_generate_temperature(temperature):
    model = DiffTransformer(**TINY)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        model.generate(torch.randint(0, 32, (1, 3)), 2, temperature=temperature)


def test_lambda_and_rel_pos_on_another_device():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="lambda_full must be on the queries' device"):
        diff_attention(q, k, v, torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match="lam must be on the queries' device"):
        diff_attention_v2(q, k[:, :2], k[:, :2], torch.ones(2, device="meta"))
    m = MultiheadDiffAttn(32, 0, 4)
    cos, sin = RotaryEmbedding(8)(4, device="meta")
    with pytest.raises(ValueError, match="rel_pos cos and sin must be on x's device cpu"):
        m(torch.randn(1, 3, 32), rel_pos=(cos, sin))


def test_bad_checkpoints(tmp_path):
    model = DiffTransformer(**TINY)
    good = tmp_path / "good.pt"
    model.save_checkpoint(good)
    data = good.read_bytes()
    for name, blob in (("truncated", data[: len(data) // 2]), ("short", data[:100]), ("empty", b"")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match="is not a readable checkpoint"):
            DiffTransformer.from_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        DiffTransformer.from_checkpoint(tmp_path / "missing.pt")

    blob = torch.load(good, weights_only=True)
    no_config = {k: v for k, v in blob.items() if k != "config"}
    torch.save(no_config, tmp_path / "no_config.pt")
    with pytest.raises(ValueError, match="lacks its 'config'"):
        DiffTransformer.from_checkpoint(tmp_path / "no_config.pt")
    mixed = dict(blob, state_dict=dict(blob["state_dict"]))
    mixed["state_dict"]["norm.weight"] = mixed["state_dict"]["norm.weight"].to(torch.bfloat16)
    torch.save(mixed, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="mixes tensor dtypes"):
        DiffTransformer.from_checkpoint(tmp_path / "mixed.pt")
    bad_config = dict(blob, config=dict(blob["config"], embed_dim=33))
    torch.save(bad_config, tmp_path / "bad_config.pt")
    with pytest.raises(ValueError, match="holds an invalid config"):
        DiffTransformer.from_checkpoint(tmp_path / "bad_config.pt")
    wrong_shapes = dict(blob, config=dict(blob["config"], vocab_size=40))
    torch.save(wrong_shapes, tmp_path / "wrong_shapes.pt")
    with pytest.raises(ValueError, match="does not match its config"):
        DiffTransformer.from_checkpoint(tmp_path / "wrong_shapes.pt")
    loaded = DiffTransformer.from_checkpoint(good)
    ids = torch.randint(0, 32, (1, 4))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------ item 12: H in errors


def test_v1_mask_with_the_constructors_head_count_says_h_is_halved():
    m = MultiheadDiffAttn(48, 0, 12)  # H = 6 differential heads
    assert m.num_heads == 6 and MultiheadDiffAttnV2(48, 12).num_heads == 12
    with pytest.raises(ValueError, match=r"H = num_heads // 2 = 6 differential heads .*num_heads=12"):
        m(torch.randn(1, 3, 48), attn_mask=torch.ones(1, 12, 3, 3, dtype=torch.bool))
    m(torch.randn(1, 3, 48), attn_mask=torch.ones(1, 6, 3, 3, dtype=torch.bool))
