"""``sdpadiff bench --op gda``: the strategies of grouped differential attention (GDA) at op level.

A GDA case reuses V1's case and tensors, read as GDA with ``r`` signal heads per noise head:

* ``N_s = num_heads / 2`` signal heads (V1's H differential heads), ``N_n = N_s / r`` noise heads,
  ``P = num_kv_heads / 2`` kv pairs (V1's kv groups), ``d = embed_dim / num_heads``;
* ``q_signal (B, N_s, Lq, d)`` is map 1 of every V1 head (``q[:, 0::2]``) and ``q_noise
  (B, N_n, Lq, d)`` is map 2 of V1 heads ``0, r, 2r, …`` (``q[:, 1::2r]``); ``k (B, 2P, N, d)``,
  ``v (B, P, N, 2d)`` and ``λ (N_s,)`` are V1's as they are. Both are copied contiguous outside
  the timed call.

So signal head ``j`` computes exactly V1 head ``j``'s first map, noise head ``g`` V1 head
``g·r``'s second map, over the same keys and values, and at ``r = 1`` GDA and V1 compute the same
thing. ``P`` must divide ``N_n`` (the alignment :func:`grouped_diff_attention` supports).

The methods: ``standard`` (causal SDPA over ``2·N_s`` maps of width d: the output width of GDA,
``N_s·2d``), the V1 yardstick ``v1_<impl>`` (``diff_attention`` with ``N_s`` separate
differential heads, each with its own noise map: what GDA saves) and ``gda_<name>`` for every
strategy of ``REGISTRY_GROUPED`` plus ``auto``, read when the methods are built, so a strategy
registered later appears without a change here. Each ``gda_*`` method is checked against
``grouped_diff_attention(impl="reference")`` in float64 on the same inputs, with the tolerance
scaled by a plain low-precision run of GDA's equation.

FLOPs: a signal head costs ``(6 + 2/r)·d`` per (query, key) (its own QKᵀ, ``1/r`` of its noise
head's QKᵀ, one product with a value of width 2d) against ``8·d`` for standard attention over its
two maps of width d, so every GDA row counts ``(6 + 2/r) / 8`` of the standard FLOPs.
"""

from __future__ import annotations

import dataclasses

import torch

from multihead_sdpadiff.ops import grouped as _grouped

from .cases import Case, Method, _auto_method, _standard_op_method, _strategy_method, plain_attention

KIND = "diff_gda"

#: Signal heads per noise head in Motif-2-12.7B (32 signal, 8 noise): ``--gda-ratio``'s default.
DEFAULT_RATIO = 4


def gda_sizes(case: Case, ratio: int) -> tuple[int, int, int]:
    """``(N_s, N_n, P)`` of ``case`` read as GDA with ``ratio`` signal heads per noise head."""
    return case.heads, case.heads // ratio, case.kv_heads


def gda_shape_reasons(num_heads: int, num_kv_heads: int, ratio: int) -> list[str]:
    """Why V1's ``num_heads`` / ``num_kv_heads`` cannot be read as GDA with ``ratio`` (empty if they can)."""
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        return [f"the GDA ratio r must be a positive int, got {ratio!r}"]
    if num_heads % 2 or num_kv_heads % 2:
        return [f"num_heads ({num_heads}) and num_kv_heads ({num_kv_heads}) must be even: "
                f"N_s = num_heads / 2 signal heads, P = num_kv_heads / 2 kv pairs"]
    ns, pairs = num_heads // 2, num_kv_heads // 2
    if ns % ratio:
        return [f"r = {ratio} must divide the N_s = num_heads / 2 = {ns} signal heads"]
    if (ns // ratio) % pairs:
        return [f"the P = num_kv_heads / 2 = {pairs} kv pairs must divide the N_n = N_s / r = {ns // ratio} "
                f"noise heads"]
    return []


def gda_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ratio: int):
    """V1's ``q (B, 2N_s, Lq, d)``, ``k``, ``v`` → GDA's ``q_signal (B, N_s, Lq, d)``, ``q_noise
    (B, N_s / r, Lq, d)``, ``k``, ``v`` (differentiable; the queries copied contiguous)."""
    return q[:, 0::2].contiguous(), q[:, 1 :: 2 * ratio].contiguous(), k, v


def plain_gda(qs, qn, k, v, lam) -> torch.Tensor:
    """GDA's equation in the inputs' dtype with no upcast (the guard's low-precision baseline).

    ``qs (B, N_s, Lq, d)``, ``qn (B, N_n, Lq, d)``, ``k (B, 2P, Lk, d)``, ``v (B, P, Lk, 2d)``, causal
    bottom-right. Signal head ``j`` reads pair ``j // (N_s / P)``, noise head ``g`` pair
    ``g // (N_n / P)``, and signal ``j`` subtracts noise ``j // r``. Returns ``(B, N_s, Lq, 2d)``.
    """
    r = qs.shape[1] // qn.shape[1]
    signal = plain_attention(qs, k[:, 0::2], v)  # (B, N_s, Lq, 2d)
    noise = plain_attention(qn, k[:, 1::2], v)  # (B, N_n, Lq, 2d)
    return signal - lam.to(qs.dtype).view(1, -1, 1, 1) * noise.repeat_interleave(r, dim=1)


def gda_truth(ratio: int):
    """The guard's truth for GDA with ``ratio``: ``f(q, k, v, lam, upcast)`` on V1's tensors, the
    float64 GDA reference (``upcast``) or :func:`plain_gda` in the inputs' dtype."""
    def truth(q, k, v, lam, upcast: bool) -> torch.Tensor:
        qs, qn, k2, v2 = gda_inputs(q, k, v, ratio)
        if upcast:
            return _grouped.grouped_diff_attention(qs, qn, k2, v2, lam, is_causal=True, impl="reference")
        return plain_gda(qs, qn, k2, v2, lam)

    return truth


def _check_inputs(case: Case, ratio: int) -> _grouped.GroupedInputs:
    """Inputs of this case's shapes (empty), needing gradients in ``fwd_bwd``, for capability checks."""
    b, d, lq, n = case.batch, case.head_dim, case.q_len, case.seq_len
    ns, n_noise, pairs = gda_sizes(case, ratio)
    kw = {"device": case.device, "dtype": case.dtype, "requires_grad": case.mode == "fwd_bwd"}
    qs, qn = torch.empty(b, ns, lq, d, **kw), torch.empty(b, n_noise, lq, d, **kw)
    k, v = torch.empty(b, 2 * pairs, n, d, **kw), torch.empty(b, pairs, n, 2 * d, **kw)
    with torch.enable_grad():
        return _grouped._prepare(qs, qn, k, v, 0.5, None, True, d**-0.5)


def _gda_method(name: str, ratio: int) -> Method:
    flops = (6 + 2 / ratio) / 8

    def unavailable(case: Case) -> list[str]:
        reasons = gda_shape_reasons(case.num_heads, case.num_kv_heads, ratio)
        if reasons:
            return reasons
        registry = _grouped.REGISTRY_GROUPED  # read at each call: a registry swapped in by a test is seen
        try:
            inputs = _check_inputs(case, ratio)
            if name == "auto":
                registry.resolve("auto", inputs)
                return []
            return list(registry.get(name).not_supported_reasons(inputs))
        except ValueError as exc:
            return [str(exc)]

    def prepare(case: Case, t: dict) -> dict:
        qs, qn, k, v = gda_inputs(t["q"], t["k"], t["v"], ratio)
        return {"q_signal": qs, "q_noise": qn, "k": k, "v": v, "lam": t["lam"],
                "grad_names": ("q_signal", "q_noise", "k", "v")}

    def run(s: dict) -> torch.Tensor:
        return _grouped.grouped_diff_attention(s["q_signal"], s["q_noise"], s["k"], s["v"], s["lam"],
                                               is_causal=True, impl=name)

    def resolve(case: Case) -> str:
        return _grouped.REGISTRY_GROUPED.resolve("auto", _check_inputs(case, ratio))[0].name

    if name == "auto":
        return Method("gda_auto", KIND, f"GDA (r = {ratio}): the dispatcher's choice", flops, "depends",
                      unavailable, prepare, run, resolve=resolve, truth=gda_truth(ratio),
                      strategy_of=lambda n: _grouped.REGISTRY_GROUPED.get(n))
    s = _grouped.REGISTRY_GROUPED.get(name)
    return Method(f"gda_{name}", KIND, f"GDA (r = {ratio}): {s.summary}", flops, s.score_memory,
                  unavailable, prepare, run, truth=gda_truth(ratio))


def v1_yardstick_name(v1_impl: str) -> str:
    return f"v1_{v1_impl}"


def _v1_yardstick(v1_impl: str) -> Method:
    base = _auto_method() if v1_impl == "auto" else _strategy_method(v1_impl)
    return dataclasses.replace(
        base, name=v1_yardstick_name(v1_impl),
        summary=f"N_s separate differential heads (each its own noise map), V1 impl={v1_impl!r}: {base.summary}")


def build_methods_gda(level: str, ratio: int = DEFAULT_RATIO, v1_impl: str = "auto") -> list[Method]:
    """``standard``, the V1 yardstick ``v1_<v1_impl>``, then ``gda_<name>`` for every strategy
    registered in ``REGISTRY_GROUPED`` now, then ``gda_auto``."""
    if level != "op":
        raise ValueError(f"--op gda runs at op level only, got level {level!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int (signal heads per noise head), got {ratio!r}")
    import multihead_sdpadiff as msd

    if v1_impl not in msd.IMPLS:
        raise ValueError(f"v1_impl must be one of {msd.IMPLS}, got {v1_impl!r}")
    gda = [_gda_method(n, ratio) for n in _grouped.REGISTRY_GROUPED.names()]
    return [_standard_op_method(), _v1_yardstick(v1_impl), *gda]
