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

* A query row that can see no key produces zeros (not NaN) in every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionMask", "causal_mask", "prepare_mask"]


def causal_mask(lq: int, lk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``(lq, lk)`` bottom-right causal mask: ``True`` where key ``t <= j + lk - lq``."""
    rows = torch.arange(lq, device=device).unsqueeze(1)
    cols = torch.arange(lk, device=device).unsqueeze(0)
    return cols <= rows + (lk - lq)


@dataclass(frozen=True)
class AttentionMask:
    """A validated mask in the form strategies consume.

    ``tensor`` is ``None`` or a 4-D bool/floating tensor broadcastable to ``(B, H, Lq, Lk)``
    (dims 0 and 1 are either full or 1). Floating tensors have the query dtype. ``causal`` asks
    for the bottom-right causal mask *in addition* to ``tensor``.
    """

    tensor: torch.Tensor | None
    causal: bool
    lq: int
    lk: int

    @property
    def is_empty(self) -> bool:
        """True when nothing is hidden (no tensor, and causal hides nothing)."""
        return self.tensor is None and not self.causal_hides_anything

    @property
    def causal_hides_anything(self) -> bool:
        # With Lq == 1 and Lk >= 1 the single query is the last position and sees every key.
        return self.causal and not (self.lq == 1 and self.lk >= 1)

    def dense(self, device: torch.device | None = None) -> torch.Tensor | None:
        """One 4-D mask with the causal part folded in, or ``None`` when nothing is hidden.

        Bool stays bool; a floating mask gets ``-inf`` where the causal mask hides a key.
        Costs O(Lq * Lk) memory when causal is set: meant for paths that materialise scores.
        """
        m = self.tensor
        if not self.causal_hides_anything:
            return m
        dev = device if m is None else m.device
        c = causal_mask(self.lq, self.lk, dev)[None, None]  # (1, 1, Lq, Lk)
        if m is None:
            return c
        if m.dtype == torch.bool:
            return m & c
        return m.masked_fill(~c, float("-inf"))

    def sdpa_args(self, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for ``F.scaled_dot_product_attention`` with the same meaning.

        SDPA's ``is_causal`` is used only where its top-left alignment agrees (Lq == Lk, no other
        mask); everywhere else the bottom-right mask is built explicitly.
        """
        if self.tensor is None and self.causal_hides_anything and self.lq == self.lk:
            return None, True
        return self.dense(device), False

    def expand_heads(self, repeats: int) -> AttentionMask:
        """The same mask for ``repeats`` stacked copies of the head axis (``(B, r*H, Lq, Lk)``)."""
        m = self.tensor
        if m is None or m.shape[1] == 1 or repeats == 1:
            return self
        return AttentionMask(m.repeat(1, repeats, 1, 1), self.causal, self.lq, self.lk)


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
) -> AttentionMask:
    """Validate ``attn_mask`` against ``(batch, heads, lq, lk)`` and return an :class:`AttentionMask`.

    Accepted shapes are any that broadcast to ``(B, H, Lq, Lk)`` with at most four dims, e.g.
    ``(Lq, Lk)``, ``(B, 1, Lq, Lk)``, ``(B, 1, 1, Lk)`` (key padding) and ``(B, H, Lq, Lk)``.
    """
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if attn_mask is None:
        return AttentionMask(None, is_causal, lq, lk)
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
    return AttentionMask(m, is_causal, lq, lk)
