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
from . import cpu_fused as _cpu_fused
from .reference import diff_attention_maps
from .registry import FLOAT_DTYPES as _FLOAT
from .registry import (
    AutoRule,
    OpInputs,
    Registry,
    Strategy,
    check_lam_tensor,
    check_qkv,
    check_scale,
    mask_needs_no_grad,
)
from .sdpa import _sdpa, per_sequence

__all__ = ["IMPLS_V2", "REGISTRY_V2", "diff_attention_v2", "diff_attention_v2_varlen"]

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
    """One SDPA call over the 2H maps with GQA, then the per-token difference (the authors' code).

    Packed sequences: one call per sequence (see :func:`.sdpa.per_sequence`)."""
    if mask.is_packed:
        return per_sequence(sdpa_v2, q, k, v, lam, mask, scale, lam_per_row=True)
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


def _cpu_fused_reasons(inputs: OpInputs) -> list[str]:
    return mask_needs_no_grad(inputs, "use reference or sdpa") + _cpu_fused.not_supported_reasons()


_register(Strategy("cpu_fused", _cpu_fused.cpu_fused_v2,
                   "fused C++ CPU kernel: both maps' scores per key tile, A1 - lam*A2 per tile, one product "
                   "with v of width d; recomputing backward",
                   flops=0.75, score_memory="O(block*N)", devices=frozenset({"cpu"}), dtypes=_cpu_fused.DTYPES,
                   check=_cpu_fused_reasons,
                   notes="V1's kernel with both maps reading one kv head, values of width d and lam per token. "
                         "Compiled on first use; float64 stays on sdpa."))
#: Names accepted by ``diff_attention_v2(impl=...)`` and ``MultiheadDiffAttnV2(impl=...)``.
IMPLS_V2: tuple[str, ...] = REGISTRY_V2.names()

# Measured with `sdpadiff bench --op v2` (docs/benchmarks.md): on CPU cpu_fused runs at 0.5-0.65x of
# sdpa for prefill and training (6d FLOPs per pair against 8d) and at or below it for decode.
REGISTRY_V2.rules = (
    AutoRule("cpu_fused", "CPU: fused C++ kernel, A1 - lam*A2 before one product with v (0.75x the FLOPs)",
             device="cpu"),
    AutoRule("sdpa", "one SDPA call with GQA: flash on CPU (float64, no C++ compiler), the fused kernels on CUDA"),
)


def _prepare(q, k, v, lam, attn_mask, is_causal, scale, window=None, cu=None) -> OpInputs:
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
    cu_q, cu_k = cu if cu is not None else (None, None)
    mask = prepare_mask(attn_mask, is_causal=is_causal, batch=b, heads=h, lq=lq, lk=lk, dtype=q.dtype, device=q.device,
                        window=window, cu_q=cu_q, cu_k=cu_k)
    return OpInputs(q, k, v, lam, mask, scale)


def diff_attention_v2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    window: tuple[int, int] | None = None,
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

        window: ``(left, right)``, flash-attn's ``window_size`` (``-1`` unbounded, ``None`` =
            ``(-1, -1)``), aligned bottom-right: query ``j`` at ``p = j + Lk - Lq`` sees key ``t``
            iff ``p - left <= t <= p + right``. Combines with ``is_causal`` and ``attn_mask``.
        scale: score scale, default ``d ** -0.5``.
        impl: a name from :data:`IMPLS_V2`; ``"auto"`` picks ``"cpu_fused"`` on CPU where it can run
            (float32, bfloat16, float16), else ``"sdpa"``. A named strategy that
            cannot run the inputs raises a ValueError with its reasons; nothing falls back.

    A query row that may see no key (all ``False`` or all ``-inf``) returns zeros.

    Returns:
        ``(B, H, Lq, d)`` in q's dtype.
    """
    inputs = _prepare(q, k, v, lam, attn_mask, is_causal, scale, window)
    strategy, _ = REGISTRY_V2.resolve(impl, inputs)
    return strategy(inputs)


def diff_attention_v2_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: float | torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`diff_attention_v2` over packed sequences, in flash-attn's varlen layout.

    Args:
        q: ``(total_q, 2H, d)``; k and v: ``(total_k, Hkv, d)``.
        lam: a float, a 0-dim tensor, an ``(H,)`` tensor or a ``(total_q, H)`` tensor (per token).
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, window, scale, impl:
            as for :func:`~multihead_sdpadiff.diff_attention_varlen` (causal and window aligned
            bottom-right per sequence; a query sees only its own sequence's keys).

    Returns:
        ``(total_q, H, d)`` in q's dtype.
    """
    from . import varlen_inputs

    (q4, k4, v4), cu = varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if isinstance(lam, torch.Tensor) and lam.dim() == 2:
        if tuple(lam.shape) != (q.shape[0], q.shape[1] // 2):
            raise ValueError(f"lam must have shape (), (H,) or (total_q, H)={(q.shape[0], q.shape[1] // 2)}, "
                             f"got {tuple(lam.shape)}")
        lam = lam.transpose(0, 1).unsqueeze(0)  # (1, H, total_q)
    inputs = _prepare(q4, k4, v4, lam, None, is_causal, scale, window, cu)
    strategy, _ = REGISTRY_V2.resolve(impl, inputs)
    return strategy(inputs)[0].transpose(0, 1)  # (total_q, H, d)
