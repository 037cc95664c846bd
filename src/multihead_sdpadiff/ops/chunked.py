"""The chunked strategy: exact differential attention at the FLOP cost of standard attention.

For one block of queries at a time it computes both maps' scores against the keys the block can
see, takes both softmaxes in float32 (or float64), forms ``A1 − λ·A2`` and does *one* product with
v. For float16 and bfloat16 inputs the scores are formed in float32 too (q and k blocks are upcast
before QKᵀ), forward and backward; only the product with v runs in v's dtype, as in SDPA. That is 8·N²·d FLOPs per head (standard attention of width 2d), against 12–16·N²·d for the
SDPA strategies, with O(block · Lk) score memory instead of the reference's O(Lq · Lk).

* Key ranges: causal, window and packed sequences are per-row key intervals
  (:meth:`AttentionMask.row_bounds`); a block reads only the keys from its first row's lower bound
  to its last row's upper bound, and, with a mask tensor, between the first and last key any of
  its rows may see (left or right padding). Whole hidden key blocks are never touched, so a band
  of width W costs O(Lq * (W + block)) and packed sequences cost their own pairs. Blocks never
  cross a packed sequence's boundary, and are sized by the keys a row sees.
* GQA without copies: the ``rep = H / Hkv`` heads of a group are stacked along the query rows of
  the block, so one batched matmul per group reads the compact k and v in place.
* Backward: recomputes each block's maps (as FlashAttention recomputes its tiles), so training
  memory stays O(block · Lk) too.
* A torch op (``sdpadiff::chunked_fwd`` / ``chunked_bwd`` with fake implementations and an
  autograd formula), so ``torch.compile(fullgraph=True)`` keeps it as one node.
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
        self.work = torch.float64 if q.dtype == torch.float64 else torch.float32
        # Causal, window and packing as per-row key intervals [lo, hi), non-decreasing in the row.
        self.bounded = mask.intervals_hide_anything
        lo, hi = mask.row_bounds("cpu")
        self._lo_l, self._hi_l = lo.tolist(), hi.tolist()
        self._lo, self._hi = (lo.to(q.device), hi.to(q.device)) if self.bounded else (None, None)
        if block is None:
            width = self.lk
            if mask.has_window or mask.is_packed:
                # A band or block diagonal: size blocks by the keys a row sees, not by Lk.
                width = max(1, int((hi - lo).float().mean().item()) if self.lq else 1)
            block = block_size(self.b, self.h, width, q.device)
            if width < self.lk:
                block = max(16, min(block, 1 << max(4, (max(1, width) // 2).bit_length() - 1)))
        self.block = block
        # For each query block: (i0, i1, k0, k1), the visible key range [k0, k1). Blocks never
        # cross a packed sequence's boundary, so each one reads only its own sequence's keys.
        self.blocks = []
        m = mask.tensor
        visible = None
        if m is not None:
            visible = (m if m.dtype == torch.bool else m > float("-inf")).any(dim=(0, 1))  # (Lq, Lk)
        for q0, q1, _, _ in mask.sequences():
            for i0 in range(q0, q1, self.block):
                i1 = min(q1, i0 + self.block)
                # Bounds are non-decreasing: the first row has the smallest, the last the largest.
                k0, k1 = self._lo_l[i0], self._hi_l[i1 - 1]
                if visible is not None and k1 > k0:
                    cols = visible[i0:i1, k0:k1].any(dim=0).nonzero()
                    k0, k1 = (k0 + int(cols[0]), k0 + int(cols[-1]) + 1) if len(cols) else (0, 0)
                self.blocks.append((i0, i1, max(k0, 0), max(k1, 0)))

    def hidden(self, i0, i1, k0, k1, device) -> torch.Tensor | None:
        """Bool ``(bq, k1 - k0)``: True where the row intervals hide column ``k0 + c`` from row
        ``i0 + r``; ``None`` when every row of the block sees every column of ``[k0, k1)``."""
        if not self.bounded or (self._lo_l[i1 - 1] <= k0 and self._hi_l[i0] >= k1):
            return None
        cols = torch.arange(k0, k1, device=device)
        return (cols < self._lo[i0:i1, None]) | (cols >= self._hi[i0:i1, None])

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
        hidden = self.hidden(i0, i1, k0, k1, s.device)  # (bq, kl) or None
        if m is not None:
            mb = m[:, :, i0:i1, k0:k1]  # (B|1, H|1, bq, kl)
            mb = mb.unflatten(1, (self.hkv, self.rep) if mb.shape[1] > 1 else (1, 1)).unsqueeze(2)
            vis = mb if mb.dtype == torch.bool else mb > float("-inf")  # (B|1, Hkv|1, 1, rep|1, bq, kl)
            if hidden is not None:
                vis = vis & ~hidden
            if mb.dtype == torch.bool:
                s.masked_fill_(~vis, float("-inf"))
            else:
                s.add_(mb)
            dead = ~vis.any(dim=-1, keepdim=True)
        if hidden is not None:
            if m is None or m.dtype != torch.bool:
                # Only the columns some row cannot see: left of the largest lower bound and right of
                # the smallest upper bound (the causal diagonal, a band's two edges).
                c_lo = min(max(self._lo_l[i1 - 1], k0), k1) - k0
                c_hi = max(min(self._hi_l[i0], k1), k0 + c_lo) - k0
                if c_lo > 0:
                    s[..., :c_lo].masked_fill_(hidden[:, :c_lo], float("-inf"))
                if c_hi < k1 - k0:
                    s[..., c_hi:].masked_fill_(hidden[:, c_hi:], float("-inf"))
            if m is None and any(lo >= hi for lo, hi in zip(self._lo_l[i0:i1], self._hi_l[i0:i1], strict=True)):
                dead = hidden.all(dim=-1, keepdim=True)  # (bq, 1): rows that see nothing
        p = torch.softmax(s, dim=-1)
        if dead is not None and bool(dead.any()):
            p.masked_fill_(dead, 0.0)  # rows that see no key: zeros, not NaN
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


def _backward(grad_out, q, k, v, lam, plan: _Plan, scale):
    """Gradients of q, k, v and λ, recomputing each block's maps."""
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
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlam.flatten().to(lam.dtype)


# The strategy is a torch op (schema, fake and autograd formula) so that torch.compile traces
# through it as one node: its Python block loop depends on the mask's values, which a graph could
# not hold. A mask is passed as an optional tensor plus its intervals (causal flag, window, packed
# boundaries; empty lists when not packed); block 0 = the default size.


def _mask(mask, causal, window, cu_q, cu_k, lq, lk) -> AttentionMask:
    return AttentionMask(mask, causal, lq, lk, (int(window[0]), int(window[1])),
                         tuple(cu_q) if cu_q else None, tuple(cu_k) if cu_k else None)


@torch.library.custom_op("sdpadiff::chunked_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor | None,
            causal: bool, window: list[int], cu_q: list[int], cu_k: list[int], scale: float,
            block: int) -> torch.Tensor:
    plan = _Plan(q, k, _mask(mask, causal, window, cu_q, cu_k, q.shape[2], k.shape[2]), block or None)
    return _forward(q, k, v, lam, plan, scale)


@_fwd_op.register_fake
def _(q, k, v, lam, mask, causal, window, cu_q, cu_k, scale, block):
    b, h2, lq, d = q.shape
    return q.new_empty(b, h2 // 2, lq, 2 * d)


@torch.library.custom_op("sdpadiff::chunked_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
            mask: torch.Tensor | None, causal: bool, window: list[int], cu_q: list[int], cu_k: list[int],
            scale: float, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _Plan(q, k, _mask(mask, causal, window, cu_q, cu_k, q.shape[2], k.shape[2]), block or None)
    return _backward(grad_out, q, k, v, lam, plan, scale)


@_bwd_op.register_fake
def _(grad_out, q, k, v, lam, mask, causal, window, cu_q, cu_k, scale, block):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(lam)


def _setup_context(ctx, inputs, output):
    q, k, v, lam, mask, *args = inputs
    ctx.save_for_backward(q, k, v, lam, *(() if mask is None else (mask,)))
    ctx.has_mask, ctx.args = mask is not None, tuple(args)


def _autograd_backward(ctx, grad_out):
    q, k, v, lam, *rest = ctx.saved_tensors
    mask = rest[0] if ctx.has_mask else None
    dq, dk, dv, dlam = torch.ops.sdpadiff.chunked_bwd(grad_out, q, k, v, lam, mask, *ctx.args)
    return dq, dk, dv, dlam, None, None, None, None, None, None, None


torch.library.register_autograd("sdpadiff::chunked_fwd", _autograd_backward, setup_context=_setup_context)


def chunked(q, k, v, lam, mask: AttentionMask, scale: float, block: int | None = None) -> torch.Tensor:
    """Exact differential attention one query block at a time; see the module docstring."""
    return torch.ops.sdpadiff.chunked_fwd(q, k, v, lam, mask.tensor, mask.causal, list(mask.window),
                                          list(mask.cu_q or ()), list(mask.cu_k or ()), float(scale),
                                          int(block or 0))
