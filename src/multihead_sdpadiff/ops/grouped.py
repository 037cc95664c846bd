"""Grouped Differential Attention (GDA; Lim et al., arXiv 2510.06949, Motif-2): op and strategies.

GDA has unbalanced heads: ``N_s`` signal heads and ``N_n`` noise heads, ``r = N_s / N_n`` signal
heads per noise head. Keys and values come in ``P`` pairs: pair ``p`` has the signal key
``K1 = k[2p]``, the noise key ``K2 = k[2p + 1]`` and one value of width ``2d``. For signal head
``j`` and its noise head ``g = j // r``::

    O_j = (softmax(q_j K1ᵀ · s + M) − λ_j · softmax(q_g K2ᵀ · s + M)) · V        (width 2d)

Both maps use the pair of their noise group, ``p = g // (N_n / P)``. The exact strategies take
each noise softmax **once** and subtract it from its ``r`` signal maps, so the work per (query,
key) pair is ``(6 + 2/r)·d`` per signal head (signal QKᵀ, 1/r of a noise QKᵀ, one product with a
value of width 2d) against ``8·d`` for ``r`` separate differential heads.

The strategies live in their own registry (like V2's): V1's tests iterate V1's registry with V1's
shapes. The exact strategies are ``reference``, ``chunked`` (PyTorch ops, any dtype) and
``cpu_fused`` (V1's fused C++ kernel with ``r`` signal rows per noise row; float32, bfloat16 and
float16 on CPU), which ``auto`` takes first on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..masks import AttentionMask, prepare_mask
from . import cpu_fused as _cpu_fused
from .reference import softmax_or_zero
from .registry import FLOAT_DTYPES as _FLOAT
from .registry import AutoRule, OpInputs, Registry, Strategy, check_qkv, check_scale, mask_needs_no_grad

__all__ = ["IMPLS_GROUPED", "REGISTRY_GROUPED", "GroupedInputs", "grouped_diff_attention"]


@dataclass(frozen=True)
class GroupedInputs(OpInputs):
    """:class:`~.registry.OpInputs` of a GDA call: ``q`` holds the signal queries ``(B, N_s, Lq, d)``,
    ``q_noise`` the noise queries ``(B, N_n, Lq, d)``, ``k (B, 2P, Lk, d)``, ``v (B, P, Lk, 2d)``,
    ``lam (N_s,)`` in float32 (float64 for float64 inputs) and ``mask`` broadcast over
    ``(B, N_n, Lq, Lk)``."""

    q_noise: torch.Tensor = None  # type: ignore[assignment]

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.q, self.q_noise, self.k, self.v, self.lam))

    def sizes(self) -> tuple[int, int, int, int]:
        """``(N_s, N_n, P, r)``."""
        ns, nn_, p = self.q.shape[1], self.q_noise.shape[1], self.v.shape[1]
        return ns, nn_, p, ns // nn_


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _apply_mask(s: torch.Tensor, m: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
    """Scores with a bool (True = may attend) or additive mask ``m`` and a bool ``hidden`` applied."""
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    if hidden is not None:
        s = s.masked_fill(hidden, float("-inf"))
    return s


# ---- reference --------------------------------------------------------------------------------


def reference_grouped(qs, qn, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Both kinds of map materialised, each noise softmax once, then ``(A_sig − λ·A_noise) · V``."""
    work = _work(qs.dtype)
    b, ns, lq, d = qs.shape
    n_noise, p = qn.shape[1], v.shape[1]
    r, m = ns // n_noise, n_noise // p
    k1 = k[:, 0::2].to(work).repeat_interleave(m, dim=1)  # (B, N_n, Lk, d): noise group g reads pair g // m
    k2 = k[:, 1::2].to(work).repeat_interleave(m, dim=1)
    vg = v.to(work).repeat_interleave(m, dim=1)  # (B, N_n, Lk, 2d)
    s_sig = (qs.to(work).unflatten(1, (n_noise, r)) @ k1.unsqueeze(2).transpose(-1, -2)) * scale  # (B, N_n, r, Lq, Lk)
    s_noise = (qn.to(work) @ k2.transpose(-1, -2)) * scale  # (B, N_n, Lq, Lk)
    dense = mask.dense(qs.device)  # (B|1, N_n|1, Lq, Lk) or None
    a_noise = softmax_or_zero(_apply_mask(s_noise, dense, None))  # once per noise head
    a_sig = softmax_or_zero(_apply_mask(s_sig, None if dense is None else dense.unsqueeze(2), None))
    a = a_sig - lam.to(work).view(1, n_noise, r, 1, 1) * a_noise.unsqueeze(2)  # (B, N_n, r, Lq, Lk)
    return (a @ vg.unsqueeze(2)).flatten(1, 2).to(qs.dtype)  # (B, N_s, Lq, 2d)


# ---- chunked ----------------------------------------------------------------------------------

_SCORE_ELEMENTS = 1 << 21


def _block_rows(b: int, ns: int, lk: int) -> int:
    env = os.environ.get("SDPADIFF_CHUNK")
    if env:
        if not env.isdigit() or int(env) == 0:
            raise ValueError(f"SDPADIFF_CHUNK must be a positive integer (query rows per block), got {env!r}")
        return int(env)
    rows = _SCORE_ELEMENTS // max(1, b * ns * lk)
    return int(max(16, min(1024, 1 << max(4, rows.bit_length() - 1))))


def _plan(lq: int, lk: int, mask: AttentionMask, block: int) -> list[tuple[int, int, int, int]]:
    """``(i0, i1, k0, k1)`` per query block: the key range any of its rows may see."""
    visible = None
    if mask.tensor is not None:
        t = mask.tensor
        visible = (t if t.dtype == torch.bool else t > float("-inf")).any(dim=(0, 1))  # (Lq, Lk)
    blocks = []
    for i0 in range(0, lq, block):
        i1 = min(lq, i0 + block)
        k0, k1 = 0, lk
        if mask.causal:
            k1 = max(0, min(lk, i1 + lk - lq))
        if visible is not None and k1 > 0:
            cols = visible[i0:i1, :k1].any(dim=0).nonzero()
            k0, k1 = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
        blocks.append((i0, i1, k0, k1))
    return blocks


def _probs(qs, qn, k, mask: AttentionMask, scale, i0, i1, k0, k1, sizes):
    """Both kinds of map for query block ``[i0, i1)`` against keys ``[k0, k1)``, in the working precision.

    ``qs (B, N_s, bq, d)``, ``qn (B, N_n, bq, d)`` hold the block's rows and ``k (B, 2P, kl, d)`` the
    visible keys. Returns the scaled query rows ``(B, P, m·r·bq, d)`` and ``(B, P, m·bq, d)``, the
    keys ``(B, P, 2, kl, d)``, ``p_sig (B, P, m, r, bq, kl)`` and ``p_noise (B, P, m, bq, kl)``.
    """
    ns, n_noise, p, r = sizes
    m = n_noise // p
    work = _work(qs.dtype)
    b, _, bq, _ = qs.shape
    kl = k1 - k0
    # A pair's m noise heads and their m*r signal heads are stacked along rows: one matmul per pair
    # reads the compact k and v in place (no GQA copies).
    # Scores, softmax and the product with v run in float32 (float64) whatever the input dtype.
    qs_rows = (qs.to(work) * scale).unflatten(1, (p, m * r)).flatten(2, 3)  # (B, P, m*r*bq, d)
    qn_rows = (qn.to(work) * scale).unflatten(1, (p, m)).flatten(2, 3)  # (B, P, m*bq, d)
    kp = k.to(work).unflatten(1, (p, 2))  # (B, P, 2, kl, d)
    s_sig = (qs_rows @ kp[:, :, 0].transpose(-1, -2)).view(b, p, m, r, bq, kl)
    s_noise = (qn_rows @ kp[:, :, 1].transpose(-1, -2)).view(b, p, m, bq, kl)

    mt = mask.tensor
    if mt is not None:
        mt = mt[:, :, i0:i1, k0:k1]  # (B|1, N_n|1, bq, kl)
        mt = mt.unflatten(1, (p, m) if mt.shape[1] > 1 else (1, 1))  # (B|1, P|1, m|1, bq, kl)
        if mt.dtype == torch.bool:
            s_noise.masked_fill_(~mt, float("-inf"))
            s_sig.masked_fill_(~mt.unsqueeze(3), float("-inf"))
        else:
            s_noise.add_(mt.to(work))
            s_sig.add_(mt.to(work).unsqueeze(3))
    if mask.causal:
        off = mask.lk - mask.lq
        c0 = max(k0, i0 + off + 1)  # the first column the causal mask may hide in this block
        if c0 < k1:  # only the columns past c0 are touched
            rows = torch.arange(i0, i1, device=qs.device).unsqueeze(1)
            hidden = torch.arange(c0, k1, device=qs.device).unsqueeze(0) > rows + off  # (bq, k1 - c0)
            s_noise[..., c0 - k0:].masked_fill_(hidden, float("-inf"))
            s_sig[..., c0 - k0:].masked_fill_(hidden, float("-inf"))
    # Rows that see no key exist only with a mask tensor or when causal and Lq > Lk.
    may_die = mask.tensor is not None or (mask.causal and mask.lq > mask.lk)
    p_noise = _softmax(s_noise, may_die)  # (B, P, m, bq, kl): once per noise head
    p_sig = _softmax(s_sig, may_die)  # (B, P, m, r, bq, kl)
    return qs_rows, qn_rows, kp, p_sig, p_noise


def _softmax(s: torch.Tensor, may_die: bool) -> torch.Tensor:
    """Softmax over the last dim; with ``may_die``, rows that are all -inf give zeros, not NaN."""
    if not may_die:
        return torch.softmax(s, dim=-1)
    dead = s.amax(dim=-1, keepdim=True) == float("-inf")
    # Filled before the softmax too, so that the backward sees no NaN.
    return torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


class _ChunkedGrouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, qn, k, v, lam, mask, scale, sizes, block):
        b, ns, lq, d = qs.shape
        lk = k.shape[2]
        blocks = _plan(lq, lk, mask, block or _block_rows(b, ns, lk))
        p = sizes[2]
        out = qs.new_zeros(b, p, ns // p, lq, 2 * d)  # (B, P, m*r, Lq, 2d)
        work = _work(qs.dtype)
        lam_w = lam.to(work).view(1, p, sizes[1] // p, sizes[3], 1, 1)
        for i0, i1, k0, k1 in blocks:
            if k1 <= k0:
                continue  # no row of this block sees any key: zeros
            _, _, _, p_sig, p_noise = _probs(qs[:, :, i0:i1], qn[:, :, i0:i1], k[:, :, k0:k1], mask, scale,
                                             i0, i1, k0, k1, sizes)
            a = p_sig.addcmul_(p_noise.unsqueeze(3), lam_w, value=-1.0)  # A_sig - λ·A_noise, (B, P, m, r, bq, kl)
            o = a.flatten(2, 4) @ v[:, :, k0:k1].to(work)  # (B, P, m*r*bq, 2d)
            out[:, :, :, i0:i1] = o.view(b, p, ns // p, i1 - i0, 2 * d)
        ctx.save_for_backward(qs, qn, k, v, lam)
        ctx.blocks, ctx.mask, ctx.scale, ctx.sizes = blocks, mask, scale, sizes
        return out.flatten(1, 2)  # (B, N_s, Lq, 2d)

    @staticmethod
    def backward(ctx, grad_out):
        qs, qn, k, v, lam = ctx.saved_tensors
        sizes, p = ctx.sizes, ctx.sizes[2]
        work = _work(qs.dtype)
        ns, n_noise, _, r = sizes
        m = n_noise // p
        b, _, _, d = qs.shape
        dqs, dqn = torch.zeros_like(qs, dtype=work), torch.zeros_like(qn, dtype=work)
        dk, dv = torch.zeros_like(k, dtype=work), torch.zeros_like(v, dtype=work)
        dlam = torch.zeros(p, m, r, dtype=work, device=qs.device)
        dk_pairs = dk.unflatten(1, (p, 2))  # (B, P, 2, Lk, d), a view
        lam_w = lam.to(work).view(1, p, m, r, 1, 1)
        go = grad_out.unflatten(1, (p, m * r))  # (B, P, m*r, Lq, 2d)
        for i0, i1, k0, k1 in ctx.blocks:
            if k1 <= k0:
                continue
            bq = i1 - i0
            # Recompute the block's maps (as FlashAttention recomputes its tiles): memory O(block * Lk).
            qs_rows, qn_rows, kp, p_sig, p_noise = _probs(qs[:, :, i0:i1], qn[:, :, i0:i1], k[:, :, k0:k1],
                                                          ctx.mask, ctx.scale, i0, i1, k0, k1, sizes)
            dob = go[:, :, :, i0:i1].to(work).flatten(2, 3)  # (B, P, m*r*bq, 2d)
            a = torch.addcmul(p_sig, p_noise.unsqueeze(3), lam_w, value=-1.0)  # (B, P, m, r, bq, kl)
            dv[:, :, k0:k1] += a.flatten(2, 4).transpose(-1, -2) @ dob
            da = (dob @ v[:, :, k0:k1].to(work).transpose(-1, -2)).view_as(p_sig)  # dA, (B, P, m, r, bq, kl)
            dlam -= (da * p_noise.unsqueeze(3)).sum(dim=(0, 4, 5))
            ds_sig = p_sig * (da - (da * p_sig).sum(-1, keepdim=True))
            dp_noise = -(da * lam_w).sum(3)  # (B, P, m, bq, kl): the r signal heads' share, summed
            ds_noise = p_noise * (dp_noise - (dp_noise * p_noise).sum(-1, keepdim=True))
            ds_sig, ds_noise = ds_sig.flatten(2, 4), ds_noise.flatten(2, 3)  # (B, P, m*r*bq, kl), (B, P, m*bq, kl)
            dqs[:, :, i0:i1] = (ds_sig @ kp[:, :, 0] * ctx.scale).view(b, p, m * r, bq, d).flatten(1, 2)
            dqn[:, :, i0:i1] = (ds_noise @ kp[:, :, 1] * ctx.scale).view(b, p, m, bq, d).flatten(1, 2)
            dk_pairs[:, :, 0, k0:k1] += ds_sig.transpose(-1, -2) @ qs_rows  # the rows carry the scale already
            dk_pairs[:, :, 1, k0:k1] += ds_noise.transpose(-1, -2) @ qn_rows
        return (dqs.to(qs.dtype), dqn.to(qn.dtype), dk.to(k.dtype), dv.to(v.dtype), dlam.flatten().to(lam.dtype),
                None, None, None, None)


def chunked_grouped(qs, qn, k, v, lam, mask: AttentionMask, scale: float, block: int | None = None):
    """Exact GDA one query block at a time (see the module docstring)."""
    ns, n_noise, p = qs.shape[1], qn.shape[1], v.shape[1]
    return _ChunkedGrouped.apply(qs, qn, k, v, lam, mask, scale, (ns, n_noise, p, ns // n_noise), block)


# ---- registry ---------------------------------------------------------------------------------


def _mask_needs_no_grad(inputs: OpInputs) -> list[str]:
    return mask_needs_no_grad(inputs, "use reference")


#: The strategies of :func:`grouped_diff_attention`.
REGISTRY_GROUPED = Registry("grouped_diff_attention")
# flops: relative to standard attention of width 2d over N_s heads (8·N²·d per head), at r = 4.
REGISTRY_GROUPED.register(Strategy(
    "reference", reference_grouped,
    "materialises every map, each noise softmax once, (A_sig - lam*A_noise) times v", flops=(6 + 2 / 4) / 8,
    score_memory="O(N^2)", dtypes=_FLOAT,
    notes="FLOPs (6 + 2/r)/8 of standard attention of width 2d per signal head; 0.81 at r = 4."))
REGISTRY_GROUPED.register(Strategy(
    "chunked", chunked_grouped,
    "exact, one query block at a time: each noise softmax once, reused by its r signal heads",
    flops=(6 + 2 / 4) / 8, score_memory="O(block*N)", dtypes=_FLOAT, compilable=False, check=_mask_needs_no_grad,
    notes="Block size: SDPADIFF_CHUNK rows if set, else ~2M score elements per map kind."))

REGISTRY_GROUPED.register(Strategy(
    "cpu_fused", _cpu_fused.cpu_fused_grouped,
    "fused C++ CPU kernel: each noise softmax once per query block, A_sig - lam*A_noise per key tile, "
    "one product with v; recomputing backward",
    flops=(6 + 2 / 4) / 8, score_memory="O(block*N)", devices=frozenset({"cpu"}), dtypes=_cpu_fused.DTYPES,
    check=lambda i: _mask_needs_no_grad(i) + _cpu_fused.not_supported_reasons(),
    notes="V1's kernel with r signal rows per noise row (r = 1 is V1). Compiled on first use; float64 "
          "stays on chunked."))

#: Names accepted by ``grouped_diff_attention(impl=...)`` and ``GroupedDiffAttn(impl=...)``.
IMPLS_GROUPED: tuple[str, ...] = REGISTRY_GROUPED.names()

REGISTRY_GROUPED.rules = (
    AutoRule("cpu_fused", "CPU: the fused kernel, each noise softmax once, (6 + 2/r)/8 of the FLOPs of r "
             "separate differential heads", device="cpu"),
    AutoRule("chunked", "exact at (6 + 2/r)/8 of the FLOPs of r separate differential heads, O(block * N) memory"),
)


def _prepare(qs, qn, k, v, lambda_full, attn_mask, is_causal, scale) -> GroupedInputs:
    check_qkv(qs, k, v)
    if not isinstance(qn, torch.Tensor):
        raise TypeError(f"q_noise must be a torch.Tensor, got {type(qn).__name__}")
    b, ns, lq, d = qs.shape
    if qn.dim() != 4 or qn.shape[0] != b or qn.shape[2] != lq or qn.shape[3] != d or qn.shape[1] == 0:
        raise ValueError(f"q_noise must be (B={b}, N_n, Lq={lq}, d={d}) with N_n > 0, got {tuple(qn.shape)}")
    if qn.dtype != qs.dtype or qn.device != qs.device:
        raise ValueError(f"q_noise must match q_signal's dtype and device, got {qn.dtype} on {qn.device}")
    n_noise = qn.shape[1]
    if ns % n_noise:
        raise ValueError(f"the {ns} signal heads must be a multiple of the {n_noise} noise heads (r = N_s / N_n)")
    if k.shape[1] % 2 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must be (B={b}, 2P, Lk, d={d}) with an even number of heads (pairs), got {tuple(k.shape)}")
    p, lk = k.shape[1] // 2, k.shape[2]
    if tuple(v.shape) != (b, p, lk, 2 * d):
        raise ValueError(f"v must be (B, P, Lk, 2d)={(b, p, lk, 2 * d)} for k of shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if n_noise % p:
        raise ValueError(
            f"the {p} kv pairs must divide the {n_noise} noise heads: noise head g reads pair g // (N_n / P) and its "
            f"r signal heads read the same pair (this library supports only that alignment)")

    work = _work(qs.dtype)
    if isinstance(lambda_full, bool) or not isinstance(lambda_full, (int, float, torch.Tensor)):
        raise TypeError(f"lambda_full must be a float, a 0-dim tensor or an (N_s,) tensor, got {type(lambda_full).__name__}")
    if isinstance(lambda_full, torch.Tensor):
        if not lambda_full.is_floating_point():
            raise ValueError(f"lambda_full must be a floating tensor, got dtype {lambda_full.dtype}")
        if lambda_full.dim() == 0:
            lam = lambda_full.to(device=qs.device, dtype=work).expand(ns)
        elif tuple(lambda_full.shape) == (ns,):
            lam = lambda_full.to(device=qs.device, dtype=work)
        else:
            raise ValueError(f"lambda_full must be 0-dim or (N_s,)=({ns},), got shape {tuple(lambda_full.shape)}")
    else:
        lam = torch.full((ns,), float(lambda_full), device=qs.device, dtype=work)
    scale = check_scale(scale, d)
    mask = prepare_mask(attn_mask, is_causal=is_causal, batch=b, heads=n_noise, lq=lq, lk=lk, dtype=qs.dtype,
                        device=qs.device)
    return GroupedInputs(qs, k, v, lam, mask, scale, qn)


def grouped_diff_attention(
    q_signal: torch.Tensor,
    q_noise: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_full: float | torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Grouped differential attention: ``(softmax(q_j K1ᵀ·s + M) − λ_j·softmax(q_g K2ᵀ·s + M)) · V``.

    Args:
        q_signal: ``(B, N_s, Lq, d)``, signal head ``j`` belongs to noise head ``g = j // r``,
            ``r = N_s / N_n``.
        q_noise: ``(B, N_n, Lq, d)``.
        k: ``(B, 2P, Lk, d)``: pair ``p`` is signal key ``k[:, 2p]`` and noise key ``k[:, 2p+1]``.
            ``P`` must divide ``N_n``; noise head ``g`` and its signal heads read pair
            ``g // (N_n / P)``.
        v: ``(B, P, Lk, 2d)``, the pair's value (``[v[2p] | v[2p+1]]`` in Motif's layout).
        lambda_full: λ, a float, a 0-dim tensor or an ``(N_s,)`` tensor (one per signal head).
            Gradients flow into a tensor λ; the subtraction is done in float32 or wider.
        attn_mask: ``None``, bool (``True`` = may attend) or floating (added to the scaled scores),
            broadcastable to ``(B, N_n, Lq, Lk)``: one mask per noise group, shared by the noise
            head and its ``r`` signal heads, e.g. ``(Lq, Lk)`` or ``(B, 1, 1, Lk)``.
        is_causal: also apply the causal mask, aligned bottom-right: query ``j`` sees keys
            ``t <= j + Lk - Lq`` (right for a KV cache).
        scale: score scale, default ``d ** -0.5``.
        impl: a name from :data:`IMPLS_GROUPED`; ``"auto"`` picks ``"cpu_fused"`` on CPU where it can
            run (float32, bfloat16, float16), else ``"chunked"``. A named strategy
            that cannot run the inputs raises a ValueError with its reasons.

    A query row that may see no key returns zeros.

    Returns:
        ``(B, N_s, Lq, 2d)`` in q's dtype.
    """
    inputs = _prepare(q_signal, q_noise, k, v, lambda_full, attn_mask, is_causal, scale)
    strategy, _ = REGISTRY_GROUPED.resolve(impl, inputs)
    return strategy.fn(inputs.q, inputs.q_noise, inputs.k, inputs.v, inputs.lam, inputs.mask, inputs.scale)
