"""The differential-attention op and its interchangeable strategies."""

from __future__ import annotations

import logging

import torch

from ..masks import check_cu_seqlens, prepare_mask
from . import chunked as _chunked
from . import cpu_fused as _cpu_fused
from . import reference as _reference
from . import sdpa as _sdpa
from . import triton_fused as _triton_fused
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

__all__ = [
    "AUTO_RULES", "AutoRule", "IMPLS", "REGISTRY", "OpInputs", "Strategy", "choose_impl", "diff_attention",
    "diff_attention_varlen", "get_strategy",
]

_log = logging.getLogger(__name__)

def _per_sequence(fn):
    """``fn`` run once per packed sequence (see :func:`.sdpa.per_sequence`)."""
    def run(q, k, v, lam, mask, scale):
        return _sdpa.per_sequence(fn, q, k, v, lam, mask, scale)
    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


#: The strategies of :func:`diff_attention`.
REGISTRY = Registry("diff_attention")
register = REGISTRY.register
get_strategy = REGISTRY.get

register(Strategy("reference", _reference.reference,
                  "materialises A1 - lam*A2, one product with v (the paper's equation)",
                  flops=1.0, score_memory="O(N^2)", dtypes=_FLOAT))
register(Strategy("sdpa_4pass", _per_sequence(_sdpa.sdpa_4pass),
                  "original 1: four SDPA calls of width d", flops=2.0, score_memory="O(N)", dtypes=_FLOAT))
register(Strategy("sdpa_2pass", _per_sequence(_sdpa.sdpa_2pass),
                  "original 2: two SDPA calls with v of width 2d", flops=1.5, score_memory="O(N)",
                  dtypes=_FLOAT,
                  notes="On CPU, q and k are zero-padded to 2d so SDPA keeps its flash kernel "
                        "(otherwise math, O(N^2)); the padding doubles the QK^T work."))
register(Strategy("sdpa_stacked", _per_sequence(_sdpa.sdpa_stacked),
                  "original 3: one SDPA call over 4H heads of width d", flops=2.0, score_memory="O(N)",
                  dtypes=_FLOAT))
register(Strategy("sdpa_paired", _per_sequence(_sdpa.sdpa_paired),
                  "original 4: one SDPA call over 2H maps, v repeated to width 2d", flops=1.5,
                  score_memory="O(N)", dtypes=_FLOAT,
                  notes="On CPU, q and k are zero-padded to 2d as for sdpa_2pass."))
def _mask_needs_no_grad(inputs: OpInputs) -> list[str]:
    return mask_needs_no_grad(inputs, "use reference or an sdpa_* strategy for a learnable bias")


register(Strategy("chunked", _chunked.chunked,
                  "exact, one query block at a time: both softmaxes, A1 - lam*A2, one product with v",
                  flops=1.0, score_memory="O(block*N)", dtypes=_FLOAT,
                  check=_mask_needs_no_grad,
                  notes="Block size: SDPADIFF_CHUNK rows if set, else ~2M score elements per map."))


def _cpu_fused_reasons(inputs: OpInputs) -> list[str]:
    return _mask_needs_no_grad(inputs) + _cpu_fused.not_supported_reasons()


register(Strategy("cpu_fused", _cpu_fused.cpu_fused,
                  "fused C++ CPU kernel: both maps' scores by GEMM per key tile, A1 - lam*A2 per tile, "
                  "one product with v; recomputing backward",
                  flops=1.0, score_memory="O(block*N)", devices=frozenset({"cpu"}), dtypes=_cpu_fused.DTYPES,
                  check=_cpu_fused_reasons,
                  notes="Compiled on first use with torch.utils.cpp_extension (C++ compiler and ninja needed; "
                        "`sdpadiff build` compiles ahead of time). float64 stays on chunked."))


def _run_triton(q, k, v, lam, mask, scale):
    return _triton_fused.triton_diff_attention(q, k, v, lam, mask.tensor, mask.causal, scale,
                                               row_bounds=mask.row_bounds(q.device))


register(Strategy("triton", _run_triton,
                  "fused Triton kernel: two online softmaxes, each K/V tile read once, forward and backward",
                  flops=1.5, score_memory="O(N)",
                  check=lambda i: _mask_needs_no_grad(i) + _triton_fused.triton_not_supported_reasons(
                      i.q, i.k, i.v, i.lam, i.mask.tensor, i.mask.causal),
                  notes="NVIDIA GPUs of compute capability >= 8.0 with the triton extra; on CPU only under "
                        "TRITON_INTERPRET=1 (slow, for tests). Head dims 16, 32, 64, 128. The torch ops "
                        "sdpadiff::triton_fwd/triton_bwd, defined on first use: torch.library.triton_op with "
                        "compiled kernels, torch.library.custom_op under the interpreter; both compile with "
                        "fullgraph=True."))

#: Names accepted by ``impl=``: every registered strategy, plus ``"auto"``.
IMPLS: tuple[str, ...] = REGISTRY.names()

# Measured with `sdpadiff bench` and recorded in docs/benchmarks.md. On CPU, cpu_fused costs the
# FLOPs of standard attention in one compiled kernel (prefill, training and decode, also under
# torch.compile); chunked is the same math in PyTorch ops (float64, or no C++ compiler). For a
# decode step without cpu_fused the four width-d SDPA calls need no Python loop. On CUDA the SDPA
# strategies stay on fused kernels; sdpa_2pass has the fewest FLOPs of them (not yet measured here).
REGISTRY.rules = AUTO_RULES = (
    AutoRule("cpu_fused", "CPU: fused C++ kernel at the FLOPs of standard attention, fastest measured",
             device="cpu"),
    AutoRule("sdpa_4pass", "CPU decode step (Lq <= 16) without cpu_fused: flash SDPA calls, no block loop",
             device="cpu", max_lq=16),
    AutoRule("chunked", "CPU without cpu_fused (float64, no C++ compiler): exact at the FLOPs of standard "
             "attention", device="cpu"),
    AutoRule("sdpa_4pass", "CPU where chunked refuses (a mask that needs a gradient): flash SDPA calls",
             device="cpu"),
    AutoRule("triton", "CUDA: one fused kernel at 1.5x FLOPs, O(N) memory", device="cuda"),
    AutoRule("sdpa_2pass", "CUDA without triton: 1.5x FLOPs on fused SDPA kernels, O(N) memory", device="cuda"),
    AutoRule("chunked", "other devices: plain matmul and softmax, O(block * N) memory"),
)


def _prepare(q, k, v, lambda_full, attn_mask, is_causal, scale, window=None, cu=None) -> OpInputs:
    check_qkv(q, k, v)
    b, h2, lq, d = q.shape
    if k.shape[1] % 2 or k.shape[1] == 0:
        raise ValueError(f"k must be (B, 2Hkv, Lk, d) with an even, non-zero number of maps, got {tuple(k.shape)}")
    h, hkv, lk = h2 // 2, k.shape[1] // 2, k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must be (B={b}, 2Hkv, Lk, d={d}), got {tuple(k.shape)}")
    if h % hkv:
        raise ValueError(f"the {h} heads of q must be a multiple of the {hkv} kv heads of k (q maps {h2}, k maps {2 * hkv})")
    if tuple(v.shape) != (b, hkv, lk, 2 * d):
        raise ValueError(f"v must be (B, Hkv, Lk, 2d)={(b, hkv, lk, 2 * d)} for k of shape {tuple(k.shape)}, got {tuple(v.shape)}")

    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if isinstance(lambda_full, bool) or not isinstance(lambda_full, (int, float, torch.Tensor)):
        raise TypeError(f"lambda_full must be a float, a 0-dim tensor or an (H,) tensor, got {type(lambda_full).__name__}")
    if isinstance(lambda_full, torch.Tensor):
        check_lam_tensor("lambda_full", lambda_full, q.device)
        if lambda_full.dim() == 0:
            lam = lambda_full.to(device=q.device, dtype=work).expand(h)
        elif tuple(lambda_full.shape) == (h,):
            lam = lambda_full if lambda_full.dtype == work else lambda_full.to(dtype=work)  # on q's device (checked)
        else:
            raise ValueError(f"lambda_full must be 0-dim or (H,)=({h},), got shape {tuple(lambda_full.shape)}")
    else:
        lam = torch.full((h,), float(lambda_full), device=q.device, dtype=work)

    scale = check_scale(scale, d)
    cu_q, cu_k = cu if cu is not None else (None, None)
    mask = prepare_mask(attn_mask, is_causal=is_causal, batch=b, heads=h, lq=lq, lk=lk, dtype=q.dtype, device=q.device,
                        window=window, cu_q=cu_q, cu_k=cu_k)
    return OpInputs(q, k, v, lam, mask, scale)


def diff_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_full: float | torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    window: tuple[int, int] | None = None,
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
        window: ``(left, right)``, flash-attn's ``window_size``; ``-1`` is unbounded, ``None`` is
            ``(-1, -1)``. Aligned bottom-right like ``is_causal``: query ``j`` at position
            ``p = j + Lk - Lq`` sees key ``t`` iff ``p - left <= t <= p + right``. Combines with
            ``is_causal`` and ``attn_mask``. transformers' ``sliding_window = W`` is ``(W - 1, 0)``.
            ``chunked`` and ``triton`` skip key blocks outside the band (cost O(Lq * window)).
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
    inputs = _prepare(q, k, v, lambda_full, attn_mask, is_causal, scale, window)
    strategy, why = REGISTRY.resolve(impl, inputs)
    if impl == "auto" and not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG):
        _log.debug("diff_attention ran %s (%s) for q %s", strategy.name, why, tuple(q.shape))
    return strategy(inputs)


def check_max_seqlen(value, name: str, cu: tuple[int, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    longest = max(b - a for a, b in zip(cu, cu[1:], strict=False))
    if value < longest:
        raise ValueError(f"{name} {value} is smaller than the longest sequence ({longest})")


def varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Check the packed ``(total, heads, width)`` tensors and ``cu_seqlens``; return the op's
    ``(1, heads, total, width)`` views and the boundaries as Python ints."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, heads, width) as flash-attn's varlen layout, "
                             f"got shape {tuple(t.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same total_k, got {k.shape[0]} and {v.shape[0]}")
    cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {len(cu_q)} and {len(cu_k)}")
    check_max_seqlen(max_seqlen_q, "max_seqlen_q", cu_q)
    check_max_seqlen(max_seqlen_k, "max_seqlen_k", cu_k)
    views = tuple(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, total, width)
    return views, (cu_q, cu_k)


def diff_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_full: float | torch.Tensor,
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
    """:func:`diff_attention` over packed sequences, in flash-attn's varlen layout.

    Args:
        q: ``(total_q, 2H, d)``: the sequences' queries one after the other.
        k: ``(total_k, 2Hkv, d)``.
        v: ``(total_k, Hkv, 2d)``.
        lambda_full: as for :func:`diff_attention`.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` on q's device: sequence ``s`` holds
            queries ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and keys ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``.
            They start at 0, never decrease and end at ``total_q`` / ``total_k``.
        max_seqlen_q, max_seqlen_k: at least the longest sequence (flash-attn's arguments; checked).
        is_causal: the causal mask per sequence, aligned bottom-right (flash-attn >= 2.1): query
            ``j`` of a sequence with ``Lq_s`` queries and ``Lk_s`` keys sees its keys
            ``t <= j + Lk_s - Lq_s``.
        window: ``(left, right)`` per sequence, aligned the same way (see :func:`diff_attention`).
        scale, impl: as for :func:`diff_attention`.

    A query sees only the keys of its own sequence. The op runs as one row (B = 1) with per-row
    key intervals: ``chunked`` and ``triton`` skip every key block outside them, so the cost is
    that of the visible pairs; the ``sdpa_*`` strategies make one SDPA call per sequence.

    Returns:
        ``(total_q, H, 2d)`` in q's dtype.
    """
    (q4, k4, v4), cu = varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    inputs = _prepare(q4, k4, v4, lambda_full, None, is_causal, scale, window, cu)
    strategy, why = REGISTRY.resolve(impl, inputs)
    return strategy(inputs)[0].transpose(0, 1)  # (total_q, H, 2d)


def choose_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_full: float | torch.Tensor = 0.5,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> tuple[str, str]:
    """The strategy :func:`diff_attention` would run for these inputs, and why: ``(name, reason)``."""
    strategy, why = REGISTRY.resolve(impl, _prepare(q, k, v, lambda_full, attn_mask, is_causal, scale, window))
    return strategy.name, why
