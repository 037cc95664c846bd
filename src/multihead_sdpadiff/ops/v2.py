"""Differential attention V2 (unilm ``Diff-Transformer/Diff-Transformer-V2/``): op and strategies.

V2 drops V1's doubled value and sub-norm. The ``2H`` query maps run as one plain attention call
with GQA over ``Hkv`` key/value heads of the same width ``d``, and head ``i`` is
``out[2i] − λ[i] · out[2i+1]`` with ``λ`` per token and per head. Query map ``m`` reads kv head
``m // (2H / Hkv)`` (the kernel's GQA rule), so maps ``2i`` and ``2i+1`` share one kv head only
when ``2H / Hkv`` is even, that is when ``Hkv`` divides ``H``.

The strategies live in their own dict, not in V1's registry: V1's tests iterate that registry and
call its strategies with V1's shapes. They reuse :class:`~.registry.Strategy` and
:class:`~.registry.OpInputs`; here ``k`` and ``v`` are ``(B, Hkv, Lk, d)`` and ``lam`` is
``(B, H, Lq)``, in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import dataclasses

import torch

from ..masks import AttentionMask, prepare_mask
from .reference import diff_attention_maps
from .registry import FLOAT_DTYPES as _FLOAT
from .registry import AutoRule, OpInputs, Registry, Strategy, check_lam_tensor, check_qkv, check_scale
from .sdpa import _sdpa

__all__ = ["IMPLS_V2", "REGISTRY_V2", "diff_attention_v2"]

def _combine(o1: torch.Tensor, o2: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``o1 − lam · o2`` with ``lam`` ``(B, H, Lq)`` per query row, in ``lam``'s precision."""
    return o1.to(lam.dtype) - lam.unsqueeze(-1) * o2.to(lam.dtype)


def reference_v2(q, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Both maps materialised, ``(A1 − λ·A2) · v``, upcast to float32/float64."""
    # V1's map routine pairs head i with k maps 2g, 2g+1 (g = i // (H/Hkv)); giving it every kv
    # head twice makes both maps of head i read kv head g, which is V2's rule.
    a1, a2 = diff_attention_maps(q, k.repeat_interleave(2, dim=1), mask, scale)  # (B, H, Lq, Lk) each
    h, hkv = q.shape[1] // 2, k.shape[1]
    vh = v.to(a1.dtype).repeat_interleave(h // hkv, dim=1)  # (B, H, Lk, d)
    return (_combine(a1, a2, lam) @ vh).to(q.dtype)


def sdpa_v2(q, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """One SDPA call over the 2H maps with GQA, then the per-token difference (the authors' code)."""
    m = mask.tensor
    if m is not None and m.shape[1] != 1:
        # The mask is per output head; maps 2i and 2i+1 both take head i's rows.
        mask = dataclasses.replace(mask, tensor=m.repeat_interleave(2, dim=1))  # (B|1, 2H, Lq, Lk)
    out = _sdpa(q, k, v, mask, scale)  # (B, 2H, Lq, d)
    return _combine(out[:, 0::2], out[:, 1::2], lam).to(q.dtype)


#: The strategies of :func:`diff_attention_v2` (its own registry: V1's tests iterate V1's).
REGISTRY_V2 = Registry("diff_attention_v2")
_register = REGISTRY_V2.register

# flops: relative to standard attention of width 2d per head, as in V1's table (8N²d per head).
_register(Strategy("reference", reference_v2,
                   "materialises A1 - lam*A2, one product with v of width d",
                   flops=0.75, score_memory="O(N^2)", dtypes=_FLOAT))
_register(Strategy("sdpa", sdpa_v2,
                   "one SDPA call over 2H maps with GQA, then out[0::2] - lam*out[1::2]",
                   flops=1.0, score_memory="O(N)", dtypes=_FLOAT,
                   notes="On CUDA, GQA with a mask is expanded to 2H kv heads first (see ops/sdpa.py _sdpa)."))

#: Names accepted by ``diff_attention_v2(impl=...)`` and ``MultiheadDiffAttnV2(impl=...)``.
IMPLS_V2: tuple[str, ...] = REGISTRY_V2.names()

REGISTRY_V2.rules = (AutoRule("sdpa", "one SDPA call with GQA: flash on CPU, the fused kernels on CUDA"),)


def _prepare(q, k, v, lam, attn_mask, is_causal, scale) -> OpInputs:
    check_qkv(q, k, v)
    b, h2, lq, d = q.shape
    h, hkv, lk = h2 // 2, k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hkv == 0:
        raise ValueError(f"k must be (B={b}, Hkv, Lk, d={d}), got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must be (B, Hkv, Lk, d)={tuple(k.shape)} like k, got {tuple(v.shape)}")
    if h % hkv:
        raise ValueError(
            f"the {hkv} kv heads of k must divide the {h} heads (2H={h2} maps of q): map m reads kv head "
            f"m // (2H / Hkv), so maps 2i and 2i+1 share a kv head only when 2H / Hkv is even"
        )

    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if isinstance(lam, bool) or not isinstance(lam, (int, float, torch.Tensor)):
        raise TypeError(f"lam must be a float or a tensor of shape (), (H,) or (B, H, Lq), got {type(lam).__name__}")
    if isinstance(lam, torch.Tensor):
        check_lam_tensor("lam", lam, q.device)
        if lam.dim() == 0:
            lam = lam[None, None, None]
        elif tuple(lam.shape) == (h,):
            lam = lam[None, :, None]
        elif tuple(lam.shape) != (b, h, lq):
            raise ValueError(f"lam must have shape (), (H,)=({h},) or (B, H, Lq)={(b, h, lq)}, got {tuple(lam.shape)}")
        lam = lam.to(device=q.device, dtype=work).expand(b, h, lq)
    else:
        lam = torch.full((1, 1, 1), float(lam), device=q.device, dtype=work).expand(b, h, lq)

    scale = check_scale(scale, d)
    mask = prepare_mask(attn_mask, is_causal=is_causal, batch=b, heads=h, lq=lq, lk=lk, dtype=q.dtype, device=q.device)
    return OpInputs(q, k, v, lam, mask, scale)


def diff_attention_v2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Differential attention V2: ``out_i = attn(q[2i]) − λ_i · attn(q[2i+1])`` over shared k, v.

    Args:
        q: ``(B, 2H, Lq, d)``. Maps ``2i`` and ``2i+1`` are the two maps of output head ``i``.
        k: ``(B, Hkv, Lk, d)`` with ``Hkv`` dividing ``H``. Map ``m`` reads kv head
            ``m // (2H / Hkv)``, so both maps of head ``i`` read kv head ``i // (H / Hkv)``.
        v: ``(B, Hkv, Lk, d)``, the same shape as k (V2 does not double v).
        lam: the multiplier λ itself (the layer passes ``sigmoid(lambda_proj(x))``): a float, a
            0-dim tensor, an ``(H,)`` tensor or a ``(B, H, Lq)`` tensor (per query token and head).
            Gradients flow into a tensor λ. The difference is taken in float32 (float64 for
            float64 inputs).
        attn_mask: ``None``, bool (``True`` = may attend) or floating (added to the scaled scores),
            broadcastable to ``(B, H, Lq, Lk)``; the head axis is the *output* head ``i``, shared by
            maps ``2i`` and ``2i+1``. E.g. ``(Lq, Lk)``, ``(B, 1, Lq, Lk)``, ``(B, 1, 1, Lk)``.
        is_causal: also apply the causal mask, aligned bottom-right: query ``j`` sees keys
            ``t <= j + Lk - Lq`` (right for a KV cache; SDPA's own flag is top-left)::

                Lq = 2, Lk = 5:  1 1 1 1 0
                                 1 1 1 1 1

        scale: score scale, default ``d ** -0.5``.
        impl: a name from :data:`IMPLS_V2`; ``"auto"`` picks ``"sdpa"``. A named strategy that
            cannot run the inputs raises a ValueError with its reasons; nothing falls back.

    A query row that may see no key (all ``False`` or all ``-inf``) returns zeros.

    Returns:
        ``(B, H, Lq, d)`` in q's dtype.
    """
    inputs = _prepare(q, k, v, lam, attn_mask, is_causal, scale)
    strategy, _ = REGISTRY_V2.resolve(impl, inputs)
    return strategy(inputs)
