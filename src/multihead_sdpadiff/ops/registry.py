"""The strategy registry: each way of computing differential attention declares what it supports.

A strategy is a function ``fn(q, k, v, lam, mask, scale) -> out`` with the shapes of
:func:`multihead_sdpadiff.diff_attention` (``lam`` is always an ``(H,)`` tensor and ``mask`` an
:class:`~multihead_sdpadiff.masks.AttentionMask`), plus data about what it can run. The dispatcher
asks :meth:`Strategy.not_supported_reasons` and refuses, with every reason, rather than fall back
to something the caller did not ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..masks import AttentionMask

__all__ = ["Strategy", "OpInputs", "register", "get_strategy", "registered"]


@dataclass(frozen=True)
class OpInputs:
    """Validated inputs of one call, as strategies and their capability checks see them."""

    q: torch.Tensor  # (B, 2H, Lq, d)
    k: torch.Tensor  # (B, 2Hkv, Lk, d)
    v: torch.Tensor  # (B, Hkv, Lk, 2d)
    lam: torch.Tensor  # (H,) in float32 (float64 for float64 inputs)
    mask: AttentionMask
    scale: float

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.q, self.k, self.v, self.lam)
        )


@dataclass(frozen=True)
class Strategy:
    """One registered way of computing the op.

    Attributes:
        name: the ``impl=`` string.
        fn: ``fn(q, k, v, lam, mask, scale) -> (B, H, Lq, 2d)``.
        summary: one line for tables and error messages.
        flops: forward FLOPs relative to standard attention of width 2d (NOTES' cost table).
        score_memory: ``"O(N)"`` or ``"O(N^2)"`` per query row; ``"O(block*N)"`` for chunked paths.
        devices: device types it runs on (``None`` = any).
        dtypes: dtypes it accepts (``None`` = any floating dtype).
        check: optional extra capability check returning reasons (empty = supported).
        notes: caveats for the docs (for example a backend that falls back to math).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    flops: float
    score_memory: str
    devices: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    check: Callable[[OpInputs], list[str]] | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        reasons = []
        if self.devices is not None and inputs.device.type not in self.devices:
            reasons.append(f"device {inputs.device.type} not in {sorted(self.devices)}")
        if self.dtypes is not None and inputs.dtype not in self.dtypes:
            reasons.append(f"dtype {inputs.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        if self.check is not None and not reasons:
            reasons.extend(self.check(inputs))
        return reasons

    def __call__(self, inputs: OpInputs) -> torch.Tensor:
        return self.fn(inputs.q, inputs.k, inputs.v, inputs.lam, inputs.mask, inputs.scale)


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    if strategy.name in _REGISTRY or strategy.name == "auto":
        raise ValueError(f"strategy name {strategy.name!r} is already taken")
    _REGISTRY[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"impl must be one of {('auto', *_REGISTRY)}, got {name!r}") from None


def registered() -> tuple[str, ...]:
    return tuple(_REGISTRY)
