"""Fused Triton implementation of differential attention (forward + backward).

Differential attention (Ye et al., "Differential Transformer", arXiv 2410.05258):

    O[:, i] = softmax(q1 k1^T * scale + M) v  -  lam[i] * softmax(q2 k2^T * scale + M) v

with q1 = q[:, 2i], q2 = q[:, 2i+1], k1 = k[:, 2g], k2 = k[:, 2g+1], v = v[:, g] and
g = i // (H // Hkv) (grouped-query attention).

Public entry points:

    triton_not_supported_reasons(q, k, v, lam, attn_mask, is_causal) -> list[str]
    triton_diff_attention(q, k, v, lam, attn_mask, is_causal, scale) -> Tensor

Triton itself is imported lazily (only when a kernel is launched), so importing
this module never requires triton.

The kernels run through two torch ops, ``sdpadiff::triton_fwd`` and
``sdpadiff::triton_bwd`` (schemas in the section "the torch ops" below), defined
on first use with fake implementations and an autograd formula, so that
``torch.compile(fullgraph=True)`` traces the strategy with no graph break. With
compiled kernels they are ``torch.library.triton_op`` ops (the compiled graph
holds the kernels); under TRITON_INTERPRET=1 they are ``torch.library.custom_op``
ops (one opaque node), because torch cannot trace interpreted kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import struct
import threading

import torch

__all__ = ["triton_diff_attention", "triton_not_supported_reasons"]

_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOG2E = 1.4426950408889634

# Block-size overrides, mainly for tests and tuning: maps a kernel name
# ("fwd", "bwd_kv", "bwd_q", "bwd_pre") to a dict with any of the keys
# BLOCK_M, BLOCK_N, num_warps, num_stages.
CONFIG_OVERRIDE: dict[str, dict] = {}

_kernels_module = None


def _kernels():
    """Import (once) the private module holding the @triton.jit kernels."""
    global _kernels_module
    if _kernels_module is None:
        if __package__:
            _kernels_module = importlib.import_module(f"{__package__}._triton_kernels")
        else:
            _kernels_module = importlib.import_module("_triton_kernels")
    return _kernels_module


def _constant_under_compile(fn):
    """Mark ``fn`` as :func:`torch.compiler.assume_constant_result` does: torch.compile calls it
    (as plain Python) while tracing and keeps its result as a constant; eager calls are unchanged.

    The public decorator imports ``torch._dynamo``, which imports triton, and importing this module
    must not import triton; so this sets the decorator's marker attribute (``_dynamo_marked_constant``
    in torch 2.13) itself. tests/ops/test_triton_ops.py checks that the marker is still the one
    torch uses.
    """
    fn._dynamo_marked_constant = True
    return fn


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------
# support check
# ---------------------------------------------------------------------------

_NOT_INSTALLED = "triton is not installed"


@_constant_under_compile
def _environment_reasons(device_type: str, device_index: int | None) -> tuple[str, ...]:
    """Why this process cannot launch the kernel on that device: triton missing, CPU tensors
    without the interpreter, an NVIDIA GPU below compute capability 8.0, another device type.

    Marked as a constant result: torch.compile calls it once while tracing (it reads the
    environment and the installed packages, which dynamo cannot trace) and keeps the answer.
    """
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append(_NOT_INSTALLED)
    if device_type == "cpu":
        if not _interpreted():
            reasons.append("tensors are on the CPU and TRITON_INTERPRET is not '1' "
                           "(the Triton kernel needs a GPU or the interpreter)")
    elif device_type == "cuda":
        if not _interpreted() and torch.version.hip is None:
            major, minor = torch.cuda.get_device_capability(device_index)
            if major < 8:
                reasons.append(f"the Triton kernel needs an NVIDIA GPU of compute capability "
                               f">= 8.0, got {major}.{minor}")
    else:
        reasons.append(f"device type {device_type!r} is not supported by the Triton kernel")
    return tuple(reasons)


def triton_not_supported_reasons(q, k, v, lam, attn_mask, is_causal) -> list[str]:
    """Human-readable reasons why the Triton kernel cannot run these inputs.

    An empty list means the inputs are supported.  Never imports triton.
    """
    tensors = {"q": q, "k": k, "v": v, "lam": lam}
    if attn_mask is not None:
        tensors["attn_mask"] = attn_mask
    not_tensors = [f"{name} is not a torch.Tensor" for name, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if not_tensors:
        return ([_NOT_INSTALLED] if importlib.util.find_spec("triton") is None else []) + not_tensors

    # installation and devices
    env = _environment_reasons(q.device.type, q.device.index)
    reasons: list[str] = [r for r in env if r == _NOT_INSTALLED]
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        reasons.append(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    reasons.extend(r for r in env if r != _NOT_INSTALLED)

    # dtypes
    if q.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"unsupported dtype {q.dtype} (supported: float16, bfloat16, float32, float64)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not lam.is_floating_point():
        reasons.append(f"lam must be a floating tensor, got {lam.dtype}")

    # shapes
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        reasons.append("q, k, v must be 4-D: (B, 2H, Lq, d), (B, 2Hkv, Lk, d), (B, Hkv, Lk, 2d)")
        return reasons
    B, H2, Lq, d = q.shape
    Bk, Hk2, Lk, dk = k.shape
    Bv, Hv, Lv, dv = v.shape
    if H2 % 2 or Hk2 % 2:
        reasons.append(f"q and k need an even number of maps, got {H2} and {Hk2}")
    H, Hkv = H2 // 2, Hk2 // 2
    if Bk != B or Bv != B:
        reasons.append(f"batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Lv != Lk:
        reasons.append(f"k and v lengths differ: {Lk} vs {Lv}")
    if dk != d:
        reasons.append(f"q and k head dims differ: {d} vs {dk}")
    if dv != 2 * d:
        reasons.append(f"v head dim must be 2*d = {2 * d}, got {dv}")
    if Hv != Hkv:
        reasons.append(f"v must have Hkv = {Hkv} heads (k has {Hk2} maps), got {Hv}")
    if Hkv == 0 or H % max(Hkv, 1) != 0:
        reasons.append(f"number of heads H = {H} is not a multiple of Hkv = {Hkv}")
    if d not in _SUPPORTED_HEAD_DIMS:
        reasons.append(f"head dim d = {d} not supported by the Triton kernel "
                       f"(supported: {', '.join(map(str, _SUPPORTED_HEAD_DIMS))})")
    if tuple(lam.shape) != (H,):
        reasons.append(f"lam must have shape (H,) = ({H},), got {tuple(lam.shape)}")

    # mask
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            reasons.append(f"attn_mask must be bool or of q's dtype {q.dtype}, got {attn_mask.dtype}")
        if attn_mask.dim() > 4:
            reasons.append(f"attn_mask must have at most 4 dims, got {attn_mask.dim()}")
        else:
            shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
            for n, (s, full) in enumerate(zip(shape, (B, H, Lq, Lk), strict=True)):
                if s not in (1, full):
                    reasons.append(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                                   f"to (B, H, Lq, Lk) = {(B, H, Lq, Lk)} (dim {n})")
                    break
    if not isinstance(is_causal, bool):
        reasons.append(f"is_causal must be a bool, got {type(is_causal).__name__}")
    return reasons


# ---------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------

def _split_f32(x: float) -> tuple[float, float]:
    """x as hi + lo with both parts representable in float32.

    Triton passes Python floats as float32; the float64 path rebuilds the exact
    constant in-kernel from the two halves.
    """
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def _config(kind: str, d: int, dtype: torch.dtype) -> dict:
    if _interpreted():
        cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    else:
        wide = dtype in (torch.float32, torch.float64)  # 4/8-byte operands
        if kind == "fwd":
            if wide:
                cfg = dict(BLOCK_M=64 if d <= 64 else 32, BLOCK_N=32, num_warps=4, num_stages=1)
            elif d <= 64:
                cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
            else:
                cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
        elif kind == "bwd_kv":
            if wide:
                cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
            elif d <= 64:
                cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
            else:
                cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
        elif kind == "bwd_q":
            if wide:
                cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
            elif d <= 64:
                cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
            else:
                cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        else:  # bwd_pre
            cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    cfg.update(CONFIG_OVERRIDE.get(kind, {}))
    return cfg


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common_consts(q: torch.Tensor, scale: float):
    import triton.language as tl

    fp64 = q.dtype == torch.float64
    exp2 = not fp64
    qk_hi, qk_lo = _split_f32(scale * _LOG2E if exp2 else scale)
    sm_hi, sm_lo = _split_f32(scale)
    return dict(
        qk=(qk_hi, qk_lo), sm=(sm_hi, sm_lo),
        mask_scale=_LOG2E if exp2 else 1.0,
        EXP2=exp2,
        ACC=tl.float64 if fp64 else tl.float32,
        DOT_PREC="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
        # interpreter workaround only: its tl.dot mishandles bfloat16 operands
        UPCAST=_interpreted() and q.dtype == torch.bfloat16,
    )


def _mask_args(attn_mask, q, B, H, Lq, Lk):
    """(tensor, strides, HAS_MASK, MASK_BOOL); broadcast dims get stride 0."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), False, False
    m = attn_mask.expand(B, H, Lq, Lk)
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.view(torch.uint8)
    return m, tuple(m.stride()), True, is_bool


def default_row_bounds(lq: int, lk: int, is_causal: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` of the bottom-right causal mask (or every key), int32 ``(Lq,)``."""
    p = torch.arange(lq, device=device, dtype=torch.int64) + (lk - lq)
    hi = (p + 1).clamp(0, lk) if is_causal else torch.full_like(p, lk)
    return torch.zeros_like(p).to(torch.int32), hi.to(torch.int32)


def _kv_tile_table(lo, hi, lq, lk, block_m, block_n) -> torch.Tensor:
    """Per key tile, the query tile starts ``(m_begin, m_fs, m_fe, m_end)`` (see the dk/dv kernel).

    Rows ``[jstart, jend)`` may see a key of tile ``[n0, n0 + BLOCK_N)``; rows in ``[A, Bq)`` see all
    of them (bounds are non-decreasing, so both sets are contiguous and found by binary search).
    """
    lo, hi = lo.to(torch.int64), hi.to(torch.int64)
    n0 = torch.arange(0, lk, block_n, device=lo.device, dtype=torch.int64)
    n1 = (n0 + block_n).clamp(max=lk)
    jstart = torch.searchsorted(hi, n0, right=True)   # first row with hi > n0
    jend = torch.searchsorted(lo, n1, right=False)    # first row with lo >= n1
    first_full = torch.searchsorted(hi, n0 + block_n, right=False)  # first row with hi >= n0 + BLOCK_N
    last_full = torch.searchsorted(lo, n0, right=True)  # first row with lo > n0
    begin = jstart // block_m * block_m
    end = torch.maximum((jend + block_m - 1) // block_m * block_m, begin)
    fs = torch.minimum(torch.maximum((first_full + block_m - 1) // block_m * block_m, begin), end)
    fe = torch.minimum(torch.maximum(last_full // block_m * block_m, fs), end)
    fe = torch.where(n0 + block_n > lk, fs, fe)  # a tile that crosses the end is never full
    return torch.stack((begin, fs, fe, end), dim=1).to(torch.int32).contiguous()  # (n_tiles, 4)


def _module_kernels() -> dict:
    """The kernels by name ("fwd", "bwd_pre", "bwd_kv", "bwd_q"), as they are (eager launches)."""
    K = _kernels()
    return {"fwd": K.diff_attn_fwd_kernel, "bwd_pre": K.diff_attn_bwd_pre_kernel,
            "bwd_kv": K.diff_attn_bwd_kv_kernel, "bwd_q": K.diff_attn_bwd_q_kernel}


def _fwd_outputs(q, store_aux: bool):
    """``(out, o2, lse)`` allocated for the forward: ``out`` and ``o2`` ``(B, H, Lq, 2d)`` in q's
    dtype, ``lse`` ``(B, H, 2, Lq)`` in the accumulation dtype (float32, float64 for float64).
    Without ``store_aux``, ``o2`` and ``lse`` are empty ``(0,)`` tensors. Also the fake forward."""
    B, H2, Lq, d = q.shape
    acc = _acc_dtype(q.dtype)
    out = q.new_empty((B, H2 // 2, Lq, 2 * d))
    if not store_aux:
        return out, q.new_empty((0,)), q.new_empty((0,), dtype=acc)
    return out, torch.empty_like(out), q.new_empty((B, H2 // 2, 2, Lq), dtype=acc)


def _bwd_outputs(q, k, v, lam, need_q: bool, need_kv: bool):
    """``(dq, dk, dv, dlam)``: contiguous zeros shaped like q, k, v, lam (the kernels write
    contiguous gradients whatever the inputs' strides); a gradient that is not needed (``need_q`` /
    ``need_kv`` False) is an empty ``(0,)`` tensor. Also the fake backward."""
    return (q.new_zeros(q.shape) if need_q else q.new_empty((0,)),
            k.new_zeros(k.shape) if need_kv else k.new_empty((0,)),
            v.new_zeros(v.shape) if need_kv else v.new_empty((0,)),
            lam.new_zeros(lam.shape))


def _forward(q, k, v, lam, attn_mask, bounds, scale, store_aux, kernels=None):
    """``(out, o2, lse)`` (see :func:`_fwd_outputs`). ``kernels``: what to launch by name, default
    :func:`_module_kernels` (the ops pass them wrapped by ``torch.library.wrap_triton``)."""
    B, H2, Lq, d = q.shape
    Hk2, Lk = k.shape[1], k.shape[2]
    H, Hkv = H2 // 2, Hk2 // 2
    out, o2, lse = _fwd_outputs(q, store_aux)
    if out.numel() == 0:
        return out, o2, lse
    if Lk == 0:  # nothing to attend to: all rows are empty
        out.zero_()
        if store_aux:
            o2.zero_()
            lse.fill_(math.inf)
        return out, o2, lse

    import triton

    K = kernels or _module_kernels()
    c = _common_consts(q, scale)
    mask, ms, has_mask, mask_bool = _mask_args(attn_mask, q, B, H, Lq, Lk)
    cfg = _config("fwd", d, q.dtype)
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    lo, hi = bounds
    # Without STORE_AUX the kernel never touches O2 and LSE (empty tensors here, never aliases
    # of out, so that a traced graph sees exactly which buffers the kernel writes).
    K["fwd"][grid](
        q, k, v, lam, mask, lo, hi, out, o2, lse,
        *q.stride(), *k.stride(), *v.stride(), *ms,
        H, H // Hkv, Lq, Lk,
        c["qk"][0], c["qk"][1], c["mask_scale"],
        D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_MASK=has_mask, MASK_BOOL=mask_bool,
        STORE_AUX=bool(store_aux), EXP2=c["EXP2"], ACC=c["ACC"], DOT_PREC=c["DOT_PREC"],
        UPCAST=c["UPCAST"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, o2, lse


def _backward(dout, q, k, v, lam, attn_mask, bounds, scale, out, o2, lse, need_q, need_kv, kernels=None):
    """``(dq, dk, dv, dlam)`` (see :func:`_bwd_outputs`); dlam is always computed (a row sum).
    ``kernels`` as for :func:`_forward`."""
    B, H2, Lq, d = q.shape
    Hk2, Lk = k.shape[1], k.shape[2]
    H, Hkv = H2 // 2, Hk2 // 2
    acc = _acc_dtype(q.dtype)
    dq, dk, dv, dlam = _bwd_outputs(q, k, v, lam, need_q, need_kv)
    if out.numel() == 0 or Lk == 0:
        return dq, dk, dv, dlam

    import triton

    K = kernels or _module_kernels()
    c = _common_consts(q, scale)
    mask, ms, has_mask, mask_bool = _mask_args(attn_mask, q, B, H, Lq, Lk)
    lo, hi = bounds
    common = dict(D=d, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
                  EXP2=c["EXP2"], ACC=c["ACC"], DOT_PREC=c["DOT_PREC"], UPCAST=c["UPCAST"])

    # Row terms D1, D2 (see the kernel's docstring).
    delta = torch.empty((B, H, 2, Lq), device=q.device, dtype=acc)
    cfg = _config("bwd_pre", d, q.dtype)
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    K["bwd_pre"][grid](
        out, o2, dout, lam, delta, *dout.stride(), H, Lq,
        D=d, BLOCK_M=cfg["BLOCK_M"], ACC=c["ACC"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # dL/dlam[i] = -sum(dO * O2) over batch, rows and columns of head i.
    dlam = (-delta[:, :, 1, :].sum(dim=(0, 2))).to(lam.dtype)

    scalars = (c["qk"][0], c["qk"][1], c["sm"][0], c["sm"][1], c["mask_scale"])
    if need_kv:
        cfg = _config("bwd_kv", d, q.dtype)
        grid = (triton.cdiv(Lk, cfg["BLOCK_N"]), B * Hkv)
        table = _kv_tile_table(lo, hi, Lq, Lk, cfg["BLOCK_M"], cfg["BLOCK_N"])
        K["bwd_kv"][grid](
            q, k, v, lam, mask, lo, hi, table, dout, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *ms, *dout.stride(),
            H, Hkv, H // Hkv, Lq, Lk, *scalars,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    if need_q:
        cfg = _config("bwd_q", d, q.dtype)
        grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
        K["bwd_q"][grid](
            q, k, v, lam, mask, lo, hi, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *ms, *dout.stride(),
            H, H // Hkv, Lq, Lk, *scalars,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return dq, dk, dv, dlam


# ---------------------------------------------------------------------------
# the torch ops
# ---------------------------------------------------------------------------
#
# sdpadiff::triton_fwd(q, k, v, lam, mask?, lo, hi, scale, store_aux) -> (out, o2, lse)
#     lam (H,) in the accumulation dtype; mask None, bool or q's dtype, broadcastable to
#     (B, H, Lq, Lk); lo, hi int32 (Lq,) row intervals. out and o2 (map 2's normalised output)
#     are (B, H, Lq, 2d) in q's dtype, lse (B, H, 2, Lq) per map in the accumulation dtype;
#     with store_aux=False, o2 and lse are empty (0,) tensors and the op cannot be differentiated.
# sdpadiff::triton_bwd(dout, q, k, v, lam, mask?, lo, hi, out, o2, lse, scale, need_q, need_kv)
#     -> (dq, dk, dv, dlam), shaped like q, k, v, lam; dq (need_q=False) or dk and dv
#     (need_kv=False) are empty (0,) tensors when not needed.
#
# They are defined on first use (:func:`_register_ops`): defining them needs triton, and importing
# this module must not import it. With compiled kernels (a GPU) they are ``torch.library.triton_op``
# ops whose kernels are launched through ``torch.library.wrap_triton``: under torch.compile the
# graph holds the kernels themselves (Inductor compiles them with the rest), torch.export keeps
# each op as one node, and the fake implementation is the op's own function run on fake tensors
# (the wrapped launches do nothing there). Under TRITON_INTERPRET=1 ``@triton.jit`` returns
# interpreted kernels, which ``wrap_triton`` hands back unwrapped (torch cannot trace them: they
# read the tensors' memory), so there the same functions are registered with
# ``torch.library.custom_op`` instead, with the allocation helpers above as fake implementations:
# an opaque op, one graph node under torch.compile. Both forms share the schema, the functions
# and the autograd formula below.

_ops_lock = threading.Lock()
_ops_kind: str | None = None  # "triton_op" or "custom_op" once the ops are defined


def _fwd_fake(q, k, v, lam, mask, lo, hi, scale, store_aux):
    return _fwd_outputs(q, store_aux)


def _bwd_fake(dout, q, k, v, lam, mask, lo, hi, out, o2, lse, scale, need_q, need_kv):
    return _bwd_outputs(q, k, v, lam, need_q, need_kv)


def _setup_context(ctx, inputs, output):
    q, k, v, lam, mask, lo, hi, scale, store_aux = inputs
    out, o2, lse = output
    ctx.save_for_backward(q, k, v, lam, lo, hi, out, o2, lse, *(() if mask is None else (mask,)))
    ctx.has_mask, ctx.scale, ctx.store_aux = mask is not None, scale, store_aux


def _autograd_backward(ctx, dout, _grad_o2, _grad_lse):
    if not ctx.store_aux:
        raise RuntimeError("sdpadiff::triton_fwd was called with store_aux=False, which keeps no row "
                           "statistics for the backward; call it with store_aux=True to differentiate it")
    q, k, v, lam, lo, hi, out, o2, lse, *rest = ctx.saved_tensors
    mask = rest[0] if ctx.has_mask else None
    need_q, need_k, need_v, need_lam = ctx.needs_input_grad[:4]
    dq, dk, dv, dlam = torch.ops.sdpadiff.triton_bwd(dout, q, k, v, lam, mask, lo, hi, out, o2, lse, ctx.scale,
                                                     need_q, need_k or need_v)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            dlam if need_lam else None, None, None, None, None, None)


def _define_ops(kernels: dict) -> str:
    """Define the two ops around ``kernels`` (see :func:`_module_kernels`); returns how."""
    from torch.library import wrap_triton
    from triton.runtime.jit import JITFunction

    # Named here so that torch.library.triton_op finds them in the functions' closures (torch
    # hashes the kernels' source into its compile caches).
    fwd_kernel, pre_kernel, kv_kernel, q_kernel = (kernels[n] for n in ("fwd", "bwd_pre", "bwd_kv", "bwd_q"))

    def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor | None,
                   lo: torch.Tensor, hi: torch.Tensor, scale: float,
                   store_aux: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(q, k, v, lam, mask, (lo, hi), scale, store_aux, {"fwd": wrap_triton(fwd_kernel)})

    def triton_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                   mask: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, out: torch.Tensor,
                   o2: torch.Tensor, lse: torch.Tensor, scale: float, need_q: bool,
                   need_kv: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        wrapped = {"bwd_pre": wrap_triton(pre_kernel), "bwd_kv": wrap_triton(kv_kernel), "bwd_q": wrap_triton(q_kernel)}
        return _backward(dout, q, k, v, lam, mask, (lo, hi), scale, out, o2, lse, need_q, need_kv, wrapped)

    if isinstance(fwd_kernel, JITFunction):  # compiled kernels: torch sees into the op
        torch.library.triton_op("sdpadiff::triton_fwd", triton_fwd, mutates_args=())
        torch.library.triton_op("sdpadiff::triton_bwd", triton_bwd, mutates_args=())
        kind = "triton_op"
    else:  # TRITON_INTERPRET=1: interpreted kernels, an opaque op
        torch.library.custom_op("sdpadiff::triton_fwd", triton_fwd, mutates_args=()).register_fake(_fwd_fake)
        torch.library.custom_op("sdpadiff::triton_bwd", triton_bwd, mutates_args=()).register_fake(_bwd_fake)
        kind = "custom_op"
    torch.library.register_autograd("sdpadiff::triton_fwd", _autograd_backward, setup_context=_setup_context)
    return kind


@_constant_under_compile
def _register_ops() -> str:
    """Define ``sdpadiff::triton_fwd`` / ``triton_bwd`` once (this imports triton); returns
    ``"triton_op"`` or ``"custom_op"`` (see the section comment "the torch ops").

    Marked as a constant result so that torch.compile runs it while tracing (once, as plain
    Python) instead of tracing into it: the ops then exist before the traced code calls them.
    """
    global _ops_kind
    if _ops_kind is None:
        with _ops_lock:
            if _ops_kind is None:
                _ops_kind = _define_ops(_module_kernels())
    return _ops_kind


def triton_diff_attention(q, k, v, lam, attn_mask, is_causal, scale, *, row_bounds=None) -> torch.Tensor:
    """Differential attention with the fused Triton kernels.

    q: (B, 2H, Lq, d), k: (B, 2Hkv, Lk, d), v: (B, Hkv, Lk, 2d), lam: (H,),
    attn_mask: None, bool (True = may attend) or additive float mask
    broadcastable to (B, H, Lq, Lk); is_causal: bottom-right aligned causal
    mask (in addition to attn_mask); scale: softmax scale.
    row_bounds: optional ``(lo, hi)`` integer ``(Lq,)`` tensors, non-decreasing:
    query j sees keys ``lo[j] <= t < hi[j]`` (causal, window and packed
    sequences, see ``AttentionMask.row_bounds``); they replace ``is_causal``.
    Key tiles outside every row's interval are skipped.
    Returns (B, H, Lq, 2d) in q's dtype.  Rows that see no key give zeros.
    Call ``triton_not_supported_reasons`` first; this function assumes support.

    Runs through the op ``sdpadiff::triton_fwd`` (autograd through ``triton_bwd``), which
    torch.compile(fullgraph=True) traces; an eager call with nothing to differentiate launches
    the forward kernel directly, without the auxiliary outputs.
    """
    acc = _acc_dtype(q.dtype)
    if lam.dtype != acc:
        lam = lam.to(acc)  # differentiable cast; gradient flows back to lam
    lam = lam.contiguous()
    scale = float(scale)
    is_causal = bool(is_causal)
    if attn_mask is not None:
        attn_mask = attn_mask.detach()
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, lam))
    Lq, Lk = q.shape[2], k.shape[2]
    if row_bounds is None:
        lo, hi = default_row_bounds(Lq, Lk, is_causal, q.device)
    else:
        lo, hi = (t.to(device=q.device, dtype=torch.int32).contiguous() for t in row_bounds)
    if not needs_grad and not torch.compiler.is_compiling():
        # Eager with nothing to differentiate (inference, decoding): skip the dispatcher.
        out, _, _ = _forward(q, k, v, lam, attn_mask, (lo, hi), scale, store_aux=False)
        return out
    _register_ops()
    out, _, _ = torch.ops.sdpadiff.triton_fwd(q, k, v, lam, attn_mask, lo, hi, scale, needs_grad)
    return out
