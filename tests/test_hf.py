"""transformers interop: DiffLlama weights, the attention adapter, the cache and generate()."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the 'hf' extra)")

from transformers import DiffLlamaConfig, DiffLlamaForCausalLM, DiffLlamaModel  # noqa: E402
from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention  # noqa: E402

from multihead_sdpadiff import MultiheadDiffAttn, RotaryEmbedding  # noqa: E402
from multihead_sdpadiff.hf import (  # noqa: E402
    DiffLlamaAttentionAdapter,
    convert_diffllama,
    from_diffllama_attention,
    to_diffllama_state_dict,
)

# (num_attention_heads, num_key_value_heads): head_dim 16 with one map pair per kv head, and
# GQA 2:1 with head_dim 8 and two kv groups (so that "head g + Kh/2" is not trivially head 1).
VARIANTS = {"mha": (4, 4), "gqa": (8, 4)}
PAD = 0
# transformers renamed the models' `past_key_values` argument to `cache` (5.2x; the old name is deprecated).
CACHE_KW = "cache" if "cache" in inspect.signature(DiffLlamaForCausalLM.forward).parameters else "past_key_values"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: with 2 shared cores, OpenMP threads cost 10-50x more than they save.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_config(variant="mha", attn="sdpa", **overrides):
    nh, nkv = VARIANTS[variant]
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=nh,
              num_key_value_heads=nkv, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    kw.update(overrides)
    return DiffLlamaConfig(**kw)


def make_model(variant="mha", attn="sdpa", dtype=torch.float32, seed=0, exact_lambda=False):
    torch.manual_seed(seed)
    model = DiffLlamaForCausalLM(make_config(variant, attn)).to(dtype).eval()
    if exact_lambda:
        # DiffLlama sums λq·λk in float32 and takes exp in float32 even in a float64 model, so in
        # float64 it agrees with our float64 λ only to ~1e-8. Disjoint supports make every product,
        # hence the dot, exactly 0 and exp exactly 1 in both. The λ mapping itself is checked with
        # generic values in the float32 tests and by the bit-exact state_dict round trip.
        with torch.no_grad():
            for layer in model.model.layers:
                a = layer.self_attn
                for q, k in ((a.lambda_q1, a.lambda_k1), (a.lambda_q2, a.lambda_k2)):
                    h = q.numel() // 2
                    q[h:] = 0
                    k[:h] = 0
    return model


def left_padded_batch(length=11, pads=(0, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        ids[row, :p] = PAD
        mask[row, :p] = 0
    return ids, mask


def assert_close_on_real_tokens(got, want, mask, atol, rtol=0.0):
    """Logits of padding positions are not compared: their rows attend to nothing, and eager
    attention gives them a uniform average where SDPA gives zeros."""
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_round_trip_bit_exactly(variant):
    model = make_model(variant)
    for layer in model.model.layers:
        theirs = layer.self_attn
        ours = from_diffllama_attention(theirs)
        assert ours.lambda_init == theirs.lambda_init  # same rule, 0-based layer index
        assert torch.equal(ours.subln.weight, torch.ones(2 * ours.head_dim))
        assert ours.subln.eps == model.config.rms_norm_eps
        back = to_diffllama_state_dict(ours)
        want = theirs.state_dict()
        assert back.keys() == want.keys()
        for key, value in want.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_weights_round_trip_bit_exactly(variant):
    nh, nkv = VARIANTS[variant]
    torch.manual_seed(3)
    ours = MultiheadDiffAttn(64, 1, nh, nkv, norm_eps=1e-5)
    for p in ours.parameters():
        torch.nn.init.normal_(p)
    with torch.no_grad():
        ours.subln.weight.fill_(1.0)
    theirs = make_model(variant).model.layers[1].self_attn
    theirs.load_state_dict(to_diffllama_state_dict(ours), strict=True)
    again = from_diffllama_attention(theirs)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert set(n for n, p in again.named_parameters() if p.requires_grad) == set(ours.state_dict())


def _their_attention(attn, x, cos, sin):
    out, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_module_equals_diffllama_attention(variant):
    """Module level: our module with RoPE tables of width d/2 equals DiffLlamaAttention."""
    model = make_model(variant, dtype=torch.float64, exact_lambda=True)
    rotary = model.model.rotary_emb
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    pos = torch.arange(13)[None]
    cos, sin = rotary(x, pos)  # (1, 13, d), half-split
    d = cos.shape[-1]
    for layer in model.model.layers:
        ours = from_diffllama_attention(layer.self_attn)
        got = ours(x, rel_pos=(cos[0, :, : d // 2], sin[0, :, : d // 2]))
        torch.testing.assert_close(got, _their_attention(layer.self_attn, x, cos, sin), atol=1e-12, rtol=0)
        # Our own RoPE tables hold the same angles (default rope_type, theta 10000).
        got = ours(x, rel_pos=RotaryEmbedding(d)(13, dtype=torch.float64))
        torch.testing.assert_close(got, _their_attention(layer.self_attn, x, cos, sin), atol=1e-6, rtol=0)


def test_module_equals_diffllama_attention_float32_generic_lambda():
    model = make_model("gqa")
    with torch.no_grad():
        for p in model.model.layers[1].self_attn.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)  # λ far from λ_init
    x = torch.randn(2, 13, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(13)[None])
    attn = model.model.layers[1].self_attn
    ours = from_diffllama_attention(attn)
    got = ours(x, rel_pos=(cos[0, :, :4], sin[0, :, :4]))  # head_dim 8
    torch.testing.assert_close(got, _their_attention(attn, x, cos, sin), atol=2e-6, rtol=1e-5)


def test_sub_norm_weight_is_folded_into_o_proj():
    torch.manual_seed(4)
    ours = MultiheadDiffAttn(64, 1, 8, 4, dtype=torch.float64)
    with torch.no_grad():
        ours.subln.weight.uniform_(0.5, 1.5)
    model = make_model("gqa", dtype=torch.float64, exact_lambda=True)
    theirs = model.model.layers[1].self_attn
    sd = to_diffllama_state_dict(ours)
    with torch.no_grad():
        for key in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            getattr(ours, key).copy_(theirs.state_dict()[key])  # keep the exact λ
            sd[key] = theirs.state_dict()[key]
    theirs.load_state_dict(sd)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    cos, sin = model.model.rotary_emb(x, torch.arange(9)[None])
    torch.testing.assert_close(ours(x, rel_pos=(cos[0, :, :4], sin[0, :, :4])),
                               _their_attention(theirs, x, cos, sin), atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# The converted model
# --------------------------------------------------------------------------------------------


def test_convert_swaps_every_layer_and_leaves_the_original():
    model = make_model("gqa")
    converted = convert_diffllama(model, impl="sdpa_2pass")
    assert all(isinstance(layer.self_attn, DiffLlamaAttention) for layer in model.model.layers)
    adapters = [layer.self_attn for layer in converted.model.layers]
    assert all(isinstance(a, DiffLlamaAttentionAdapter) for a in adapters)
    assert [a.layer_idx for a in adapters] == [0, 1] and adapters[0].attn.impl == "sdpa_2pass"
    assert convert_diffllama(model, inplace=True) is model
    base = DiffLlamaModel(make_config("mha"))
    assert isinstance(convert_diffllama(base).layers[0].self_attn, DiffLlamaAttentionAdapter)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_float32(variant, attn):
    model = make_model(variant, attn)
    converted = convert_diffllama(model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert_close_on_real_tokens(converted(ids, attention_mask=mask).logits,
                                    model(ids, attention_mask=mask).logits, mask, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_float64_tightly(variant):
    model = make_model(variant, "sdpa", torch.float64, exact_lambda=True)
    converted = convert_diffllama(model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert_close_on_real_tokens(converted(ids, attention_mask=mask).logits,
                                    model(ids, attention_mask=mask).logits, mask, atol=1e-10)
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, atol=1e-10, rtol=0)
        # Per-row positions that are not a shift of each other (RoPE would hide a shift).
        pos = torch.stack([torch.arange(11), 3 * torch.arange(11) + 5])
        torch.testing.assert_close(converted(ids, position_ids=pos).logits, model(ids, position_ids=pos).logits,
                                   atol=1e-10, rtol=0)


def test_logits_equal_float64_eager():
    """transformers' eager attention takes its softmax in float32 even in float64 (so ~1e-7 here),
    and with left padding its float64 finfo.min mask becomes -inf in float32: fully masked rows turn
    to NaN and spread to every later layer. So eager float64 is compared without padding."""
    model = make_model("gqa", "eager", torch.float64, exact_lambda=True)
    ids, _ = left_padded_batch(pads=(0, 0))
    with torch.no_grad():
        torch.testing.assert_close(convert_diffllama(model)(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_training_gradients_equal():
    """The LM loss's gradients: each weight's gradient maps like the weight itself."""
    model = make_model("gqa", "sdpa", torch.float64, exact_lambda=True).train()
    converted = convert_diffllama(model).train()
    ids, mask = left_padded_batch()
    # A padding position sees no key, so its output is a convention (zeros in transformers 5's SDPA
    # path, other values elsewhere): leave out every label that a padding position predicts.
    predicted_by_pad = torch.cat((torch.zeros_like(mask[:, :1]), mask[:, :-1]), dim=1) == 0
    labels = ids.masked_fill(predicted_by_pad, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    converted(ids, attention_mask=mask, labels=labels).loss.backward()
    for theirs, adapter in zip(model.model.layers, converted.model.layers, strict=True):
        ours = adapter.self_attn.attn
        # A module holding our gradients as its weights, mapped like weights.
        probe = MultiheadDiffAttn(64, 0, 2 * ours.num_heads, 2 * ours.num_kv_heads, dtype=torch.float64)
        probe.load_state_dict({n: p.grad for n, p in ours.named_parameters() if n != "subln.weight"}, strict=False)
        mapped = to_diffllama_state_dict(probe)
        for name, p in theirs.self_attn.named_parameters():
            # DiffLlama's λ path runs in float32 even in float64, hence the looser λ tolerance.
            tol = 1e-6 if name.startswith("lambda") else 1e-9
            torch.testing.assert_close(mapped[name], p.grad, atol=1e-12, rtol=tol, msg=name)
    torch.testing.assert_close(converted.model.embed_tokens.weight.grad, model.model.embed_tokens.weight.grad,
                               atol=1e-12, rtol=1e-9)


def test_cached_pieces_equal_one_pass():
    """Prefill, then chunks and single tokens through transformers' DynamicCache."""
    from transformers import DynamicCache

    model = make_model("gqa", "sdpa", torch.float64, exact_lambda=True)
    converted = convert_diffllama(model)
    ids, mask = left_padded_batch(length=12)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() makes them for left padding
    with torch.no_grad():
        full = converted(ids, attention_mask=mask, position_ids=pos).logits
        cache, outs, start = DynamicCache(), [], 0
        for size in (5, 3, 1, 1, 2):
            out = converted(ids[:, start:start + size], attention_mask=mask[:, :start + size],
                            position_ids=pos[:, start:start + size], use_cache=True, **{CACHE_KW: cache})
            outs.append(out.logits)
            start += size
        assert cache.get_seq_length() == 12
        for layer_idx in range(2):
            layer = cache.layers[layer_idx] if hasattr(cache, "layers") else None  # transformers 5 / 4
            k, v = (layer.keys, layer.values) if layer is not None else (cache.key_cache[layer_idx],
                                                                        cache.value_cache[layer_idx])
            assert k.shape == v.shape == (2, model.config.num_key_value_heads, 12, 8)  # config-shaped
        assert_close_on_real_tokens(torch.cat(outs, dim=1), full, mask, atol=1e-10)


GEN = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False, "pad_token_id": PAD}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_identical_left_padded(variant, attn):
    model = make_model(variant, attn)
    converted = convert_diffllama(model)
    ids, mask = left_padded_batch(length=7, pads=(0, 3))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, **GEN)
        got = converted.generate(ids, attention_mask=mask, **GEN)
    assert want.shape == (2, 27)
    assert torch.equal(got, want)


def test_greedy_generate_identical_static_cache_and_beams():
    model = make_model("gqa")
    converted = convert_diffllama(model)
    ids, mask = left_padded_batch(length=7, pads=(0, 3))
    with torch.no_grad():
        for extra in ({"cache_implementation": "static"}, {"num_beams": 3}):
            want = model.generate(ids, attention_mask=mask, **GEN, **extra)
            assert torch.equal(converted.generate(ids, attention_mask=mask, **GEN, **extra), want), extra


# --------------------------------------------------------------------------------------------
# Refusals and the optional dependency
# --------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 32}, "head_dim 32 differs"),
]


@pytest.mark.parametrize("overrides,match", BAD_CONFIGS)
def test_unsupported_configs_raise(overrides, match):
    model = DiffLlamaForCausalLM(make_config("mha", **overrides))
    with pytest.raises(ValueError, match=match):
        convert_diffllama(model)
    with pytest.raises(ValueError, match=match):
        from_diffllama_attention(model.model.layers[0].self_attn)


@pytest.mark.parametrize("field,value,match", [
    ("attention_dropout", 0.1, "attention_dropout"),  # DiffLlama refuses these at construction,
    ("num_key_value_heads", 3, "num_key_value_heads must be even"),  # so the config is edited after
    ("num_attention_heads", 6, "multiple of num_key_value_heads"),
])
def test_unsupported_edited_configs_raise(field, value, match):
    model = make_model("mha")
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=match):
        convert_diffllama(model)


def test_unreadable_attn_implementation_raises():
    model = make_model("mha")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation 'flex_attention'"):
        convert_diffllama(model)
    with pytest.raises(TypeError, match="DiffLlama model"):
        convert_diffllama(torch.nn.Linear(2, 2))


def test_importing_the_package_does_not_import_transformers():
    code = ("import sys, multihead_sdpadiff, multihead_sdpadiff.hf; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_position_ids_equal_each_document_alone(attn):
    """transformers passes packed position_ids (DataCollatorWithFlattening) to the attention layer:
    the converted model keeps each document to itself, as each document run alone."""
    model = make_model("gqa" if "gqa" in VARIANTS else "mha", attn, dtype=torch.float64, exact_lambda=True)
    converted = convert_diffllama(model)
    lens = (4, 7, 3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        packed = converted(ids, position_ids=pos).logits
        alone, a = [], 0
        for n in lens:
            alone.append(converted(ids[:, a:a + n]).logits)
            a += n
        alone = torch.cat(alone, dim=1)
        torch.testing.assert_close(packed, alone, atol=1e-10, rtol=0)
