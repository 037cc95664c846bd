"""transformers interop: run a DiffLlama model's attention on :class:`MultiheadDiffAttn`.

Needs the ``hf`` extra (``pip install "multihead-sdpadiff[hf]"``). transformers is imported only
when a function here needs it, never by ``import multihead_sdpadiff``.

* :func:`from_diffllama_attention` builds a :class:`MultiheadDiffAttn` with exactly equivalent
  weights from a transformers ``DiffLlamaAttention`` (MHA or GQA).
* :func:`to_diffllama_state_dict` is the inverse: a state_dict with ``DiffLlamaAttention``'s keys.
* :func:`convert_diffllama` swaps every attention layer of a ``DiffLlamaForCausalLM`` (or
  ``DiffLlamaModel``) for a :class:`DiffLlamaAttentionAdapter`, which speaks transformers'
  attention-layer interface (position embeddings, 4-D masks, its ``Cache``), so that forward and
  ``generate()`` run on this package.

The weight mapping (docs/transformers.md derives it). DiffLlama has ``Hh = num_attention_heads``
query maps and ``Kh = num_key_value_heads`` key/value heads of width ``d``; map ``i`` pairs with map
``i + Hh/2``, and RoPE is applied half-split (pairs ``(j, j + d/2)``). Here head ``i`` owns maps
``2i, 2i+1`` and RoPE is interleaved (pairs ``(2j, 2j+1)``). So:

* our q map ``2i`` is their q head ``i``, our map ``2i+1`` their head ``i + Hh/2``; within a map,
  our row ``2j`` is their row ``j`` and our row ``2j+1`` their row ``j + d/2``;
* k likewise with ``Kh``;
* our v group ``g`` (``2d`` rows) is their v head ``g`` stacked on their v head ``g + Kh/2``;
* ``o_proj`` and the four λ vectors carry over unchanged; their sub-norm has no weight (ours: ones).
"""

from __future__ import annotations

import copy
import importlib
from importlib.util import find_spec
from typing import Any

import torch
from torch import nn

from .cache import KVCache
from .layers import MultiheadDiffAttn

__all__ = [
    "DiffLlamaAttentionAdapter",
    "check_diffllama_config",
    "convert_diffllama",
    "diffllama_config_problems",
    "from_diffllama_attention",
    "to_diffllama_state_dict",
]

#: Attention implementations whose masks the adapter understands (the mask's format follows
#: ``config._attn_implementation``): ``None`` or a bool 4-D mask for sdpa, an additive float 4-D
#: mask for eager.
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def _transformers():
    if find_spec("transformers") is None:
        raise ImportError(
            "multihead_sdpadiff.hf needs transformers: pip install \"multihead-sdpadiff[hf]\""
        )
    return importlib.import_module("transformers")


# ---------------------------------------------------------------------------------------------
# Configuration checks
# ---------------------------------------------------------------------------------------------


def diffllama_config_problems(config: Any) -> list[str]:
    """Every reason why ``config`` (a ``DiffLlamaConfig``) cannot run on :class:`MultiheadDiffAttn`."""
    problems = []
    hidden, nh, nkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    if nkv is None or nkv % 2:
        problems.append(f"num_key_value_heads must be even (each differential head has two maps), got {nkv}")
    if nh % 2:
        problems.append(f"num_attention_heads must be even, got {nh}")
    if nkv and nh % nkv:
        problems.append(f"num_attention_heads {nh} must be a multiple of num_key_value_heads {nkv}")
    if hidden % nh:
        problems.append(f"hidden_size {hidden} must be divisible by num_attention_heads {nh}")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim != hidden // nh:
        problems.append(
            f"head_dim {head_dim} differs from hidden_size // num_attention_heads = {hidden // nh}; "
            "MultiheadDiffAttn ties head_dim to embed_dim / num_heads"
        )
    if (hidden // nh) % 2:
        problems.append(f"head_dim {hidden // nh} must be even for RoPE")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=True: MultiheadDiffAttn's projections have no bias")
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        problems.append(f"attention_dropout={dropout}: differential attention defines no dropout")
    if not getattr(config, "is_causal", True):
        problems.append("is_causal=False: the adapter always applies the causal mask")
    return problems


def check_diffllama_config(config: Any) -> None:
    """Raise a ValueError naming every reason why ``config`` cannot be converted."""
    problems = diffllama_config_problems(config)
    if problems:
        raise ValueError("cannot convert this DiffLlama configuration: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Weight mapping
# ---------------------------------------------------------------------------------------------


def _qk_to_ours(w: torch.Tensor, maps: int, d: int) -> torch.Tensor:
    """q/k projection rows from their layout to ours.

    Theirs, viewed as (c, i, c2, j): map ``c * maps/2 + i``, row ``c2 * d/2 + j``.
    Ours, viewed as (i, c, j, c2): map ``2i + c``, row ``2j + c2``.
    """
    e = w.shape[-1]
    return w.reshape(2, maps // 2, 2, d // 2, e).permute(1, 0, 3, 2, 4).reshape(maps * d, e)


def _qk_to_theirs(w: torch.Tensor, maps: int, d: int) -> torch.Tensor:
    e = w.shape[-1]
    return w.reshape(maps // 2, 2, d // 2, 2, e).permute(1, 0, 3, 2, 4).reshape(maps * d, e)


def _v_to_ours(w: torch.Tensor, kv_heads: int, d: int) -> torch.Tensor:
    e = w.shape[-1]
    # their head c * Kh/2 + g, row j  ->  our group g, row c * d + j
    return w.reshape(2, kv_heads // 2, d, e).transpose(0, 1).reshape(kv_heads * d, e)


def _v_to_theirs(w: torch.Tensor, kv_heads: int, d: int) -> torch.Tensor:
    e = w.shape[-1]
    return w.reshape(kv_heads // 2, 2, d, e).transpose(0, 1).reshape(kv_heads * d, e)


def from_diffllama_attention(attn: nn.Module, *, impl: str = "auto") -> MultiheadDiffAttn:
    """A :class:`MultiheadDiffAttn` computing what the transformers ``DiffLlamaAttention`` ``attn`` computes.

    The new module is on ``attn``'s device; every parameter keeps the dtype it has in ``attn``
    (so ``to_diffllama_state_dict(from_diffllama_attention(attn))`` equals ``attn.state_dict()``
    bit for bit). ``lambda_init`` is DiffLlama's, taken from ``attn`` (both compute
    ``0.8 - 0.6 * exp(-0.3 * layer_idx)`` from the 0-based layer index), ``norm_eps`` is
    ``config.rms_norm_eps`` and the sub-norm weight is ones.

    The module expects RoPE tables ``(cos, sin)`` of width ``head_dim / 2`` applied interleaved, as
    everywhere in this package: DiffLlama's half-split tables ``(…, head_dim)`` carry each angle
    twice, and their first half is what this module needs (:class:`DiffLlamaAttentionAdapter`
    does this).

    Raises ValueError for configurations it cannot represent (see :func:`check_diffllama_config`).
    """
    config = getattr(attn, "config", None)
    if config is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "lambda_q1")):
        raise TypeError(f"expected a transformers DiffLlamaAttention, got {type(attn).__name__}")
    check_diffllama_config(config)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if getattr(attn, name).bias is not None:
            raise ValueError(f"{name} has a bias; MultiheadDiffAttn's projections have none")
    layer_idx = attn.layer_idx
    if layer_idx is None:
        raise ValueError("the DiffLlamaAttention has no layer_idx, so its lambda_init is undefined")
    hidden, nh, nkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = hidden // nh
    weight = attn.q_proj.weight
    module = MultiheadDiffAttn(
        hidden, layer_idx, nh, nkv, impl=impl, causal=True, norm_eps=config.rms_norm_eps,
        device=weight.device, dtype=weight.dtype,
    )
    if module.lambda_init != attn.lambda_init:  # same rule today; follow DiffLlama if it ever changes
        module.lambda_init = float(attn.lambda_init)
    with torch.no_grad():
        state = {
            "q_proj.weight": _qk_to_ours(attn.q_proj.weight, nh, d),
            "k_proj.weight": _qk_to_ours(attn.k_proj.weight, nkv, d),
            "v_proj.weight": _v_to_ours(attn.v_proj.weight, nkv, d),
            "out_proj.weight": attn.o_proj.weight.clone(),
            "subln.weight": torch.ones(2 * d, device=weight.device, dtype=weight.dtype),
            **{n: getattr(attn, n).clone() for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")},
        }
    # assign=True: parameters take these tensors, dtypes included (e.g. float32 λ in a bf16 model).
    module.load_state_dict(state, strict=True, assign=True)
    return module.train(attn.training)


def to_diffllama_state_dict(module: MultiheadDiffAttn) -> dict[str, torch.Tensor]:
    """``module``'s weights as a ``DiffLlamaAttention`` state_dict (the inverse of :func:`from_diffllama_attention`).

    Keys: ``q_proj.weight``, ``k_proj.weight``, ``v_proj.weight``, ``o_proj.weight``,
    ``lambda_q1``, ``lambda_k1``, ``lambda_q2``, ``lambda_k2``. Load it into the
    ``DiffLlamaAttention`` of layer ``module``'s depth (DiffLlama derives ``lambda_init`` from the
    layer index), with ``num_attention_heads = 2 * module.num_heads``,
    ``num_key_value_heads = 2 * module.num_kv_heads`` and ``rms_norm_eps = module.subln.eps``.

    DiffLlama's sub-norm has no weight. A sub-norm weight that is not all ones is folded into
    ``o_proj``'s columns (exact in real arithmetic; one rounding per weight in floating point).
    """
    if not isinstance(module, MultiheadDiffAttn):
        raise TypeError(f"expected a MultiheadDiffAttn, got {type(module).__name__}")
    nh, nkv, d = 2 * module.num_heads, 2 * module.num_kv_heads, module.head_dim
    with torch.no_grad():
        o = module.out_proj.weight.detach().clone()
        w = module.subln.weight.detach()
        if not bool((w == 1).all()):
            # out_proj(norm(x) * w) == (out_proj.weight * w tiled over heads)(norm(x))
            o = o * w.to(o.dtype).repeat(module.num_heads)
        state = {
            "q_proj.weight": _qk_to_theirs(module.q_proj.weight.detach(), nh, d),
            "k_proj.weight": _qk_to_theirs(module.k_proj.weight.detach(), nkv, d),
            "v_proj.weight": _v_to_theirs(module.v_proj.weight.detach(), nkv, d),
            "o_proj.weight": o,
        }
        for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            state[n] = getattr(module, n).detach().clone()
    return state


# ---------------------------------------------------------------------------------------------
# The attention-layer adapter
# ---------------------------------------------------------------------------------------------


class _CacheLayerView(KVCache):
    """One layer of a transformers ``Cache``, seen through :class:`KVCache`'s interface.

    The keys and values live in the transformers cache, in the shape every transformers cache
    class preallocates: ``(B, num_key_value_heads, S, head_dim)`` for both (``StaticCache`` and
    ``early_initialization`` take one head count and one width for keys and values). Keys are
    stored as :class:`MultiheadDiffAttn` makes them (map order ``2g, 2g+1``, interleaved RoPE
    applied); values as the two ``d``-wide halves of each ``2d``-wide group, group ``g``'s halves at
    heads ``2g`` and ``2g+1``. So the transformers cache's own bookkeeping (lengths, beam
    reordering, cropping, batch selection, offloading) works unchanged; the cache is not
    interchangeable with an unconverted model's, whose keys are in another row order.
    """

    def __init__(self, cache: Any, layer_idx: int, past: int):
        super().__init__()
        self.hf_cache = cache
        self.layer_idx = layer_idx
        self._len = past

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, hk, length, d = k.shape
        hkv = v.shape[1]
        v_maps = v.unflatten(-1, (2, d)).transpose(2, 3).reshape(b, hk, length, d)  # (B, 2Hkv, L, d)
        # Older static caches (transformers 4.x, 5.0) write where cache_kwargs["cache_position"] says;
        # newer ones track the position themselves and ignore the argument.
        cache_kwargs = {"cache_position": torch.arange(self._len, self._len + length, device=k.device)}
        keys, values = self.hf_cache.update(k, v_maps, self.layer_idx, cache_kwargs)
        n = self._len + length
        # A static cache returns its whole buffer; the slots past n are unwritten.
        keys, values = keys[:, :, :n], values[:, :, :n]
        values = values.unflatten(1, (hkv, 2)).transpose(2, 3).reshape(b, hkv, n, 2 * d)  # (B, Hkv, n, 2d)
        self._len = n
        return keys, values

    def keys(self) -> torch.Tensor:
        raise TypeError("a view of a transformers cache layer: read the transformers cache instead")

    values = keys

    def reset(self) -> None:
        raise TypeError("a view of a transformers cache layer: reset the transformers cache instead")

    def __repr__(self) -> str:
        return f"_CacheLayerView({type(self.hf_cache).__name__}, layer_idx={self.layer_idx}, len={self._len})"


def _gathered_rope_tables(cos: torch.Tensor, sin: torch.Tensor, batch: int, length: int, head_dim: int):
    """transformers' per-token ``(B|1, L, d)`` half-split tables as a ``(cos, sin)`` table plus positions.

    Each angle appears twice in a half-split row (``cat(freqs, freqs)``), so its first ``d/2``
    entries are the flash-attn-style row that :func:`~multihead_sdpadiff.apply_rotary_emb` needs.
    Flattening the ``(B', L)`` rows gives one table whose row ``b * L + l`` is token ``(b, l)``'s
    angles; ``position_ids = b * L + l`` then selects exactly them, without any change to
    :class:`MultiheadDiffAttn`.
    """
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[1] != length or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"position_embeddings must be (cos, sin) of shape (B or 1, L={length}, head_dim), "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if cos.shape[-1] != head_dim:
        raise ValueError(
            f"rotary tables of width {cos.shape[-1]} for head_dim {head_dim}: partial rotary is not supported"
        )
    rows = cos.shape[0]
    half = head_dim // 2
    table = (cos[..., :half].reshape(rows * length, half), sin[..., :half].reshape(rows * length, half))
    positions = torch.arange(rows * length, device=cos.device).view(rows, length).expand(batch, length)
    return table, positions


def _packed_cu_seqlens(position_ids, batch: int, length: int, past: int) -> torch.Tensor | None:
    """int32 document boundaries when ``position_ids (1, L)`` restart at 0 after the first token
    (and nothing is cached yet)."""
    if (past != 0 or batch != 1 or not isinstance(position_ids, torch.Tensor)
            or tuple(position_ids.shape) != (1, length) or torch.compiler.is_compiling()):
        return None
    starts = (position_ids[0, 1:] == 0).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    return torch.tensor([0, *starts.tolist(), length], dtype=torch.int32, device=position_ids.device)


class DiffLlamaAttentionAdapter(nn.Module):
    """A transformers attention layer (DiffLlama's interface) that runs :class:`MultiheadDiffAttn`.

    ``forward(hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs)``
    returns ``(output, None)`` (attention weights are never materialised).

    * ``position_embeddings``: the model's ``(cos, sin)``, each ``(B or 1, L, head_dim)``, already
      at each token's position (left padding included); see :func:`_gathered_rope_tables`.
    * ``attention_mask``: what the model builds for ``config._attn_implementation``: ``None``
      (sdpa's "plain causal" shortcut), a bool ``(B, 1, L, Lk)`` mask (sdpa) or an additive float
      one with ``finfo.min`` (eager). The module also applies its own bottom-right causal mask,
      which agrees with every causal mask transformers builds, and is what ``None`` means there
      (a single query sees every cached key; ``Lq == Lk`` is the usual triangle).
    * ``cache`` (also accepted as ``past_key_values``): a transformers ``Cache``. Keys and values go
      through ``cache.update(..., layer_idx)`` (see :class:`_CacheLayerView`). A static cache's
      buffer and mask are cut to the ``past + L`` positions written so far, so that the
      bottom-right causal rule holds there too.

    ``cache_position`` (passed by older transformers) gives the number of cached positions when
    present; otherwise the cache's ``get_seq_length(layer_idx)`` does. Other keyword arguments
    (``use_cache``, ...) are accepted and unused: positions arrive through ``position_embeddings``.
    ``position_ids`` of one row that restart at 0 (transformers' ``DataCollatorWithFlattening``),
    with nothing cached yet, mark packed documents: the layer then runs them as
    :func:`~multihead_sdpadiff.diff_attention_varlen` does, each token seeing only its own document
    (transformers' mask is not needed then and is not read).
    """

    is_causal = True

    def __init__(self, attn: MultiheadDiffAttn, layer_idx: int):
        super().__init__()
        if not isinstance(attn, MultiheadDiffAttn):
            raise TypeError(f"attn must be a MultiheadDiffAttn, got {type(attn).__name__}")
        self.attn = attn
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if cache is None:
            cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        if position_embeddings is None:
            raise ValueError("DiffLlamaAttentionAdapter needs the model's position_embeddings (cos, sin)")
        b, length, _ = hidden_states.shape
        rel_pos, positions = _gathered_rope_tables(*position_embeddings, b, length, self.attn.head_dim)

        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4):
            raise ValueError(
                "expected a 4-D attention mask (attn_implementation 'eager' or 'sdpa'), got "
                + (f"shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
                   else type(attention_mask).__name__)
            )
        view = None
        if cache is not None:
            cache_position = kwargs.get("cache_position")  # passed by transformers 4.x and 5.0, not 5.24
            if isinstance(cache_position, torch.Tensor) and cache_position.numel():
                past = int(cache_position[0])
            else:
                past = int(cache.get_seq_length(self.layer_idx))
            view = _CacheLayerView(cache, self.layer_idx, past)
            if attention_mask is not None and attention_mask.shape[-1] > past + length:
                attention_mask = attention_mask[..., : past + length]  # a static cache's unwritten slots
        cu = _packed_cu_seqlens(kwargs.get("position_ids"), b, length, past if cache is not None else 0)
        if cu is not None:
            # Packed documents (position_ids restarting at 0, one row, nothing cached): attention stays
            # inside each document whatever mask transformers built (sdpa builds none), at the cost of
            # the documents. An empty cache receives the row's keys as one sequence, as flash-attn's
            # varlen path in transformers leaves it.
            out = self.attn(hidden_states, rel_pos=rel_pos, position_ids=positions, cu_seqlens=cu, cache=view)
            return out, None
        out = self.attn(hidden_states, rel_pos=rel_pos, attn_mask=attention_mask, position_ids=positions, cache=view)
        return out, None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def _base_model(model: nn.Module) -> nn.Module:
    tf = _transformers()
    from transformers.models.diffllama import modeling_diffllama as md

    if not isinstance(model, md.DiffLlamaPreTrainedModel):
        raise TypeError(f"expected a transformers DiffLlama model, got {type(model).__name__} "
                        f"(transformers {tf.__version__})")
    base = model if isinstance(model, md.DiffLlamaModel) else getattr(model, model.base_model_prefix, None)
    if not isinstance(base, md.DiffLlamaModel):
        raise TypeError(f"{type(model).__name__} holds no DiffLlamaModel")
    return base


def convert_diffllama(model: nn.Module, impl: str = "auto", inplace: bool = False) -> nn.Module:
    """A ``DiffLlamaForCausalLM`` / ``DiffLlamaModel`` whose attention layers run on :class:`MultiheadDiffAttn`.

    Every decoder layer's ``self_attn`` becomes a :class:`DiffLlamaAttentionAdapter` around
    :func:`from_diffllama_attention`'s module (strategy ``impl``). The rest of the model (embeddings,
    rotary embedding, MLPs, norms, head, generation) is transformers' own, so ``model(...)`` and
    ``model.generate(...)`` work as before, with transformers' caches.

    ``inplace=False`` (default) converts a deep copy and leaves ``model`` untouched.

    The converted model's state_dict has this package's names under ``self_attn.attn``; use
    :func:`to_diffllama_state_dict` per layer to go back. Attention weights
    (``output_attentions``) are not available.

    Raises ValueError for unsupported configurations (see :func:`check_diffllama_config`) and for
    attention implementations other than "eager" and "sdpa", whose masks the adapter cannot read
    (``model.set_attn_implementation("sdpa")`` first).
    """
    base = _base_model(model)
    config = base.config
    check_diffllama_config(config)
    attn_impl = config._attn_implementation
    if attn_impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {attn_impl!r} builds masks the adapter cannot read; use one of "
            f"{SUPPORTED_ATTN_IMPLEMENTATIONS} (model.set_attn_implementation('sdpa'))"
        )
    if not inplace:
        model = copy.deepcopy(model)
        base = _base_model(model)
    for layer in base.layers:
        attn = layer.self_attn
        if isinstance(attn, DiffLlamaAttentionAdapter):
            attn.attn.impl = impl
            continue
        layer.self_attn = DiffLlamaAttentionAdapter(from_diffllama_attention(attn, impl=impl), attn.layer_idx)
    return model
