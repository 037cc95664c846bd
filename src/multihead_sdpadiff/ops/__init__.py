"""The differential-attention op and its interchangeable strategies."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..masks import prepare_mask
from . import chunked as _chunked
from . import reference as _reference
from . import sdpa as _sdpa
from .registry import OpInputs, Strategy, get_strategy, register, registered

__all__ = ["AUTO_RULES", "AutoRule", "IMPLS", "diff_attention", "choose_impl", "OpInputs", "Strategy", "get_strategy"]

_log = logging.getLogger(__name__)
_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

register(Strategy("reference", _reference.reference,
                  "materialises A1 - lam*A2, one product with v (the paper's equation)",
                  flops=1.0, score_memory="O(N^2)", dtypes=_FLOAT))
register(Strategy("sdpa_4pass", _sdpa.sdpa_4pass,
                  "original 1: four SDPA calls of width d", flops=2.0, score_memory="O(N)", dtypes=_FLOAT))
register(Strategy("sdpa_2pass", _sdpa.sdpa_2pass,
                  "original 2: two SDPA calls with v of width 2d", flops=1.5, score_memory="O(N)",
                  dtypes=_FLOAT,
                  notes="On CPU, q and k are zero-padded to 2d so SDPA keeps its flash kernel "
                        "(otherwise math, O(N^2)); the padding doubles the QK^T work."))
register(Strategy("sdpa_stacked", _sdpa.sdpa_stacked,
                  "original 3: one SDPA call over 4H heads of width d", flops=2.0, score_memory="O(N)",
                  dtypes=_FLOAT))
register(Strategy("sdpa_paired", _sdpa.sdpa_paired,
                  "original 4: one SDPA call over 2H maps, v repeated to width 2d", flops=1.5,
                  score_memory="O(N)", dtypes=_FLOAT,
                  notes="On CPU, q and k are zero-padded to 2d as for sdpa_2pass."))
register(Strategy("chunked", _chunked.chunked,
                  "exact, one query block at a time: both softmaxes, A1 - lam*A2, one product with v",
                  flops=1.0, score_memory="O(block*N)", dtypes=_FLOAT,
                  notes="Block size: SDPADIFF_CHUNK rows if set, else ~2M score elements per map."))

#: Names accepted by ``impl=``: every registered strategy, plus ``"auto"``.
IMPLS: tuple[str, ...] = (*registered(), "auto")



@dataclass(frozen=True)
class AutoRule:
    """One line of the "auto" table: the first rule that matches and whose strategy can run wins.

    ``None`` fields match anything. ``max_lq`` matches calls with at most that many queries (decode
    steps); ``grad`` matches calls that need (True) or do not need (False) gradients.
    """

    impl: str
    why: str
    device: str | None = None
    max_lq: int | None = None
    grad: bool | None = None

    def matches(self, inputs: OpInputs) -> bool:
        return (
            (self.device is None or self.device == inputs.device.type)
            and (self.max_lq is None or inputs.q.shape[2] <= self.max_lq)
            and (self.grad is None or self.grad == inputs.needs_grad)
        )


# Measured with `sdpadiff bench` and recorded in docs/benchmarks.md. On CPU, chunked costs the
# FLOPs of standard attention and beats every SDPA strategy for prefill and training; for a
# decode step the four width-d SDPA calls are as fast and need no Python loop. On CUDA the SDPA
# strategies stay on fused kernels; sdpa_2pass has the fewest FLOPs of them (not yet measured here).
AUTO_RULES: tuple[AutoRule, ...] = (
    AutoRule("sdpa_4pass", "CPU decode step (Lq <= 16): flash SDPA calls, no block loop", device="cpu", max_lq=16),
    AutoRule("chunked", "CPU: exact at the FLOPs of standard attention, fastest measured", device="cpu"),
    AutoRule("sdpa_2pass", "CUDA: 1.5x FLOPs on fused SDPA kernels, O(N) memory", device="cuda"),
    AutoRule("chunked", "other devices: plain matmul and softmax, O(block * N) memory"),
)


def _prepare(q, k, v, lambda_full, attn_mask, is_causal, scale) -> OpInputs:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    b, h2, lq, d = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if h2 % 2 or h2 == 0:
        raise ValueError(f"q must be (B, 2H, Lq, d) with an even, non-zero number of maps, got {tuple(q.shape)}")
    if k.shape[1] % 2 or k.shape[1] == 0:
        raise ValueError(f"k must be (B, 2Hkv, Lk, d) with an even, non-zero number of maps, got {tuple(k.shape)}")
    h, hkv, lk = h2 // 2, k.shape[1] // 2, k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must be (B={b}, 2Hkv, Lk, d={d}), got {tuple(k.shape)}")
    if h % hkv:
        raise ValueError(f"the {h} heads of q must be a multiple of the {hkv} kv heads of k (q maps {h2}, k maps {2 * hkv})")
    if tuple(v.shape) != (b, hkv, lk, 2 * d):
        raise ValueError(f"v must be (B, Hkv, Lk, 2d)={(b, hkv, lk, 2 * d)} for k of shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if d == 0:
        raise ValueError("head dim d must be positive")

    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if isinstance(lambda_full, bool) or not isinstance(lambda_full, (int, float, torch.Tensor)):
        raise TypeError(f"lambda_full must be a float, a 0-dim tensor or an (H,) tensor, got {type(lambda_full).__name__}")
    if isinstance(lambda_full, torch.Tensor):
        if lambda_full.dim() == 0:
            lam = lambda_full.to(device=q.device, dtype=work).expand(h)
        elif tuple(lambda_full.shape) == (h,):
            lam = lambda_full.to(device=q.device, dtype=work)
        else:
            raise ValueError(f"lambda_full must be 0-dim or (H,)=({h},), got shape {tuple(lambda_full.shape)}")
    else:
        lam = torch.full((h,), float(lambda_full), device=q.device, dtype=work)

    if scale is None:
        scale = d**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")

    mask = prepare_mask(attn_mask, is_causal=is_causal, batch=b, heads=h, lq=lq, lk=lk, dtype=q.dtype)
    return OpInputs(q, k, v, lam, mask, float(scale))


def _resolve(impl: str, inputs: OpInputs) -> tuple[Strategy, str]:
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a str, one of {IMPLS}, got {type(impl).__name__}")
    if impl != "auto":
        strategy = get_strategy(impl)
        reasons = strategy.not_supported_reasons(inputs)
        if reasons:
            raise ValueError(f"impl={impl!r} cannot run these inputs: " + "; ".join(reasons))
        return strategy, f"requested impl={impl!r}"
    refused = []
    for rule in AUTO_RULES:
        if not rule.matches(inputs):
            continue
        strategy = get_strategy(rule.impl)
        reasons = strategy.not_supported_reasons(inputs)
        if not reasons:
            return strategy, f"auto: {rule.why}"
        refused.append(f"{rule.impl}: {'; '.join(reasons)}")
    raise ValueError("impl='auto' found no strategy for these inputs: " + " | ".join(refused))


def diff_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_full: float | torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Differential attention: ``(softmax(q1 k1ᵀ·scale + M) − λ·softmax(q2 k2ᵀ·scale + M)) · v``.

    Args:
        q: ``(B, 2H, Lq, d)``. Maps ``2i`` and ``2i+1`` are the two maps of differential head ``i``.
        k: ``(B, 2Hkv, Lk, d)``, ``H`` a multiple of ``Hkv``.
        v: ``(B, Hkv, Lk, 2d)``.
        lambda_full: λ, a float, a 0-dim tensor or an ``(H,)`` tensor (one per head). Gradients flow
            into a tensor λ. The subtraction is done in float32 or wider.
        attn_mask: ``None``, bool (``True`` = may attend) or floating (added to the scaled scores),
            broadcastable to ``(B, H, Lq, Lk)``: for example ``(Lq, Lk)``, ``(B, 1, Lq, Lk)``,
            ``(B, 1, 1, Lk)`` or ``(B, H, Lq, Lk)``. Both maps of a head share it.
        is_causal: also apply the causal mask, aligned bottom-right: query ``j`` sees keys
            ``t <= j + Lk - Lq`` (right for a KV cache or chunked prefill; SDPA's own flag is
            top-left). Lq = 1 sees every key.
        scale: score scale, default ``d ** -0.5``.
        impl: a name from :data:`IMPLS`. ``"auto"`` takes the first matching rule of
            :data:`AUTO_RULES` whose strategy can run the inputs; :func:`choose_impl` says which and
            why, and the logger ``multihead_sdpadiff.ops`` logs it at DEBUG level.
            A named strategy that cannot run the inputs raises a ValueError with its reasons; no
            strategy ever falls back to another.

    GQA: head ``i`` uses group ``g = i // (H / Hkv)``: k maps ``2g`` and ``2g+1`` and v head ``g``
    (unilm's flash pairing, that of trained checkpoints).

    A query row that may see no key (all ``False`` or all ``-inf``) returns zeros.

    Returns:
        ``(B, H, Lq, 2d)`` in q's dtype.
    """
    inputs = _prepare(q, k, v, lambda_full, attn_mask, is_causal, scale)
    strategy, why = _resolve(impl, inputs)
    if impl == "auto" and _log.isEnabledFor(logging.DEBUG):
        _log.debug("diff_attention ran %s (%s) for q %s", strategy.name, why, tuple(q.shape))
    return strategy(inputs)


def choose_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_full: float | torch.Tensor = 0.5,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    impl: str = "auto",
) -> tuple[str, str]:
    """The strategy :func:`diff_attention` would run for these inputs, and why: ``(name, reason)``."""
    strategy, why = _resolve(impl, _prepare(q, k, v, lambda_full, attn_mask, is_causal, scale))
    return strategy.name, why
