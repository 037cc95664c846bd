"""The attention modules a :class:`~multihead_sdpadiff.DiffTransformer` can stack, and their maps.

* ``"diff"``: :class:`~multihead_sdpadiff.MultiheadDiffAttn`.
* ``"diff_v2"``: ``multihead_sdpadiff.MultiheadDiffAttnV2``.
* ``"standard"``: :class:`StandardAttention`, the plain causal SDPA baseline of the paper's
  comparisons, with the same forward keywords and :class:`~multihead_sdpadiff.KVCache` support.

:func:`attention_maps` recomputes a layer's attention maps with the plain (reference) equations for
analysis. It is never called on the fast path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache, transaction
from ..layers import (
    MultiheadDiffAttn,
    check_dtype,
    check_sliding_window,
    packed_layout,
    project_qkv,
    ragged_mask,
    ragged_prelude,
)
from ..masks import check_cu_seqlens, prepare_mask
from ..ops.reference import diff_attention_maps, softmax_or_zero
from ..ops.sdpa import per_sequence
from ..rotary import apply_rotary_emb

__all__ = ["ATTENTIONS", "LayerAttention", "StandardAttention", "attention_maps"]

#: Names accepted by ``DiffTransformerConfig.attention``.
ATTENTIONS: tuple[str, ...] = ("diff", "diff_v2", "standard")


class StandardAttention(nn.Module):
    """Causal multi-head attention on SDPA: the baseline the differential layers are compared with.

    Args:
        embed_dim: model width E.
        num_heads: query heads; ``head_dim = embed_dim // num_heads``.
        num_kv_heads: key/value heads for GQA (dividing ``num_heads``); default ``num_heads``.
        causal: apply the causal mask, aligned bottom-right as in :mod:`multihead_sdpadiff.masks`.
        sliding_window: ``W`` or ``None``: each query sees itself and the ``W - 1`` keys before it.

    Parameters ``q_proj`` (E → E), ``k_proj`` and ``v_proj`` (E → Hkv·head_dim), ``out_proj``
    (E → E), all without bias: with the same ``num_heads`` these are exactly the shapes of
    :class:`~multihead_sdpadiff.MultiheadDiffAttn`'s projections.

    ``forward`` takes the keywords of ``MultiheadDiffAttn.forward``; RoPE is applied GPT-J style
    (interleaved), as the differential layer does. A :class:`~multihead_sdpadiff.KVCache` holds keys
    and values ``(B, Hkv, S, head_dim)`` after RoPE.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        causal: bool = True,
        sliding_window: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.window = check_sliding_window(sliding_window)
        self.sliding_window = sliding_window
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        check_dtype(dtype)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.causal = causal
        kw = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False, **kw)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=False, **kw)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=False, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False, **kw)

    def _qkv(self, x, rel_pos, position_ids, cache, cu_seqlens=None):
        """q ``(B, H, L, d)`` and every key/value ``(B, Hkv, S, d)``, after RoPE and the cache."""
        return project_qkv(self, x, rel_pos, position_ids, cache, k_maps=self.num_kv_heads, v_width=self.head_dim,
                           cu_seqlens=cu_seqlens)

    def forward(
        self,
        x: torch.Tensor,
        rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (B, L, E) -> (B, L, E)``; ``attn_mask`` broadcastable to ``(B, H, L, len(cache) + L)``.

        ``cu_seqlens`` (or packed ``position_ids``) as for ``MultiheadDiffAttn``: one SDPA call per
        document. A window is one explicit band mask per call."""
        cu_seqlens, position_ids = packed_layout(x, position_ids, cu_seqlens, attn_mask, cache)
        old, position_ids = ragged_prelude(cache, x, attn_mask, position_ids, cu_seqlens)
        causal, window = self.causal, self.window
        with transaction(cache):  # a call that raises leaves the cache as it was
            q, k, v = self._qkv(x, rel_pos, position_ids, cache, cu_seqlens)
            b, length = x.shape[:2]
            if old is not None:
                attn_mask, causal, window = ragged_mask(old, length, k.shape[2], causal, window), False, None
            cu = check_cu_seqlens(cu_seqlens, "cu_seqlens", length) if cu_seqlens is not None else None
            mask = prepare_mask(attn_mask, is_causal=causal, batch=b, heads=self.num_heads,
                                lq=length, lk=k.shape[2], dtype=q.dtype, window=window, cu_q=cu, cu_k=cu)

            def sdpa(q, k, v, _, mask, scale):
                sdpa_mask, is_causal = mask.sdpa_args(q.device)
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=sdpa_mask, is_causal=is_causal, scale=scale,
                    enable_gqa=q.shape[1] != k.shape[1],  # local head counts under TP
                )

            out = per_sequence(sdpa, q, k, v, None, mask, self.scaling, out_heads=q.shape[1])  # (B, H, L, d)
            return self.out_proj(out.transpose(1, 2).reshape(b, length, out.shape[1] * out.shape[3]))  # local H under TP

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}"
                + (f", sliding_window={self.sliding_window}" if self.sliding_window is not None else ""))


class LayerAttention(NamedTuple):
    """One layer's attention maps, each ``(B, H, Lq, Lk)`` in float32 (float64 for a float64 model).

    ``a`` is the map that multiplies the values: ``A1 - lam * A2`` for a differential layer, the
    softmax for a standard one. ``a1``, ``a2`` and ``lam`` (a 0-dim tensor) are ``None`` for a
    standard layer. Masked keys have weight 0; a query that sees no key has a row of zeros.
    """

    a: torch.Tensor
    a1: torch.Tensor | None = None
    a2: torch.Tensor | None = None
    lam: torch.Tensor | None = None


def _project_q(attn, x, maps, rel_pos, position_ids, past):
    b, length, _ = x.shape
    q = attn.q_proj(x).view(b, length, maps, attn.head_dim)
    if rel_pos is not None:
        q = apply_rotary_emb(q, rel_pos[0], rel_pos[1], True, past, position_ids=position_ids)
    return q.transpose(1, 2)  # (B, maps, L, d)


def attention_maps(
    attn: nn.Module,
    x: torch.Tensor,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
    attn_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    cache: KVCache | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> LayerAttention:
    """The maps ``attn(x, rel_pos, attn_mask, position_ids=..., cache=...)`` applies, recomputed.

    Call it *after* the layer's own forward when a cache is used: the keys are then read from the
    cache (which stores them after RoPE), and the queries are the ``L`` newest positions. Without a
    cache the keys are projected from ``x``. The maps come from the plain equations (the
    ``reference`` strategy's :func:`~multihead_sdpadiff.ops.reference.diff_attention_maps` for a
    differential layer), materialised in full: O(Lq·Lk) memory per head. The layer's sliding
    window and packed documents (``cu_seqlens`` or packed ``position_ids``) apply as in its forward;
    a rolling cache has dropped keys the maps would need, and is refused.
    """
    b, length, _ = x.shape
    if cache is not None and cache.is_rolling:
        raise ValueError("attention maps cannot be recomputed from a rolling cache (it keeps only the "
                         "window's keys); use a full cache for analysis")
    past = len(cache) - length if cache is not None else 0
    cu_seqlens, position_ids = packed_layout(x, position_ids, cu_seqlens, attn_mask, cache)
    cu = check_cu_seqlens(cu_seqlens, "cu_seqlens", length) if cu_seqlens is not None else None
    extra = {"window": getattr(attn, "window", None), "cu_q": cu, "cu_k": cu}
    if isinstance(attn, MultiheadDiffAttn):
        h, hkv = attn.num_heads, attn.num_kv_heads
        q = _project_q(attn, x, 2 * h, rel_pos, position_ids, past)  # (B, 2H, L, d)
        if cache is not None:
            k = cache.keys()  # (B, 2Hkv, S, d)
        else:
            k = attn.k_proj(x).view(b, length, 2 * hkv, attn.head_dim)
            if rel_pos is not None:
                k = apply_rotary_emb(k, rel_pos[0], rel_pos[1], True, 0, position_ids=position_ids)
            k = k.transpose(1, 2)
        mask = prepare_mask(attn_mask, is_causal=attn.causal, batch=b, heads=h, lq=length, lk=k.shape[2],
                            dtype=q.dtype, **extra)
        a1, a2 = diff_attention_maps(q, k, mask, attn.scaling)
        lam = attn.lambda_full().to(a1.dtype)
        return LayerAttention(a1 - lam * a2, a1, a2, lam)
    if isinstance(attn, StandardAttention):
        if cache is None:
            q, k, _ = attn._qkv(x, rel_pos, position_ids, None)
        else:
            q, k = _project_q(attn, x, attn.num_heads, rel_pos, position_ids, past), cache.keys()
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)  # (B, H, S, d)
        scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * attn.scaling  # (B, H, L, S)
        mask = prepare_mask(attn_mask, is_causal=attn.causal, batch=b, heads=attn.num_heads, lq=length,
                            lk=k.shape[2], dtype=work, **extra).dense(q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return LayerAttention(softmax_or_zero(scores))
    raise NotImplementedError(
        f"attention maps are not available for {type(attn).__name__}: only MultiheadDiffAttn and "
        "StandardAttention layers expose them"
    )
