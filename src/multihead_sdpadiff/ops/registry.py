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

__all__ = ["AutoRule", "OpInputs", "Registry", "Strategy", "check_lam_tensor", "check_qkv", "check_scale"]


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
        flops: forward FLOPs relative to standard attention of width 2d (the README's strategy table).
        score_memory: ``"O(N)"`` or ``"O(N^2)"`` per query row; ``"O(block*N)"`` for chunked paths.
        devices: device types it runs on (``None`` = any).
        dtypes: dtypes it accepts (``None`` = any floating dtype).
        check: optional extra capability check returning reasons (empty = supported).
        compilable: whether it can be traced by ``torch.compile(fullgraph=True)``; when not, it
            refuses to run inside a compiled region (with that reason) and "auto" moves on.
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
    compilable: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        reasons = []
        if self.devices is not None and inputs.device.type not in self.devices:
            reasons.append(f"device {inputs.device.type} not in {sorted(self.devices)}")
        if self.dtypes is not None and inputs.dtype not in self.dtypes:
            reasons.append(f"dtype {inputs.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        if not self.compilable and torch.compiler.is_compiling():
            reasons.append("it cannot be traced by torch.compile (data-dependent Python control flow); "
                           "call it outside the compiled region or pick an SDPA strategy")
        if self.check is not None and not reasons:
            reasons.extend(self.check(inputs))
        return reasons

    def __call__(self, inputs: OpInputs) -> torch.Tensor:
        return self.fn(inputs.q, inputs.k, inputs.v, inputs.lam, inputs.mask, inputs.scale)


@dataclass(frozen=True)
class AutoRule:
    """One line of an op's "auto" table: the first rule that matches and whose strategy can run wins.

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


class Registry:
    """The strategies of one op and its "auto" rules."""

    def __init__(self, op: str):
        self.op = op
        self.strategies: dict[str, Strategy] = {}
        self.rules: tuple[AutoRule, ...] = ()

    def register(self, strategy: Strategy) -> Strategy:
        if strategy.name in self.strategies or strategy.name == "auto":
            raise ValueError(f"{self.op} strategy name {strategy.name!r} is already taken")
        self.strategies[strategy.name] = strategy
        return strategy

    def names(self) -> tuple[str, ...]:
        """Every registered strategy, then ``"auto"``."""
        return (*self.strategies, "auto")

    def get(self, name: str) -> Strategy:
        try:
            return self.strategies[name]
        except KeyError:
            raise ValueError(f"impl must be one of {self.names()}, got {name!r}") from None

    def resolve(self, impl: str, inputs: OpInputs) -> tuple[Strategy, str]:
        """The strategy to run and why; a strategy that cannot run the inputs is refused, never replaced."""
        if not isinstance(impl, str):
            raise TypeError(f"impl must be a str, one of {self.names()}, got {type(impl).__name__}")
        if impl != "auto":
            strategy = self.get(impl)
            reasons = strategy.not_supported_reasons(inputs)
            if reasons:
                raise ValueError(f"impl={impl!r} cannot run these inputs: " + "; ".join(reasons))
            return strategy, f"requested impl={impl!r}"
        refused = []
        for rule in self.rules:
            if not rule.matches(inputs):
                continue
            reasons = self.get(rule.impl).not_supported_reasons(inputs)
            if not reasons:
                return self.get(rule.impl), f"auto: {rule.why}"
            refused.append(f"{rule.impl}: {'; '.join(reasons)}")
        raise ValueError(f"impl='auto' found no {self.op} strategy for these inputs: " + " | ".join(refused))


FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def mask_needs_no_grad(inputs: OpInputs, alternative: str) -> list[str]:
    """The reason a strategy that gives the mask no gradient refuses a mask that requires one
    (with grad enabled); ``alternative`` names the strategies that can."""
    m = inputs.mask.tensor
    if m is not None and m.requires_grad and torch.is_grad_enabled():
        return [f"attn_mask requires grad and this strategy gives the mask no gradient ({alternative})"]
    return []


def check_qkv(q, k, v) -> None:
    """Type, rank, dtype and device checks shared by every op."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[1] % 2 or q.shape[1] == 0:
        raise ValueError(f"q must be (B, 2H, Lq, d) with an even, non-zero number of maps, got {tuple(q.shape)}")
    if q.shape[3] == 0:
        raise ValueError("head dim d must be positive")


def check_lam_tensor(name: str, lam: torch.Tensor, device: torch.device) -> None:
    """A λ tensor must be real floating (not bool, integer or complex) and on the queries' device.

    A 0-dim CPU tensor is accepted with CUDA queries, as torch treats it as a scalar.
    """
    if not lam.is_floating_point():
        raise ValueError(f"{name} must be a real floating tensor, got dtype {lam.dtype}")
    if lam.device != device and not (lam.dim() == 0 and lam.device.type == "cpu"):
        raise ValueError(f"{name} must be on the queries' device {device}, got {lam.device}")


def check_scale(scale, head_dim: int) -> float:
    """``scale`` or its default ``head_dim ** -0.5``, validated."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not 0 < scale < float("inf"):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return float(scale)
