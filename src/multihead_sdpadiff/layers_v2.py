"""The Differential Transformer V2 attention layer (unilm ``Diff-Transformer/Diff-Transformer-V2/``)."""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache, transaction
from .layers import (
    _check_positive_int,
    attend,
    check_dtype,
    check_sliding_window,
    impl_property,
    packed_layout,
    project_qkv,
    ragged_mask,
    ragged_prelude,
)
from .ops.v2 import IMPLS_V2, diff_attention_v2, diff_attention_v2_varlen

__all__ = ["MultiheadDiffAttnV2"]


class MultiheadDiffAttnV2(nn.Module):
    """Differential attention V2: one attention call over ``2H`` query maps, then a per-token difference.

    For output head ``i``: ``out_i = attn(q[2i]) − sigmoid(lambda_proj(x))_i · attn(q[2i+1])``, where
    both maps attend over the same k and v head (GQA). There is no sub-norm and v is not doubled.

    Args:
        embed_dim: model width E.
        num_heads: the number of output heads H. q has ``2H`` maps of width ``head_dim``.
        num_kv_heads: key/value heads ``Hkv`` (default ``num_heads``, as the authors'). Must divide
            ``num_heads``: query map ``m`` reads kv head ``m // (2H / Hkv)``, and the two maps of a
            head share one kv head only when ``2H / Hkv`` is even.
        head_dim: width d of every map and kv head (default ``embed_dim // num_heads``; the authors
            pass it explicitly, so ``H * d`` need not equal E).
        causal: apply the causal mask (bottom-right aligned) in addition to any ``attn_mask``.
        impl: the strategy, a name from :data:`~multihead_sdpadiff.IMPLS_V2`; may be changed later
            through the ``impl`` attribute.
        sliding_window: ``W`` or ``None``: each query sees itself and the ``W - 1`` keys before it
            (the op's ``window = (W - 1, 0)``).

    Parameters (the authors' names and shapes, so their checkpoints load with ``strict=True``), all
    without bias: ``q_proj`` (E → 2H·d), ``k_proj`` and ``v_proj`` (E → Hkv·d), ``o_proj``
    (H·d → E), ``lambda_proj`` (E → H).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        causal: bool = True,
        impl: str = "auto",
        sliding_window: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.window = check_sliding_window(sliding_window)
        self.sliding_window = sliding_window
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if num_kv_heads is None:
            num_kv_heads = num_heads
        _check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}: query map m reads kv head "
                f"m // (2*num_heads / num_kv_heads), so maps 2i and 2i+1 of a head would otherwise read "
                f"different kv heads"
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"embed_dim {embed_dim} must be divisible by num_heads {num_heads} when head_dim is not given"
                )
            head_dim = embed_dim // num_heads
        _check_positive_int("head_dim", head_dim)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        check_dtype(dtype)

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5
        self.causal = causal
        self.impl = impl

        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, 2 * num_heads * head_dim, bias=False, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=False, **kw)
        self.lambda_proj = nn.Linear(embed_dim, num_heads, bias=False, **kw)

    impl = impl_property(IMPLS_V2)

    # The attention core, called with diff_attention_v2's arguments; context_parallel (parallel.py)
    # replaces it on an instance with one that gathers keys and values over the sequence shards.
    _attend = staticmethod(diff_attention_v2)

    def lambda_full(self, x: torch.Tensor) -> torch.Tensor:
        """λ = sigmoid(lambda_proj(x)) as ``(B, H, L)``: the projection runs in the module dtype, the
        sigmoid in float32 (float64 for float64 input)."""
        logits = self.lambda_proj(x)  # (B, L, H)
        work = torch.promote_types(logits.dtype, torch.float32)
        return torch.sigmoid(logits.to(work)).transpose(1, 2)  # (B, H, L)

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
        """Args:
            x: ``(B, L, embed_dim)``, or one packed row ``(1, total, embed_dim)`` of documents.
            rel_pos: optional ``(cos, sin)``, each ``(seqlen_ro, head_dim / 2)``; ``None`` (the
                default) applies no RoPE at all. Row ``p`` holds
                absolute position ``p``. Applied GPT-J style (interleaved), as the authors do, to
                all ``2H`` query maps and the ``Hkv`` key heads (not to v).
            attn_mask: optional bool (True = may attend) or additive float mask broadcastable to
                ``(B, H, L, Lk)`` with ``H = num_heads`` (output heads; both maps of a head share
                its rows) and ``Lk = len(cache) + L`` (``L`` without a cache), e.g. ``(L, Lk)``,
                ``(B, 1, L, Lk)`` or ``(B, 1, 1, Lk)`` for key padding. With ``causal=True`` the
                causal mask applies too, aligned bottom-right: the ``L`` new tokens are the last
                ``L`` positions. Rows that see no key give zeros.
            position_ids: optional ``(B, L)`` absolute positions for RoPE (left-padded batches).
                Default: ``len(cache) .. len(cache) + L - 1`` for every sequence.
            cache: optional :class:`KVCache`; the new keys ``(B, Hkv, L, d)`` (after RoPE) and
                values ``(B, Hkv, L, d)`` are appended and the queries attend over everything
                cached. Create it as ``KVCache()`` or ``KVCache(max_len, batch_size)``; its
                ``num_kv_heads``/``head_dim`` keywords preallocate V1's layout and do not fit V2.
            cu_seqlens: optional int32 ``(docs + 1,)`` boundaries of documents packed in one row,
                as for :class:`~multihead_sdpadiff.MultiheadDiffAttn` (packed ``position_ids``
                that restart at 0 mean the same).

        Returns ``(B, L, embed_dim)``.
        """
        cu_seqlens, position_ids = packed_layout(x, position_ids, cu_seqlens, attn_mask, cache)
        old, position_ids = ragged_prelude(cache, x, attn_mask, position_ids, cu_seqlens)
        causal, window = self.causal, self.window
        with transaction(cache):  # a call that raises leaves the cache as it was
            q, k, v = project_qkv(self, x, rel_pos, position_ids, cache, k_maps=self.num_kv_heads,
                                  v_width=self.head_dim, cu_seqlens=cu_seqlens)  # (B, 2H, L, d), (B, Hkv, Lk, d) each
            b, length = x.shape[:2]
            if old is not None:
                attn_mask, causal, window = ragged_mask(old, length, k.shape[2], causal, window), False, None
            out = attend(self._attend, diff_attention_v2_varlen, q, k, v, self.lambda_full(x),
                         attn_mask=attn_mask, causal=causal, window=window, scale=self.scaling,
                         impl=self.impl, cu_seqlens=cu_seqlens)  # (B, H, L, d)
            return self.o_proj(out.transpose(1, 2).reshape(b, length, out.shape[1] * out.shape[3]))  # local H under TP

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}, impl={self.impl!r}"
        )
