"""The cpu_fused strategy: a fused C++ kernel for CPU at the FLOPs of standard attention.

The kernel (``csrc/diff_attention_cpu.cpp``, shipped with the package) is compiled on first use
with :func:`torch.utils.cpp_extension.load` for the CPU's vector ISA (AVX512, AVX2, or the default
build, which still uses NEON on ARM) and cached across processes in torch's extension folder
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Compiling logs one line.
Importing this module never compiles; ``sdpadiff build`` compiles ahead of time.

It is registered as two torch ops, ``sdpadiff::cpu_fused_fwd`` and ``sdpadiff::cpu_fused_bwd``,
with fake (meta) implementations and an autograd formula, so ``torch.compile(fullgraph=True)``
and ``torch.export`` trace through it. The same kernel runs V2 (``sdpadiff::cpu_fused_v2_*``: both
maps read one kv head, values of width d, λ per token) and grouped differential attention
(``sdpadiff::cpu_fused_gda_*``: one noise map per ``r`` signal maps).

What it computes: see the C++ file's header. In short, per (batch, kv group, block of up to
``forward_block_rows(Lk)`` stacked query rows; ``BWD_BLOCK_ROWS`` in the backward) and key tiles of ``KEY_TILE`` keys: both maps' scores by GEMM,
softmax statistics in float32, ``A1 − λ·A2`` formed per tile before one product with v; the
backward recomputes from the saved row max and sum of each map. float32, bfloat16 and float16 (GEMMs
accumulate in float32); float64 stays on ``chunked``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from ..masks import AttentionMask

__all__ = ["DTYPES", "build", "cpu_fused", "cpu_fused_grouped", "cpu_fused_v2", "library_path", "not_supported_reasons", "row_intervals"]

_log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "diff_attention_cpu.cpp"
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
#: Stacked query rows per task (all heads of a GQA group share a block) and keys per tile. A
#: forward block keeps both maps' exps over its whole key range (rows x Lk x 8 bytes) and streams
#: its group's k and v once. Short key ranges favour short blocks (less work wasted on the causal
#: diagonal, more tasks); from ``LONG_KEYS`` keys on, reading k and v once per block costs more
#: than the larger exp buffer of a tall block, where the L3 cache cannot hold a group's k and v.
#: Measured (2 threads, E = 768, 12 heads, an 8 MiB L3): 32 rows fastest up to N = 2048; 128 rows
#: 4 % faster at 4096, 8 % at 8192 and 18 % at 16384. Tall blocks stop where their exp buffer would
#: pass ``LONG_EXP_BYTES`` per thread (N = 16384 at 128 rows), so scratch memory stays bounded at
#: long context. The backward keeps three such buffers; 64 rows measured best there. The saved
#: statistics are per row, so the forward and backward blocks may differ.
FWD_BLOCK_ROWS = 32
FWD_BLOCK_ROWS_LONG = 128
LONG_KEYS = 4096
LONG_EXP_BYTES = 16 << 20
BWD_BLOCK_ROWS = 64
KEY_TILE = 512


def forward_block_rows(keys: int) -> int:
    """Stacked query rows per forward block for a call over ``keys`` keys: ``FWD_BLOCK_ROWS`` below
    ``LONG_KEYS``, else up to ``FWD_BLOCK_ROWS_LONG`` while both maps' exps (rows × keys × 8 bytes)
    fit in ``LONG_EXP_BYTES``, and never fewer than ``FWD_BLOCK_ROWS``."""
    if keys < LONG_KEYS:
        return FWD_BLOCK_ROWS
    return max(FWD_BLOCK_ROWS, min(FWD_BLOCK_ROWS_LONG, LONG_EXP_BYTES // (8 * keys)))

_lock = threading.Lock()
_module = None
_build_error: str | None = None


def capability_flags(capability: str | None = None) -> tuple[str, list[str]]:
    """``(tag, compiler flags)`` for the vector ISA torch dispatches to on this CPU.

    at::vec compiles to scalar code unless ``CPU_CAPABILITY_*`` is defined, and the matching
    ``-m`` flags must allow the intrinsics. Anything else (including ARM, where at::vec's NEON
    code is keyed on ``__aarch64__``) gets the default build.
    """
    cap = (capability or torch.backends.cpu.get_cpu_capability()).upper()
    if cap.startswith("AVX512"):
        return "avx512", ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                          "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    if cap == "AVX2":
        return "avx2", ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return "default", ["-DCPU_CAPABILITY=DEFAULT"]


def _name_and_flags() -> tuple[str, list[str]]:
    tag, flags = capability_flags()
    digest = hashlib.sha1(SOURCE.read_bytes() + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()[:10]
    return f"sdpadiff_cpu_fused_{tag}_{digest}", ["-O3", "-fopenmp", *flags]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _toolchain_reasons() -> list[str]:
    reasons = []
    if not SOURCE.is_file():
        reasons.append(f"the kernel source {SOURCE} is missing from the installed package")
    if _compiler() is None:
        reasons.append(f"no C++ compiler found ({os.environ.get('CXX', 'c++')!r} is not on PATH); cpu_fused "
                       "compiles its kernel on first use")
    if shutil.which("ninja") is None:
        reasons.append("ninja is not on PATH (pip install ninja); torch.utils.cpp_extension needs it to compile cpu_fused")
    return reasons


# Looked up once, here, because torch.compile cannot trace file-system calls and the dispatcher
# asks for these reasons inside compiled regions. A few stat calls; nothing is compiled.
_TOOLCHAIN: list[str] | None = _toolchain_reasons()


def not_supported_reasons() -> list[str]:
    """Why the kernel cannot be built or loaded here (empty when it can). Never compiles."""
    # Reads only state that is fixed after import (or set once by a failed build): a compiled
    # graph guards on what this reads, and loading the kernel must not invalidate it.
    global _TOOLCHAIN
    if _build_error is not None:
        return [f"the cpu_fused kernel failed to build: {_build_error}"]
    if _TOOLCHAIN is None:
        _TOOLCHAIN = _toolchain_reasons()
    return list(_TOOLCHAIN)


def _load():
    """The compiled extension, built on first use (cached across processes by torch)."""
    global _module, _build_error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        reasons = not_supported_reasons()
        if reasons:
            raise RuntimeError("cpu_fused cannot run: " + "; ".join(reasons))
        from torch.utils import cpp_extension

        name, flags = _name_and_flags()
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not (build_dir / f"{name}.so").exists():
            _log.warning("multihead_sdpadiff: compiling the cpu_fused kernel (%s, once) in %s", name, build_dir)
        try:
            _module = cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                         build_directory=str(build_dir), verbose=False)
        except Exception as exc:  # a broken toolchain: refuse from now on, with the reason
            _build_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            raise RuntimeError(f"cpu_fused: the kernel failed to build ({_build_error})") from exc
    return _module


def build() -> Path:
    """Compile (or load the cached) kernel now; returns the path of the shared library."""
    return library_path(_load())


def library_path(module=None) -> Path:
    module = module or _load()
    return Path(module.__file__)


# ------------------------------------------------------------------------------------------------
# The torch ops
# ------------------------------------------------------------------------------------------------


def _define_maps_ops(name: str, kernel_fwd: str, kernel_bwd: str) -> None:
    """The ops ``sdpadiff::{name}_fwd`` and ``{name}_bwd`` over ``q (B, 2H, Lq, d)`` (V1 and V2:
    both maps of each head in q), with their fake forms and autograd."""

    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, lo: torch.Tensor,
            hi: torch.Tensor, mask: torch.Tensor | None, scale: float, block_rows: int,
            key_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = getattr(_load(), kernel_fwd)(q, k, v, lam, lo, hi, mask, scale, block_rows, key_tile)
        return out, lse

    def fwd_fake(q, k, v, lam, lo, hi, mask, scale, block_rows, key_tile):
        b, h2, lq, _ = q.shape
        return q.new_empty(b, h2 // 2, lq, v.shape[-1]), q.new_empty(b, h2 // 2, 4, lq, dtype=torch.float32)

    def bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
            lo: torch.Tensor, hi: torch.Tensor, mask: torch.Tensor | None, lse: torch.Tensor, scale: float,
            block_rows: int, key_tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv, dlam = getattr(_load(), kernel_bwd)(grad_out, q, k, v, lam, lo, hi, mask, lse, scale,
                                                        block_rows, key_tile)
        return dq, dk, dv, dlam

    def bwd_fake(grad_out, q, k, v, lam, lo, hi, mask, lse, scale, block_rows, key_tile):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), lam.new_empty(lam.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, lam, lo, hi, mask, scale, block_rows, key_tile = inputs
        ctx.save_for_backward(q, k, v, lam, lo, hi, output[1], *(() if mask is None else (mask,)))
        ctx.has_mask = mask is not None
        ctx.args = (scale, BWD_BLOCK_ROWS, key_tile)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, lam, lo, hi, lse, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        dq, dk, dv, dlam = getattr(torch.ops.sdpadiff, f"{name}_bwd")(grad_out.contiguous(), q, k, v, lam, lo, hi,
                                                                      mask, lse, *ctx.args)
        return dq, dk, dv, dlam, None, None, None, None, None, None

    op_fwd = torch.library.custom_op(f"sdpadiff::{name}_fwd", fwd, mutates_args=(), device_types="cpu")
    op_fwd.register_fake(fwd_fake)
    op_bwd = torch.library.custom_op(f"sdpadiff::{name}_bwd", bwd, mutates_args=(), device_types="cpu")
    op_bwd.register_fake(bwd_fake)
    torch.library.register_autograd(f"sdpadiff::{name}_fwd", backward, setup_context=setup_context)


_define_maps_ops("cpu_fused", "fwd", "bwd")  # V1: v (B, Hkv, Lk, 2d), lam (H,)
_define_maps_ops("cpu_fused_v2", "v2_fwd", "v2_bwd")  # V2: k, v (B, Hkv, Lk, d), lam (B, H, Lq)


# Grouped differential attention (GDA): N_s signal queries and N_n noise queries, one noise softmax
# per noise head shared by its r = N_s / N_n signal heads. The same kernel, with r > 1.


@torch.library.custom_op("sdpadiff::cpu_fused_gda_fwd", mutates_args=(), device_types="cpu")
def _gda_fwd(qs: torch.Tensor, qn: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
             lo: torch.Tensor, hi: torch.Tensor, mask: torch.Tensor | None, scale: float, block_rows: int,
             key_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _load().gda_fwd(qs, qn, k, v, lam, lo, hi, mask, scale, block_rows, key_tile)
    return out, lse


@_gda_fwd.register_fake
def _(qs, qn, k, v, lam, lo, hi, mask, scale, block_rows, key_tile):
    b, ns, lq, d = qs.shape
    return qs.new_empty(b, ns, lq, 2 * d), qs.new_empty(b, ns + qn.shape[1], 2, lq, dtype=torch.float32)


@torch.library.custom_op("sdpadiff::cpu_fused_gda_bwd", mutates_args=(), device_types="cpu")
def _gda_bwd(grad_out: torch.Tensor, qs: torch.Tensor, qn: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mask: torch.Tensor | None, lse: torch.Tensor,
             scale: float, block_rows: int,
             key_tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dqs, dqn, dk, dv, dlam = _load().gda_bwd(grad_out, qs, qn, k, v, lam, lo, hi, mask, lse, scale, block_rows,
                                             key_tile)
    return dqs, dqn, dk, dv, dlam


@_gda_bwd.register_fake
def _(grad_out, qs, qn, k, v, lam, lo, hi, mask, lse, scale, block_rows, key_tile):
    return (qs.new_empty(qs.shape), qn.new_empty(qn.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            lam.new_empty(lam.shape))


def _gda_setup_context(ctx, inputs, output):
    qs, qn, k, v, lam, lo, hi, mask, scale, block_rows, key_tile = inputs
    ctx.save_for_backward(qs, qn, k, v, lam, lo, hi, output[1], *(() if mask is None else (mask,)))
    ctx.has_mask = mask is not None
    ctx.args = (scale, BWD_BLOCK_ROWS, key_tile)


def _gda_backward(ctx, grad_out, grad_lse):
    qs, qn, k, v, lam, lo, hi, lse, *rest = ctx.saved_tensors
    mask = rest[0] if ctx.has_mask else None
    grads = torch.ops.sdpadiff.cpu_fused_gda_bwd(grad_out.contiguous(), qs, qn, k, v, lam, lo, hi, mask, lse,
                                                 *ctx.args)
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd("sdpadiff::cpu_fused_gda_fwd", _gda_backward, setup_context=_gda_setup_context)


# ------------------------------------------------------------------------------------------------
# The strategy
# ------------------------------------------------------------------------------------------------


def row_intervals(mask: AttentionMask, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the keys ``[lo, hi)`` it may see: int32 ``(1 | B, Lq)`` each.

    From :meth:`AttentionMask.row_bounds` (bottom-right causal, window, packed sequences) and the
    dense mask's first and last visible key over all heads. A row that sees nothing gets
    ``lo == hi``. The kernel still applies the dense mask inside the interval.
    """
    lq, lk = mask.lq, mask.lk
    m = mask.tensor
    if mask.is_packed or mask.has_window:
        lo, hi = (t.to(torch.int32).unsqueeze(0) for t in mask.row_bounds(device))  # (1, Lq)
    elif not torch.compiler.is_compiling():
        lo, hi = _load().intervals(lq, lk, mask.causal)  # one call: a decode step pays for every op
    else:
        # The same in torch ops, for a compiled graph: lo = 0 and, under the bottom-right causal
        # mask, hi = j + Lk - Lq + 1 clamped to [0, Lk].
        lo = torch.zeros(1, lq, dtype=torch.int32, device=device)
        if mask.causal:
            hi = torch.arange(lk - lq + 1, lk + 1, dtype=torch.int32, device=device).clamp_(min=0).unsqueeze(0)
        else:
            hi = torch.full((1, lq), lk, dtype=torch.int32, device=device)
    if m is not None:
        rows_shared = m.stride(2) == 0 and lq > 1  # a key-padding mask expanded over the queries
        mm = m[:, :, :1] if rows_shared else m
        vis = (mm if mm.dtype == torch.bool else mm > float("-inf")).any(dim=1)  # (Bm, Lq | 1, Lk)
        has = vis.any(dim=-1)
        first = vis.to(torch.uint8).argmax(dim=-1).to(torch.int32)
        last = (lk - vis.flip(-1).to(torch.uint8).argmax(dim=-1)).to(torch.int32)  # one past the last
        if rows_shared:
            has, first, last = (t.expand(t.shape[0], lq) for t in (has, first, last))
        lo = torch.maximum(lo, first)
        hi = torch.where(has, torch.minimum(hi, last), lo)
        hi = torch.maximum(hi, lo)
    return lo.contiguous(), hi.contiguous()


def _rows_dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when each head's rows are dense (what the kernel reads in place: a preallocated
    KV cache's slice of its buffer is), else a contiguous copy."""
    if t.is_contiguous() or ((t.shape[-1] <= 1 or t.stride(-1) == 1)
                             and (t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1])):
        return t
    return t.contiguous()


def _kernel_mask(mask: AttentionMask) -> torch.Tensor | None:
    m = mask.tensor
    if m is not None and m.dtype != torch.bool and m.dtype != torch.float32:
        m = m.float()  # the kernel adds float32 scores
    return m


def _direct(tensors) -> bool:
    """Eager with nothing to differentiate (inference, decoding): call the kernel itself. The op's
    dispatcher and autograd wrapper cost tens of microseconds, much of a decode step."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and not torch.compiler.is_compiling()


def _run(kernel: str, queries: tuple[torch.Tensor, ...], k, v, lam, mask: AttentionMask, scale: float):
    """The forward of one layout: the kernel's ``kernel`` entry (``fwd``, ``v2_fwd`` or ``gda_fwd``)
    called directly when nothing needs a gradient, else the op ``sdpadiff::cpu_fused_{kernel}``."""
    lo, hi = row_intervals(mask, queries[0].device)
    if lam.dtype != torch.float32 or not lam.is_contiguous():
        lam = lam.to(torch.float32).contiguous()
    args = (*(q if q.is_contiguous() else q.contiguous() for q in queries), _rows_dense(k), _rows_dense(v), lam, lo, hi, _kernel_mask(mask),
            float(scale), forward_block_rows(k.shape[-2]), KEY_TILE)
    if _direct((*queries, k, v, lam)):
        return getattr(_load(), kernel)(*args)[0]
    return getattr(torch.ops.sdpadiff, f"cpu_fused_{kernel}")(*args)[0]


def cpu_fused(q, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Differential attention through the fused CPU kernel; see the module docstring."""
    return _run("fwd", (q,), k, v, lam, mask, scale)


def cpu_fused_v2(q, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Differential attention V2 through the same kernel: ``q (B, 2H, Lq, d)``, ``k`` and ``v``
    ``(B, Hkv, Lk, d)`` (both maps of head i read kv head ``i // (H / Hkv)``), ``lam (B, H, Lq)``
    per token; returns ``(B, H, Lq, d)``. ``A1 − λ·A2`` is formed per key tile before one product
    with v of width d: 6d FLOPs per (query, key) pair and head, against 8d for the two maps'
    attention followed by the difference."""
    return _run("v2_fwd", (q,), k, v, lam, mask, scale)


def cpu_fused_grouped(qs, qn, k, v, lam, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Grouped differential attention through the same kernel: signal queries ``qs (B, N_s, Lq, d)``,
    noise queries ``qn (B, N_n, Lq, d)``, ``k (B, 2P, Lk, d)``, ``v (B, P, Lk, 2d)``, ``lam (N_s,)``
    and a mask over ``(B, N_n, Lq, Lk)``; returns ``(B, N_s, Lq, 2d)``. Each noise softmax is
    computed once per query block and subtracted from its ``r`` signal heads' maps before the one
    product with v; the backward collects the ``r`` signal heads' share of each noise map."""
    return _run("gda_fwd", (qs, qn), k, v, lam, mask, scale)
