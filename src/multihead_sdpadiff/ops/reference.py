"""The reference strategy: the paper's equation with both maps materialised.

O(Lq * Lk) memory per head. Computes in float32 (float64 for float64 inputs) and casts back.
It is the ground truth the other strategies are compared with, and the path that can return the
maps themselves for analysis.
"""

from __future__ import annotations

import torch

from ..masks import AttentionMask


def softmax_or_zero(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; rows whose every entry is -inf give zeros (and zero gradients)."""
    if scores.shape[-1] == 0:
        return scores
    dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def diff_attention_maps(
    q: torch.Tensor, k: torch.Tensor, mask: AttentionMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two attention maps ``(A1, A2)``, each ``(B, H, Lq, Lk)``, in the working precision."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h2, lq, d = q.shape
    h, hkv = h2 // 2, k.shape[1] // 2
    qh = q.to(work).unflatten(1, (h, 2))  # (B, H, 2, Lq, d)
    kh = k.to(work).unflatten(1, (hkv, 2)).repeat_interleave(h // hkv, dim=1)  # (B, H, 2, Lk, d)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # (B, H, 2, Lq, Lk)
    m = mask.dense(q.device)
    if m is not None:
        m = m.unsqueeze(2)  # (B|1, H|1, 1, Lq, Lk), shared by both maps
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.to(work)
    p = softmax_or_zero(scores)
    return p[:, :, 0], p[:, :, 1]


def reference(q, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    a1, a2 = diff_attention_maps(q, k, mask, scale)
    h, hkv = q.shape[1] // 2, k.shape[1] // 2
    vh = v.to(a1.dtype).repeat_interleave(h // hkv, dim=1)  # (B, H, Lk, 2d)
    a = a1 - lam.to(a1.dtype).view(1, -1, 1, 1) * a2  # (B, H, Lq, Lk)
    return (a @ vh).to(q.dtype)
