"""The differential-attention op and its interchangeable strategies."""

from __future__ import annotations

import logging

import torch

from ..masks import prepare_mask
from . import chunked as _chunked
from . import cpu_fused as _cpu_fused
from . import reference as _reference
from . import sdpa as _sdpa
from . import triton_fused as _triton_fused
from .registry import FLOAT_DTYPES as _FLOAT
from .registry import AutoRule, OpInputs, Registry, Strategy, check_lam_tensor, check_qkv, check_scale

__all__ = [
    "AUTO_RULES", "AutoRule", "IMPLS", "REGISTRY", "OpInputs", "Strategy", "choose_impl", "diff_attention", "get_strategy",
]

_log = logging.getLogger(__name__)

#: The strategies of :func:`diff_attention`.
REGISTRY = Registry("diff_attention")
register = REGISTRY.register
get_strategy = REGISTRY.get

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
def _mask_needs_no_grad(inputs: OpInputs) -> list[str]:
    m = inputs.mask.tensor
    if m is not None and m.requires_grad and torch.is_grad_enabled():
        return ["attn_mask requires grad and this strategy gives the mask no gradient "
                "(use reference or an sdpa_* strategy for a learnable bias)"]
    return []


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
    return _triton_fused.triton_diff_attention(q, k, v, lam, mask.tensor, mask.causal, scale)


register(Strategy("triton", _run_triton,
                  "fused Triton kernel: two online softmaxes, each K/V tile read once, forward and backward",
                  flops=1.5, score_memory="O(N)", compilable=False,
                  check=lambda i: _mask_needs_no_grad(i) + _triton_fused.triton_not_supported_reasons(
                      i.q, i.k, i.v, i.lam, i.mask.tensor, i.mask.causal),
                  notes="NVIDIA GPUs of compute capability >= 8.0 with the triton extra; on CPU only under "
                        "TRITON_INTERPRET=1 (slow, for tests). Head dims 16, 32, 64, 128."))

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


def _prepare(q, k, v, lambda_full, attn_mask, is_causal, scale) -> OpInputs:
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
            lam = lambda_full.to(device=q.device, dtype=work)
        else:
            raise ValueError(f"lambda_full must be 0-dim or (H,)=({h},), got shape {tuple(lambda_full.shape)}")
    else:
        lam = torch.full((h,), float(lambda_full), device=q.device, dtype=work)

    scale = check_scale(scale, d)
    mask = prepare_mask(attn_mask, is_causal=is_causal, batch=b, heads=h, lq=lq, lk=lk, dtype=q.dtype, device=q.device)
    return OpInputs(q, k, v, lam, mask, scale)


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
    strategy, why = REGISTRY.resolve(impl, inputs)
    if impl == "auto" and not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG):
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
    strategy, why = REGISTRY.resolve(impl, _prepare(q, k, v, lambda_full, attn_mask, is_causal, scale))
    return strategy.name, why
