"""The four ways of mapping differential attention onto ``F.scaled_dot_product_attention``.

They are the original project's (vasqu/multihead-sdpadiff) four modules, reduced to their attention
core, with GQA paired as unilm's flash files pair it (head ``i`` uses k maps ``2g, 2g+1`` and v
head ``g``, ``g = i // (H / Hkv)``). Notation inside: ``q1 = q[:, 0::2]`` and ``q2 = q[:, 1::2]``
are the two maps of every head, likewise ``k1, k2``; ``v1, v2`` are the halves of v's width.

SDPA's flash kernels need one head size for q, k and v. The strategies whose v is twice as wide as
q (``sdpa_2pass``, ``sdpa_paired``) would fall to the O(N^2) math kernel on CPU; there they pad q
and k with zeros to v's width and pass the original scale, which leaves the scores unchanged and
keeps the flash kernel (at twice the QK^T work). On CUDA they run unpadded: the efficient and
cuDNN kernels accept a wider v.

A window is folded into the one mask each call builds (:meth:`AttentionMask.sdpa_args`). Packed
sequences run as one call per sequence (:func:`per_sequence`): each sequence's own mask is small
and SDPA does only the pairs of that sequence, where one block-diagonal mask over the packed row
would cost O(total_q * total_k) memory and compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks import AttentionMask


def per_sequence(fn, q, k, v, lam, mask: AttentionMask, scale: float, *, lam_per_row: bool = False,
                 out_heads: int | None = None):
    """Run ``fn(q, k, v, lam, mask, scale)`` once per packed sequence and concatenate along the rows.

    Unpacked masks call ``fn`` once, unchanged. ``lam_per_row``: ``lam`` is ``(B, H, Lq)`` (V2)
    and is sliced with the rows; otherwise it is per head and shared. A sequence without keys
    gives zeros; one without queries gives nothing. ``out_heads``: the output's head count
    (default ``q.shape[1] // 2``, the differential heads).
    """
    if not mask.is_packed:
        return fn(q, k, v, lam, mask, scale)
    heads = q.shape[1] // 2 if out_heads is None else out_heads
    outs = []
    for q0, q1, k0, k1 in mask.sequences():
        if q1 == q0:
            continue
        if k1 == k0:
            outs.append(q.new_zeros(q.shape[0], heads, q1 - q0, v.shape[-1]))
            continue
        lam_s = lam[:, :, q0:q1] if lam_per_row else lam
        outs.append(fn(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], lam_s, mask.sequence(q0, q1, k0, k1), scale))
    if not outs:
        return q.new_zeros(q.shape[0], heads, 0, v.shape[-1])
    return torch.cat(outs, dim=2)  # (B, H, total_q, width)


def _sdpa(q, k, v, mask: AttentionMask, scale: float) -> torch.Tensor:
    """SDPA with GQA (query head ``j`` uses kv head ``j // (Hq / Hkv)``) and our mask semantics."""
    attn_mask, is_causal = mask.sdpa_args(q.device)
    if q.device.type == "cpu" and v.shape[-1] != q.shape[-1]:
        # Keep CPU on its flash kernel (see the module docstring).
        pad = v.shape[-1] - q.shape[-1]
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.device.type == "cuda" and (attn_mask is not None or v.shape[-1] != q.shape[-1]):
        # enable_gqa only reaches flash on CUDA; with a mask or a wide v it would fall to math.
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


def combine(o1: torch.Tensor, o2: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``o1 - lam * o2`` per head, computed in ``lam``'s (>= float32) precision, cast to ``o1``'s dtype."""
    out = o1.to(lam.dtype) - lam.view(1, -1, 1, 1) * o2.to(lam.dtype)
    return out.to(o1.dtype)


def _split(q, k, v):
    d = q.shape[-1]
    return q[:, 0::2], q[:, 1::2], k[:, 0::2], k[:, 1::2], v[..., :d], v[..., d:]


def sdpa_4pass(q, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Original 1 (unilm flashdiff_2): four calls of width d, 2x the FLOPs of standard attention."""
    q1, q2, k1, k2, v1, v2 = _split(q, k, v)  # (B, H|Hkv, L, d) each
    o1 = torch.cat((_sdpa(q1, k1, v1, mask, scale), _sdpa(q1, k1, v2, mask, scale)), dim=-1)
    o2 = torch.cat((_sdpa(q2, k2, v1, mask, scale), _sdpa(q2, k2, v2, mask, scale)), dim=-1)
    return combine(o1, o2, lam)  # (B, H, Lq, 2d)


def sdpa_2pass(q, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Original 2 (unilm flashdiff_1): two calls with v of width 2d."""
    q1, q2, k1, k2, _, _ = _split(q, k, v)
    return combine(_sdpa(q1, k1, v, mask, scale), _sdpa(q2, k2, v, mask, scale), lam)


def sdpa_stacked(q, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Original 3: one call over 4H heads of width d: (q1,k1,v1), (q1,k1,v2), (q2,k2,v1), (q2,k2,v2).

    The four combinations are stacked combination-major, so that query head ``c*H + i`` meets kv
    head ``c*Hkv + g`` under SDPA's GQA rule.
    """
    q1, q2, k1, k2, v1, v2 = _split(q, k, v)
    qs = torch.cat((q1, q1, q2, q2), dim=1)  # (B, 4H, Lq, d)
    ks = torch.cat((k1, k1, k2, k2), dim=1)  # (B, 4Hkv, Lk, d)
    vs = torch.cat((v1, v2, v1, v2), dim=1)  # (B, 4Hkv, Lk, d)
    o11, o12, o21, o22 = _sdpa(qs, ks, vs, mask.expand_heads(4), scale).chunk(4, dim=1)
    return combine(torch.cat((o11, o12), dim=-1), torch.cat((o21, o22), dim=-1), lam)


def sdpa_paired(q, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Original 4: one call over the 2H maps with v repeated to every map (width 2d).

    Maps are reordered map-major (all first maps, then all second maps) so that SDPA's GQA rule
    pairs them correctly; the original's interleaved order pairs maps across halves under GQA.
    """
    q1, q2, k1, k2, _, _ = _split(q, k, v)
    qs = torch.cat((q1, q2), dim=1)  # (B, 2H, Lq, d)
    ks = torch.cat((k1, k2), dim=1)  # (B, 2Hkv, Lk, d)
    vs = torch.cat((v, v), dim=1)  # (B, 2Hkv, Lk, 2d)
    o1, o2 = _sdpa(qs, ks, vs, mask.expand_heads(2), scale).chunk(2, dim=1)
    return combine(o1, o2, lam)
