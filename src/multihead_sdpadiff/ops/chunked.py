"""The chunked strategy: exact differential attention at the FLOP cost of standard attention.

For one block of queries at a time it computes both maps' scores against the keys the block can
see, takes both softmaxes in float32 (or float64), forms ``A1 − λ·A2`` and does *one* product with
v. For float16 and bfloat16 inputs the scores are formed in float32 too (q and k blocks are upcast
before QKᵀ), forward and backward; only the product with v runs in v's dtype, as in SDPA. That is 8·N²·d FLOPs per head (standard attention of width 2d), against 12–16·N²·d for the
SDPA strategies, with O(block · Lk) score memory instead of the reference's O(Lq · Lk).

* Key ranges: a block only reads the keys up to its last visible one under the bottom-right causal
  mask, and, with a mask tensor, between the first and last key any of its rows may see (left or
  right padding). Whole hidden key blocks are never touched.
* GQA without copies: the ``rep = H / Hkv`` heads of a group are stacked along the query rows of
  the block, so one batched matmul per group reads the compact k and v in place.
* Backward: a ``torch.autograd.Function`` that recomputes each block's maps (as FlashAttention
  recomputes its tiles), so training memory stays O(block · Lk) too.
"""

from __future__ import annotations

import os

import torch

from ..masks import AttentionMask

# Target number of score elements (both maps, all heads, one block) held at once. About 8 MiB of
# float32 per map: large enough for efficient matmuls, small enough to stay near the caches.
_SCORE_ELEMENTS = 1 << 21


def block_size(b: int, h: int, lk: int, device: torch.device) -> int:
    """Query rows per block: ``SDPADIFF_CHUNK`` if set, else sized to ~2M score elements per map."""
    env = os.environ.get("SDPADIFF_CHUNK")
    if env:
        if not env.isdigit() or int(env) == 0:
            raise ValueError(f"SDPADIFF_CHUNK must be a positive integer (query rows per block), got {env!r}")
        return int(env)
    target = _SCORE_ELEMENTS * (4 if device.type == "cuda" else 1)
    rows = target // max(1, b * h * lk)
    return int(max(16, min(1024, 1 << max(4, rows.bit_length() - 1))))


class _Plan:
    """Everything the forward and backward share: layouts, key ranges and mask slices per block."""

    def __init__(self, q, k, mask: AttentionMask, block: int | None):
        self.b, h2, self.lq, self.d = q.shape
        self.h, self.hkv, self.lk = h2 // 2, k.shape[1] // 2, k.shape[2]
        self.rep = self.h // self.hkv
        self.mask = mask
        self.k_t = None
        self._hidden: dict[tuple[int, int, int], torch.Tensor] = {}
        self.block = block or block_size(self.b, self.h, self.lk, q.device)
        self.work = torch.float64 if q.dtype == torch.float64 else torch.float32
        # For each query block: (i0, i1, k0, k1), the visible key range [k0, k1).
        self.blocks = []
        m = mask.tensor
        visible = None
        if m is not None:
            visible = (m if m.dtype == torch.bool else m > float("-inf")).any(dim=(0, 1))  # (Lq, Lk)
        for i0 in range(0, self.lq, self.block):
            i1 = min(self.lq, i0 + self.block)
            k0, k1 = 0, self.lk
            if mask.causal:
                k1 = max(0, min(self.lk, i1 + self.lk - self.lq))
            if visible is not None and k1 > 0:
                cols = visible[i0:i1, :k1].any(dim=0).nonzero()
                k0, k1 = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
            self.blocks.append((i0, i1, k0, k1))

    def causal_hidden(self, rows: int, shift: int, width: int, device) -> torch.Tensor:
        """Bool ``(rows, width)``: True where the causal mask hides column ``c`` from row ``r``.

        The block's columns start ``shift`` past the first one its first row cannot see, so the
        pattern is ``c + shift >= r``; it repeats across blocks and is built once per shape.
        """
        key = (rows, shift, width)
        hidden = self._hidden.get(key)
        if hidden is None:
            r = torch.arange(rows, device=device).unsqueeze(1)
            c = torch.arange(width, device=device).unsqueeze(0)
            hidden = self._hidden[key] = c + shift >= r
        return hidden

    def q_block(self, q, i0, i1, scale=1.0):
        """(B, 2H, Lq, d) -> (B, Hkv, 2, rep*bq, d) in the working precision, times ``scale``.

        A group's heads are stacked along rows. Half inputs are upcast before the scale and the
        QKᵀ product, so scores are formed in float32: fp16 scores past 65504 stay finite and bf16
        scores keep float32's mantissa (the input dtype's own rounding of q and k is all that is lost).
        """
        qb = q[:, :, i0:i1].unflatten(1, (self.hkv, self.rep, 2))  # (B, Hkv, rep, 2, bq, d)
        return (qb.transpose(2, 3).to(self.work) * scale).flatten(3, 4)  # one copy (two for half), scaled on the way

    def probs(self, q, k, i0, i1, k0, k1, scale):
        """Both maps' softmax, (B, Hkv, 2, rep, bq, kl), in the working precision."""
        if self.k_t is None:
            # With several blocks, k is transposed once per call so that every block's QK^T reads
            # contiguous rows; a single block (a decode step) reads k in place instead.
            # Half inputs are upcast here, once per call, so that QKᵀ runs in the working precision.
            k_t = k.transpose(-1, -2)
            k_t = k_t.to(self.work, memory_format=torch.contiguous_format) if len(self.blocks) > 1 else k_t.to(self.work)
            self.k_t = k_t.unflatten(1, (self.hkv, 2))  # (B, Hkv, 2, d, Lk)
        s = torch.matmul(self.q_block(q, i0, i1, scale), self.k_t[..., k0:k1])  # (B, Hkv, 2, rep*bq, kl), float32+
        s = s.unflatten(3, (self.rep, i1 - i0))  # (B, Hkv, 2, rep, bq, kl)
        dead = None
        m = self.mask.tensor
        off = self.lk - self.lq
        c0 = max(k0, i0 + off + 1)  # the first column the causal mask may hide in this block
        causal_cols = self.mask.causal and c0 < k1
        if causal_cols:
            hidden = self.causal_hidden(i1 - i0, c0 - (i0 + off + 1), k1 - c0, s.device)  # (bq, k1 - c0)
        if m is not None:
            mb = m[:, :, i0:i1, k0:k1]  # (B|1, H|1, bq, kl)
            mb = mb.unflatten(1, (self.hkv, self.rep) if mb.shape[1] > 1 else (1, 1)).unsqueeze(2)
            vis = mb if mb.dtype == torch.bool else mb > float("-inf")  # (B|1, Hkv|1, 1, rep|1, bq, kl)
            if causal_cols:
                vis = vis.clone()
                vis[..., c0 - k0 :] &= ~hidden
            if mb.dtype == torch.bool:
                s.masked_fill_(~vis, float("-inf"))
            else:
                s.add_(mb)
            dead = ~vis.any(dim=-1, keepdim=True)
        if causal_cols and (m is None or m.dtype != torch.bool):
            s[..., c0 - k0 :].masked_fill_(hidden, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if dead is not None and bool(dead.any()):
            p.masked_fill_(dead, 0.0)  # rows that see no key: zeros, not NaN
        if self.mask.causal and i0 < -(self.lk - self.lq):
            p[..., : min(i1, self.lq - self.lk) - i0, :] = 0.0  # Lq > Lk: the first rows see nothing
        return p


def _forward(q, k, v, lam, plan: _Plan, scale):
    out = q.new_zeros(plan.b, plan.hkv, plan.rep, plan.lq, 2 * plan.d)  # (B, Hkv, rep, Lq, 2d)
    lam_w = lam.to(plan.work).view(1, plan.hkv, plan.rep, 1, 1)
    for i0, i1, k0, k1 in plan.blocks:
        if k1 <= k0:
            continue  # no row of this block sees any key: zeros
        p = plan.probs(q, k, i0, i1, k0, k1, scale)  # (B, Hkv, 2, rep, bq, kl)
        a = p[:, :, 0].addcmul_(p[:, :, 1], lam_w, value=-1.0)  # (B, Hkv, rep, bq, kl) = A1 - λ·A2
        o = torch.matmul(a.flatten(2, 3).to(v.dtype), v[:, :, k0:k1])  # (B, Hkv, rep*bq, 2d)
        out[:, :, :, i0:i1] = o.unflatten(2, (plan.rep, i1 - i0))
    return out.flatten(1, 2)  # (B, H, Lq, 2d)


class _ChunkedDiffAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lam, mask, scale, block):
        plan = _Plan(q, k, mask, block)
        ctx.save_for_backward(q, k, v, lam)
        ctx.plan, ctx.scale = plan, scale
        return _forward(q, k, v, lam, plan, scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, lam = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        work = plan.work
        dq = torch.zeros_like(q, dtype=work)
        dk = torch.zeros_like(k, dtype=work)
        dv = torch.zeros_like(v, dtype=work)
        dlam = torch.zeros(plan.hkv, plan.rep, dtype=work, device=q.device)
        lam_w = lam.to(work).view(1, plan.hkv, plan.rep, 1, 1)
        go = grad_out.unflatten(1, (plan.hkv, plan.rep))  # (B, Hkv, rep, Lq, 2d)
        for i0, i1, k0, k1 in plan.blocks:
            if k1 <= k0:
                continue
            bq = i1 - i0
            p = plan.probs(q, k, i0, i1, k0, k1, scale)  # (B, Hkv, 2, rep, bq, kl)
            p1, p2 = p[:, :, 0], p[:, :, 1]  # (B, Hkv, rep, bq, kl)
            dob = go[:, :, :, i0:i1].to(work).flatten(2, 3)  # (B, Hkv, rep*bq, 2d)
            vb = v[:, :, k0:k1].to(work)  # (B, Hkv, kl, 2d)
            a = p1 - lam_w * p2
            dv[:, :, k0:k1] += torch.matmul(a.flatten(2, 3).transpose(-1, -2), dob)
            da = torch.matmul(dob, vb.transpose(-1, -2)).unflatten(2, (plan.rep, bq))  # dA, (B, Hkv, rep, bq, kl)
            r1 = (da * p1).sum(-1, keepdim=True)
            r2 = (da * p2).sum(-1, keepdim=True)
            dlam -= r2.sum(dim=(0, 3, 4)).view(plan.hkv, plan.rep)
            ds = torch.stack((p1 * (da - r1), p2 * (da - r2) * -lam_w), dim=2)  # (B, Hkv, 2, rep, bq, kl)
            ds = ds.mul_(scale).flatten(3, 4)  # (B, Hkv, 2, rep*bq, kl)
            kb = k[:, :, k0:k1].to(work).unflatten(1, (plan.hkv, 2))  # (B, Hkv, 2, kl, d)
            dqb = torch.matmul(ds, kb)  # (B, Hkv, 2, rep*bq, d)
            dq[:, :, i0:i1] = dqb.unflatten(3, (plan.rep, bq)).transpose(2, 3).flatten(1, 3)
            dkb = torch.matmul(ds.transpose(-1, -2), plan.q_block(q, i0, i1))  # (B, Hkv, 2, kl, d)
            dk[:, :, k0:k1] += dkb.flatten(1, 2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlam.flatten().to(lam.dtype), None, None, None


def chunked(q, k, v, lam, mask: AttentionMask, scale: float, block: int | None = None) -> torch.Tensor:
    """Exact differential attention one query block at a time; see the module docstring."""
    return _ChunkedDiffAttention.apply(q, k, v, lam, mask, scale, block)
