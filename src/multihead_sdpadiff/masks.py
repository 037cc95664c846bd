"""Attention masks: validation, bottom-right causal alignment and the form every strategy receives.

Conventions used across the package:

* A **bool** mask holds ``True`` where a query may attend to a key.
* A **floating** mask is added to the scaled scores; ``-inf`` hides a key.
* Masks broadcast to ``(B, H, Lq, Lk)`` where ``H`` is the number of *differential* heads; both
  maps of a head see the same mask.
* The causal mask is aligned **bottom-right**: query ``j`` (0-based, of ``Lq``) sees key ``t`` (of
  ``Lk``) when ``t <= j + Lk - Lq``. With ``Lq == Lk`` this is the usual lower triangle; with a KV
  cache (``Lk > Lq``) the new queries are the last ``Lq`` positions. ``torch``'s own
  ``is_causal=True`` aligns top-left instead, which is only right when ``Lq == Lk``::

      Lq = 2, Lk = 5, bottom-right (used here)      top-left (SDPA's is_causal)
          1 1 1 1 0                                     1 0 0 0 0
          1 1 1 1 1                                     1 1 0 0 0

* A **window** ``(left, right)`` (flash-attn's ``window_size``; ``-1`` = unbounded) is aligned
  bottom-right like the causal mask: query ``j`` at position ``p = j + Lk - Lq`` sees key ``t``
  when ``p - left <= t <= p + right``. It combines with ``causal`` and the mask tensor.
* **Packed sequences** (flash-attn's varlen layout) are one row of ``Lq = total_q`` queries and
  ``Lk = total_k`` keys with ``cu_q``/``cu_k`` boundaries: query ``j`` of sequence ``s`` sees only
  the keys of sequence ``s``, with the causal mask and window aligned bottom-right *per sequence*
  (flash-attn >= 2.1).
* Causal, window and packing are all **per-query-row key intervals** ``[lo[j], hi[j])``
  (:meth:`AttentionMask.row_bounds`), non-decreasing in ``j``, so kernels can skip every key block
  outside them; a mask tensor, if any, hides keys inside the interval too.
* A query row that can see no key produces zeros (not NaN) in every strategy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["AttentionMask", "causal_mask", "check_cu_seqlens", "check_window", "prepare_mask"]


def causal_mask(lq: int, lk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``(lq, lk)`` bottom-right causal mask: ``True`` where key ``t <= j + lk - lq``."""
    rows = torch.arange(lq, device=device).unsqueeze(1)
    cols = torch.arange(lk, device=device).unsqueeze(0)
    return cols <= rows + (lk - lq)


def check_window(window, name: str = "window") -> tuple[int, int]:
    """``window`` as ``(left, right)`` ints >= -1 (``None`` -> ``(-1, -1)``, unbounded)."""
    if window is None:
        return (-1, -1)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{name} must be None or a (left, right) pair of ints, got {window!r}")
    for side, w in zip(("left", "right"), window, strict=True):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{name} {side} must be an int (-1 = unbounded), got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"{name} {side} must be >= 0, or -1 for unbounded, got {w}")
    return (int(window[0]), int(window[1]))


def check_cu_seqlens(cu, name: str, total: int, device: torch.device | None = None) -> tuple[int, ...]:
    """Validate flash-attn's ``cu_seqlens`` (int32 ``(batch + 1,)``, 0 first, non-decreasing,
    ``total`` last) and return its values as Python ints."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of shape (batch + 1,), got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype torch.int32 (as flash-attn's), got {cu.dtype}")
    if device is not None and cu.device != device:
        raise ValueError(f"{name} must be on the queries' device {device}, got {cu.device}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D of shape (batch + 1,) with batch >= 1, got shape {tuple(cu.shape)}")
    vals = tuple(int(x) for x in cu.tolist())
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:], strict=False)):
        raise ValueError(f"{name} must be non-decreasing (sequence lengths >= 0), got {list(vals)}")
    if vals[-1] != total:
        raise ValueError(f"{name} must end at the total length {total}, got {vals[-1]}")
    return vals


@dataclass(frozen=True)
class AttentionMask:
    """A validated mask in the form strategies consume.

    ``tensor`` is ``None`` or a 4-D bool/floating tensor broadcastable to ``(B, H, Lq, Lk)``
    (dims 0 and 1 are either full or 1). Floating tensors have the query dtype. ``causal`` asks
    for the bottom-right causal mask *in addition* to ``tensor``; ``window`` ``(left, right)``
    (``-1`` unbounded) for a band aligned the same way. ``cu_q``/``cu_k`` (Python ints, ``None``
    when not packed) are the packed sequences' boundaries along ``Lq``/``Lk``; packing requires
    ``B == 1``. Everything but ``tensor`` is the per-row interval of :meth:`row_bounds`.
    """

    tensor: torch.Tensor | None
    causal: bool
    lq: int
    lk: int
    window: tuple[int, int] = (-1, -1)
    cu_q: tuple[int, ...] | None = None
    cu_k: tuple[int, ...] | None = None

    @property
    def is_empty(self) -> bool:
        """True when nothing is hidden (no tensor, and the intervals hide nothing)."""
        return self.tensor is None and not self.intervals_hide_anything

    @property
    def is_packed(self) -> bool:
        return self.cu_q is not None

    @property
    def has_window(self) -> bool:
        return self.window != (-1, -1)

    @property
    def causal_hides_anything(self) -> bool:
        # With Lq == 1 and Lk >= 1 the single query is the last position and sees every key.
        return self.causal and not (self.lq == 1 and self.lk >= 1)

    @property
    def intervals_hide_anything(self) -> bool:
        """True when causal, window or packing hide a key from some row."""
        if self.is_packed:
            return len(self.cu_q) > 2 or self.causal_hides_anything or self.has_window
        if self.causal_hides_anything:
            return True
        left, right = self.window
        off = self.lk - self.lq
        # Row 0 has the smallest upper bound, row Lq-1 the largest lower bound.
        return (left >= 0 and self.lq - 1 + off - left > 0) or (right >= 0 and off + right + 1 < self.lk)

    def sequences(self) -> list[tuple[int, int, int, int]]:
        """``(q0, q1, k0, k1)`` per packed sequence; one entry ``(0, Lq, 0, Lk)`` when not packed."""
        if not self.is_packed:
            return [(0, self.lq, 0, self.lk)]
        return [(self.cu_q[s], self.cu_q[s + 1], self.cu_k[s], self.cu_k[s + 1]) for s in range(len(self.cu_q) - 1)]

    def sequence(self, q0: int, q1: int, k0: int, k1: int) -> AttentionMask:
        """The unpacked mask of one packed sequence (rows ``q0:q1``, keys ``k0:k1``)."""
        m = self.tensor
        if m is not None:
            m = m[:, :, q0:q1, k0:k1]
        return AttentionMask(m, self.causal, q1 - q0, k1 - k0, self.window)

    def row_bounds(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``, int64 ``(Lq,)``: key ``t`` is visible to query ``j`` iff ``lo[j] <= t < hi[j]``
        (and the mask tensor, if any, allows it). Both are non-decreasing in ``j``; a row that sees
        nothing has ``lo == hi``."""
        los, his = [], []
        left, right = self.window
        for q0, q1, k0, k1 in self.sequences():
            lq, lk = q1 - q0, k1 - k0
            p = torch.arange(lq, device=device, dtype=torch.int64) + (lk - lq)  # bottom-right position
            lo = torch.zeros_like(p)
            hi = torch.full_like(p, lk)
            if left >= 0:
                lo = (p - left).clamp(min=0)
            if self.causal:
                hi = torch.minimum(hi, p + 1)
            if right >= 0:
                hi = torch.minimum(hi, p + right + 1)
            hi = hi.clamp(min=0)
            lo = torch.minimum(lo, torch.full_like(lo, lk))
            hi = torch.maximum(hi, lo)
            los.append(lo + k0)
            his.append(hi + k0)
        if len(los) == 1:
            return los[0], his[0]
        return torch.cat(los), torch.cat(his)

    def interval_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``(Lq, Lk)``: True inside the per-row intervals. O(Lq * Lk) memory."""
        lo, hi = self.row_bounds(device)
        cols = torch.arange(self.lk, device=device)
        return (cols >= lo[:, None]) & (cols < hi[:, None])

    def dense(self, device: torch.device | None = None) -> torch.Tensor | None:
        """One 4-D mask with causal, window and packing folded in, or ``None`` when nothing is hidden.

        Bool stays bool; a floating mask gets ``-inf`` where an interval hides a key.
        Costs O(Lq * Lk) memory when an interval hides something: meant for paths that
        materialise scores.
        """
        m = self.tensor
        if not self.intervals_hide_anything:
            return m
        dev = device if m is None else m.device
        c = self.interval_mask(dev)[None, None]  # (1, 1, Lq, Lk)
        if m is None:
            return c
        if m.dtype == torch.bool:
            return m & c
        return m.masked_fill(~c, float("-inf"))

    def sdpa_args(self, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for ``F.scaled_dot_product_attention`` with the same meaning.

        SDPA's ``is_causal`` is used only where its top-left alignment agrees (Lq == Lk, no other
        mask, no window, not packed); everywhere else one mask is built explicitly.
        """
        if (self.tensor is None and self.causal_hides_anything and self.lq == self.lk
                and not self.has_window and not self.is_packed):
            return None, True
        return self.dense(device), False

    def expand_heads(self, repeats: int) -> AttentionMask:
        """The same mask for ``repeats`` stacked copies of the head axis (``(B, r*H, Lq, Lk)``)."""
        m = self.tensor
        if m is None or m.shape[1] == 1 or repeats == 1:
            return self
        return dataclasses.replace(self, tensor=m.repeat(1, repeats, 1, 1))


def prepare_mask(
    attn_mask: torch.Tensor | None,
    *,
    is_causal: bool,
    batch: int,
    heads: int,
    lq: int,
    lk: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
    name: str = "attn_mask",
    window=None,
    cu_q: tuple[int, ...] | None = None,
    cu_k: tuple[int, ...] | None = None,
) -> AttentionMask:
    """Validate ``attn_mask`` against ``(batch, heads, lq, lk)`` and return an :class:`AttentionMask`.

    Accepted shapes are any that broadcast to ``(B, H, Lq, Lk)`` with at most four dims, e.g.
    ``(Lq, Lk)``, ``(B, 1, Lq, Lk)``, ``(B, 1, 1, Lk)`` (key padding) and ``(B, H, Lq, Lk)``.
    ``window`` is checked by :func:`check_window`; ``cu_q``/``cu_k`` are already-checked packed
    boundaries (see :func:`check_cu_seqlens`).
    """
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    window = check_window(window)
    if (cu_q is None) != (cu_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k for packed sequences, or neither")
    if cu_q is not None:
        if len(cu_q) != len(cu_k):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                             f"got {len(cu_q) - 1} and {len(cu_k) - 1}")
        if batch != 1:
            raise ValueError(f"packed sequences are one row (B = 1), got B = {batch}")
    extra = {"window": window, "cu_q": cu_q, "cu_k": cu_k}
    if attn_mask is None:
        return AttentionMask(None, is_causal, lq, lk, **extra)
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(
            f"{name} must be bool (True = may attend) or floating (added to the scores), "
            f"got dtype {attn_mask.dtype}"
        )
    if device is not None and attn_mask.device != device:
        raise ValueError(f"{name} must be on the queries' device {device}, got {attn_mask.device}")
    target = (batch, heads, lq, lk)
    if not 1 <= attn_mask.dim() <= 4:
        raise ValueError(f"{name} must have 1 to 4 dims broadcastable to (B, H, Lq, Lk)={target}, "
                         f"got shape {tuple(attn_mask.shape)}")
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if any(s not in (1, t) for s, t in zip(m.shape, target, strict=True)):
        raise ValueError(
            f"{name} of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Lq, Lk)={target}"
            + (f"; its last dim must equal the key length {lk}" if m.shape[-1] not in (1, lk) else "")
        )
    # Query and key dims are materialised so that strategies can slice blocks; head and batch
    # dims stay broadcast (size 1) when they were.
    m = m.expand(m.shape[0], m.shape[1], lq, lk)
    if m.is_floating_point() and m.dtype != dtype:
        m = m.to(dtype)
    return AttentionMask(m, is_causal, lq, lk, **extra)
