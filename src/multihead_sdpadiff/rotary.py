"""Rotary position embedding (RoPE) in pure PyTorch, on any device.

The tables follow flash-attn's rotary convention: ``cos`` and ``sin`` are ``(seqlen_ro, rotary_dim / 2)``
and row ``p`` holds the angles of absolute position ``p``. Two layouts of the rotated pairs exist:

* ``interleaved=True`` (GPT-J, the Differential Transformer's code): pairs ``(x[2j], x[2j+1])``.
* ``interleaved=False`` (GPT-NeoX, Llama, transformers): pairs ``(x[j], x[j + rotary_dim/2])``.

Weights trained with one layout need their q/k projection rows permuted to be used with the other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary_emb"]


def _check_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, device: torch.device | None = None) -> int:
    if not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor):
        raise TypeError("cos and sin must be tensors of shape (seqlen_ro, rotary_dim / 2)")
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(
            f"cos and sin must both be (seqlen_ro, rotary_dim / 2), got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if not cos.is_floating_point() or not sin.is_floating_point():
        raise ValueError(f"cos and sin must be floating tables, got dtypes {cos.dtype} and {sin.dtype}")
    if device is not None and (cos.device != device or sin.device != device):
        raise ValueError(f"cos and sin must be on x's device {device}, got {cos.device} and {sin.device}")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > head_dim or rotary_dim == 0:
        raise ValueError(
            f"cos/sin width {cos.shape[1]} is invalid: expected 1 to head_dim / 2 = {head_dim // 2} "
            f"(rotary_dim = 2 * width must not exceed head_dim {head_dim})"
        )
    return rotary_dim


def _check_integer_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    *,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate the first ``rotary_dim = 2 * cos.shape[1]`` features of ``x``; return a new tensor.

    Args:
        x: ``(B, L, heads, head_dim)``.
        cos, sin: ``(seqlen_ro, rotary_dim / 2)``, row ``p`` = position ``p``.
        interleaved: GPT-J pairs ``(2j, 2j+1)`` if True, else NeoX pairs ``(j, j + rotary_dim/2)``.
        seqlen_offsets: token ``l`` of sequence ``b`` takes position ``offset + l``; an int >= 0, or
            a ``(B,)`` integer tensor (one offset per sequence, as with a KV cache).
        position_ids: optional ``(B, L)`` integer positions (any integer dtype); overrides
            ``seqlen_offsets``. Eager calls check that tensor positions lie inside the tables
            (negative ones included); compiled graphs skip that check, which would read tensor
            values. cos and sin must be floating and on x's device.

    The rotation is computed in float32 (float64 for float64 input) and cast back to ``x.dtype``.
    Features past ``rotary_dim`` pass through unchanged.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (B, L, heads, head_dim), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, L, heads, head_dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
    b, length, _, head_dim = x.shape
    rot = _check_tables(cos, sin, head_dim, x.device)
    if position_ids is not None:
        _check_integer_tensor("position_ids", position_ids)
        if position_ids.shape != (b, length):
            raise ValueError(f"position_ids must be (B, L)={(b, length)}, got {tuple(position_ids.shape)}")
        pos = position_ids.long()  # uint8 would index as a mask
    elif isinstance(seqlen_offsets, torch.Tensor):
        _check_integer_tensor("seqlen_offsets", seqlen_offsets)
        if seqlen_offsets.shape != (b,):
            raise ValueError(f"seqlen_offsets tensor must be (B,)={(b,)}, got {tuple(seqlen_offsets.shape)}")
        # The bounds check below (eager only) refuses negative offsets.
        pos = seqlen_offsets.long()[:, None] + torch.arange(length, device=seqlen_offsets.device)
    else:
        if isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, (int, torch.SymInt)):
            raise TypeError(f"seqlen_offsets must be an int or a (B,) integer tensor, got {type(seqlen_offsets).__name__}")
        if seqlen_offsets < 0:
            raise ValueError(f"seqlen_offsets must be >= 0 (a negative offset would wrap around the tables), "
                             f"got {seqlen_offsets}")
        pos = None
        if seqlen_offsets + length > cos.shape[0]:
            raise ValueError(
                f"rotary tables have {cos.shape[0]} positions, need {seqlen_offsets + length} "
                f"(seqlen_offsets {seqlen_offsets} + L {length})"
            )

    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    if pos is None:
        c = cos[seqlen_offsets : seqlen_offsets + length].to(work)[None, :, None]  # (1, L, 1, rot/2)
        s = sin[seqlen_offsets : seqlen_offsets + length].to(work)[None, :, None]
    else:
        # The bounds check reads tensor values, which a compiled graph cannot branch on.
        if not torch.compiler.is_compiling() and pos.numel() and (
            int(pos.min()) < 0 or int(pos.max()) >= cos.shape[0]
        ):
            what = "position_ids" if position_ids is not None else "seqlen_offsets + l"
            raise ValueError(f"positions ({what}) must lie in [0, {cos.shape[0]}) for these rotary tables, "
                             f"got [{int(pos.min())}, {int(pos.max())}]")
        pos = pos.to(cos.device)
        c = cos[pos].to(work)[:, :, None]  # (B, L, 1, rot/2)
        s = sin[pos].to(work)[:, :, None]

    xr = x[..., :rot].to(work)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    out = out.to(x.dtype)
    if rot < head_dim:
        out = torch.cat((out, x[..., rot:]), dim=-1)
    return out


class RotaryEmbedding(nn.Module):
    """Produces ``(cos, sin)`` tables for :func:`apply_rotary_emb`.

    ``RotaryEmbedding(dim, base=10000.0)(seqlen, offset=0, device=None, dtype=None)`` returns two
    ``(seqlen, dim / 2)`` tensors for positions ``offset .. offset + seqlen - 1``, with angle
    ``p * base ** (-2j / dim)`` for position ``p`` and pair ``j``. The angles are computed in float32
    (float64 if asked for) and cast to ``dtype`` (default float32). Tables are cached per device and
    dtype and grown on demand; nothing is stored in ``state_dict``.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even int, got {dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < math.inf:
            raise ValueError(f"base must be a positive finite number (RoPE's θ), got {base!r}")
        self.dim = dim
        self.base = float(base)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, length: int, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = max(length, 2 * cached[0].shape[0] if cached is not None else 0)
            work = torch.float64 if dtype == torch.float64 else torch.float32
            inv_freq = self.base ** (-torch.arange(0, self.dim, 2, device=device, dtype=work) / self.dim)
            angles = torch.outer(torch.arange(size, device=device, dtype=work), inv_freq)
            cached = (angles.cos().to(dtype), angles.sin().to(dtype))
            self._cache[key] = cached
        return cached

    def forward(self, seqlen: int, offset: int = 0, device=None, dtype=None):
        if seqlen < 0 or offset < 0:
            raise ValueError(f"seqlen and offset must be >= 0, got {seqlen} and {offset}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.float32
        cos, sin = self._tables(offset + seqlen, device, dtype)
        return cos[offset : offset + seqlen], sin[offset : offset + seqlen]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"
