"""``sdpadiff bench --op v2``: the strategies of :func:`multihead_sdpadiff.diff_attention_v2` at op level.

A V2 case reuses V1's case and tensors: the ``2H`` query maps ``q (B, 2H, Lq, d)`` as they are,
and ``Hkv = num_kv_heads / 2`` kv heads of width ``d`` taken from V1's tensors (``k[:, 0::2]`` and
the first half of ``v``), so ``Hkv`` divides ``H`` whenever the V1 case is valid. λ is V1's
``(H,)`` draw (V2 allows per-token λ; a per-head one costs the same). The standard row is the
same as V1's (2H maps of width d over 2Hkv kv maps, one causal SDPA call); FLOPs are relative to
it, so V2's SDPA strategy is 1.0 plus the subtraction.

The guard compares each method with :func:`diff_attention_v2` ``impl="reference"`` in float64 on
the same inputs, and scales the tolerance by a plain low-precision run of V2's equations.
"""

from __future__ import annotations

import torch

import multihead_sdpadiff as msd
from multihead_sdpadiff.ops.v2 import REGISTRY_V2
from multihead_sdpadiff.ops.v2 import _prepare as prepare_v2_inputs

from .cases import Case, Method, _standard_op_method, plain_attention

KIND = "diff_v2"


def v2_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """V1's ``q (B, 2H, Lq, d)``, ``k (B, 2Hkv, N, d)``, ``v (B, Hkv, N, 2d)`` → V2's q, ``k (B, Hkv, N, d)``
    and ``v (B, Hkv, N, d)`` (differentiable views)."""
    return q, k[:, 0::2], v[..., : v.shape[-1] // 2]


def v2_truth(q, k, v, lam, upcast: bool) -> torch.Tensor:
    """The float64 V2 reference (``upcast``) or V2's equations computed plainly in the inputs' dtype."""
    q2, k2, v2 = v2_inputs(q, k, v)
    if upcast:
        return msd.diff_attention_v2(q2, k2, v2, lam, is_causal=True, impl="reference")
    out = plain_attention(q2, k2, v2)  # (B, 2H, Lq, d); map m reads kv head m // (2H / Hkv)
    return out[:, 0::2] - lam.to(q.dtype).view(1, -1, 1, 1) * out[:, 1::2]


def _check_inputs(case: Case):
    b, h, hkv, d, n = case.batch, case.heads, case.kv_heads, case.head_dim, case.seq_len
    kw = {"device": case.device, "dtype": case.dtype}
    q = torch.empty(b, 2 * h, case.q_len, d, **kw)
    kv = torch.empty(b, hkv, n, d, **kw)
    return prepare_v2_inputs(q, kv, kv, 0.5, None, True, d**-0.5)


def _state(case: Case, t: dict) -> dict:
    q, k, v = v2_inputs(t["q"], t["k"], t["v"])
    return {"q": q, "k": k, "v": v, "lam": t["lam"], "grad_names": ("q", "k", "v")}


def _v2_method(name: str) -> Method:
    def unavailable(case: Case) -> list[str]:
        if name == "auto":
            try:
                REGISTRY_V2.resolve("auto", _check_inputs(case))
            except ValueError as exc:
                return [str(exc)]
            return []
        return list(REGISTRY_V2.get(name).not_supported_reasons(_check_inputs(case)))

    def run(s: dict) -> torch.Tensor:
        return msd.diff_attention_v2(s["q"], s["k"], s["v"], s["lam"], is_causal=True, impl=name)

    if name == "auto":
        def flops(case: Case) -> float:
            return REGISTRY_V2.resolve("auto", _check_inputs(case))[0].flops

        return Method("v2_auto", KIND, "V2: the dispatcher's choice", flops, "O(N)", unavailable, _state, run)
    s = REGISTRY_V2.get(name)
    return Method(f"v2_{name}", KIND, f"V2: {s.summary}", s.flops, s.score_memory, unavailable, _state, run)


def build_methods_v2(level: str) -> list[Method]:
    """``standard`` first, then every name in :data:`~multihead_sdpadiff.IMPLS_V2` as ``v2_<name>``."""
    if level != "op":
        raise ValueError(f"--op v2 runs at op level only, got level {level!r}")
    return [_standard_op_method(), *(_v2_method(n) for n in msd.IMPLS_V2)]
