"""Where the final query's attention goes: shares of attention mass by region of the context.

A differential map ``A1 - λ·A2`` has negative entries and rows that sum to ``1 - λ``, so "the mass on
the answer" needs a definition. For a row ``a`` over the keys and a region ``R`` of positions this
module reports

* ``abs``: ``Σ_R |a| / Σ |a|``, the region's share of the total absolute mass. This is the headline
  number: a negative weight moves the output as much as a positive one of the same size, so
  attention that is cancelled to zero counts as zero, and attention pushed below zero still counts
  as attention paid;
* ``pos``: ``Σ_R max(a, 0) / Σ max(a, 0)``, the share of the positive part only, ignoring what the
  map subtracts;
* ``net``: ``Σ_R a``, the raw signed sum, not normalised (a softmax row sums to 1; a differential
  row sums to ``1 - λ``).

For a softmax map (``a >= 0``, rows summing to 1) all three are the plain attention mass. No other
rescaling is applied. The regions ``answer``, ``distractor``, ``noise`` and ``other`` partition the
visible keys, so the four ``abs`` (or ``pos``) shares of a row add up to 1. A row whose entries
are all zero gives shares of 0.
"""

from __future__ import annotations

import torch

from .task import NOISE, PAIR

__all__ = ["REGIONS", "SHARES", "attention_shares", "region_masks"]

REGIONS: tuple[str, ...] = ("answer", "distractor", "noise", "other")
SHARES: tuple[str, ...] = ("abs", "pos", "net")


def region_masks(kinds: torch.Tensor, answer_pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean ``(B, L)`` masks of the four regions for queries whose answer sits at ``answer_pos``.

    Args:
        kinds: ``(B, L)`` position codes from :func:`~multihead_sdpadiff.demo.task.make_batch`.
        answer_pos: ``(B,)`` or ``(B, n)`` positions that hold the answer.

    ``answer``: the ``answer_pos`` positions; ``distractor``: every other pair token of the context;
    ``noise``: the noise tokens; ``other``: the rest (BOS, SEP and the query section, the query
    itself included).
    """
    if answer_pos.dim() == 1:
        answer_pos = answer_pos[:, None]
    answer = torch.zeros_like(kinds, dtype=torch.bool).scatter_(1, answer_pos, True)
    distractor = (kinds == PAIR) & ~answer
    noise = kinds == NOISE
    other = ~(answer | distractor | noise)
    return {"answer": answer, "distractor": distractor, "noise": noise, "other": other}


def _share(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    return torch.where(whole > 0, part / whole.clamp_min(torch.finfo(whole.dtype).tiny), torch.zeros_like(part))


def attention_shares(rows: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-region shares of attention rows.

    Args:
        rows: ``(B, ..., Lk)`` attention weights of one query per sequence (any number of middle
            dims, e.g. heads), the combined map ``A1 - λ·A2`` for a differential layer.
        masks: region name -> ``(B, Lk)`` bool (see :func:`region_masks`); broadcast over the middle
            dims.

    Returns:
        ``{share: {region: (B, ...) tensor}}`` for ``share`` in :data:`SHARES` (``abs``, ``pos``,
        ``net``, defined in the module docstring).
    """
    rows = rows.double()
    absolute, positive = rows.abs(), rows.clamp_min(0)
    total_abs, total_pos = absolute.sum(-1), positive.sum(-1)
    out: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SHARES}
    for name, m in masks.items():
        m = m.view(m.shape[0], *([1] * (rows.dim() - 2)), m.shape[-1]).to(rows.dtype)  # (B, 1.., Lk)
        out["abs"][name] = _share((absolute * m).sum(-1), total_abs)
        out["pos"][name] = _share((positive * m).sum(-1), total_pos)
        out["net"][name] = (rows * m).sum(-1)
    return out
