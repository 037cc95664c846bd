"""Every layer's combined attention map for a batch, whatever the attention kind.

The maps are recomputed from each attention module's inputs, captured with a forward pre-hook.
``"diff"`` and ``"standard"`` layers go through the library's
:func:`~multihead_sdpadiff.models.attention_maps`; a ``MultiheadDiffAttnV2`` layer, for which that
function may not exist yet, is handled here with the V2 equations (:func:`v2_maps`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..masks import prepare_mask
from ..models import attention_maps
from ..ops.reference import softmax_or_zero
from ..rotary import apply_rotary_emb

__all__ = ["combined_maps", "v2_maps"]


def v2_maps(attn: nn.Module, x: torch.Tensor, rel_pos=None, attn_mask=None, *, position_ids=None,
            cache=None) -> torch.Tensor:
    """The ``(B, H, L, L)`` map ``A_{2i} - λ_i(x_t) · A_{2i+1}`` that a V2 layer applies to its values.

    ``attn`` is a ``MultiheadDiffAttnV2`` (``q_proj`` to ``2H`` maps of width d, ``k_proj`` to Hkv
    heads, ``lambda_full(x)`` giving ``(B, H, L)``); query map ``m`` reads kv head
    ``m // (2H / Hkv)``. No cache: keys are projected from ``x``. float32 (float64 for float64 input).
    """
    if cache is not None:
        raise NotImplementedError("v2_maps does not read a KV cache")
    b, length, _ = x.shape
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, length, 2 * h, d)
    k = attn.k_proj(x).view(b, length, hkv, d)
    if rel_pos is not None:
        q = apply_rotary_emb(q, rel_pos[0], rel_pos[1], True, 0, position_ids=position_ids)
        k = apply_rotary_emb(k, rel_pos[0], rel_pos[1], True, 0, position_ids=position_ids)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q = q.transpose(1, 2).to(work)  # (B, 2H, L, d)
    k = k.transpose(1, 2).to(work).repeat_interleave(2 * h // hkv, dim=1)  # (B, 2H, L, d)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, 2H, L, L)
    mask = prepare_mask(attn_mask, is_causal=attn.causal, batch=b, heads=2 * h, lq=length, lk=length,
                        dtype=work).dense(x.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    p = softmax_or_zero(scores)
    lam = attn.lambda_full(x).to(work)  # (B, H, L)
    return p[:, 0::2] - lam[..., None] * p[:, 1::2]


def _layer_map(attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    try:
        return attention_maps(attn, *args, **kwargs).a
    except NotImplementedError:
        if hasattr(attn, "lambda_proj") and hasattr(attn, "lambda_full"):
            return v2_maps(attn, *args, **kwargs)
        raise


@torch.no_grad()
def combined_maps(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Run ``model(input_ids)`` and return one ``(B, heads, L, L)`` map per layer.

    ``heads`` is the number of maps that multiply values: ``num_heads`` for ``"standard"``,
    ``num_heads / 2`` differential heads for ``"diff"``, and V2's ``num_heads`` output heads. For
    the differential kinds the map is the difference of the two softmax maps, with negative entries.
    """
    captured: list[tuple[nn.Module, tuple, dict]] = []

    def grab(module, args, kwargs):
        captured.append((module, args, dict(kwargs)))

    handles = [block.attn.register_forward_pre_hook(grab, with_kwargs=True) for block in model.layers]
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return [_layer_map(attn, args, kwargs) for attn, args, kwargs in captured]
