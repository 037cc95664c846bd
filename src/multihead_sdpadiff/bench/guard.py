"""The correctness guard: a method is timed only after its output (and, for ``fwd_bwd``, its input
gradients) agree with the float64 reference on a small case of the same structure.

Tolerance follows what the dtype can do, not a fixed number: the allowed relative error is
``max(FACTOR x e_plain, FLOOR[dtype])`` where ``e_plain`` is the error of a plain run in the same
dtype (the paper's equation with no upcast at op level; the reference module run in that dtype at
module level), against the same float64 truth. The truth runs on the very inputs the method gets,
upcast, so the error is the method's arithmetic, not the rounding of its inputs. Errors are
``max|out - truth| / max|truth|``. A method may bring its own truth and plain run
(``Method.truth``; GDA's, ``bench/cases_gda.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import multihead_sdpadiff as msd

from .cases import Case, Method, StandardMHA, _standard_v, make_tensors, plain_attention, plain_diff_attention

FACTOR = 4.0
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass(frozen=True)
class Verdict:
    status: str  # "pass", "wrong" or "error"
    error: float | None  # the worst relative error over the output and the gradients
    tol: float | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def rel_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    out = out.detach().to(torch.float64)
    if out.shape != truth.shape:
        return float("inf")
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def _module_truth(case: Case, t: dict, kind: str, dtype: torch.dtype):
    """A float64 (or ``dtype``) module with the case's weights: the reference module, or the
    standard layer with plain attention."""
    if kind == "standard":
        m = StandardMHA(case.embed_dim, case.num_heads, case.num_kv_heads, attend=plain_attention,
                        device=case.device, dtype=dtype)
        m.load_state_dict({n: w.to(dtype) for n, w in t["weights"].items()
                           if n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight")})
        return m
    m = msd.MultiheadDiffAttn(case.embed_dim, 0, case.num_heads, case.num_kv_heads, impl="reference",
                              device=case.device, dtype=dtype)
    m.load_state_dict({n: w.to(dtype) for n, w in t["weights"].items()})
    return m


def _run_truth(case: Case, kind: str, tensors: dict, dtype: torch.dtype, upcast: bool, grad_out, truth=None):
    """Output (and input gradients) of the truth (``upcast`` = float64 reference) or of the plain
    run in ``dtype``, in the canonical layout. ``truth``: the method's own (``Method.truth``)."""
    names = ("q", "k", "v") if case.level == "op" else ("x",)
    leaves = {n: tensors[n].detach().to(dtype).requires_grad_(case.mode == "fwd_bwd") for n in names}
    with torch.enable_grad() if case.mode == "fwd_bwd" else torch.no_grad():
        if case.level == "op":
            q, k, v = leaves["q"], leaves["k"], leaves["v"]
            if truth is not None:
                out = truth(q, k, v, tensors["lam"].to(dtype), upcast)
            elif kind == "standard":
                out = plain_attention(q, k, _standard_v(v))
            elif kind == "diff_v2":
                from .cases_v2 import v2_truth

                out = v2_truth(q, k, v, tensors["lam"].to(dtype), upcast)
            elif upcast:
                out = msd.diff_attention(q, k, v, tensors["lam"].to(dtype), is_causal=True, impl="reference")
            else:
                out = plain_diff_attention(q, k, v, tensors["lam"])
        else:
            out = _module_truth(case, tensors, kind, dtype)(leaves["x"])
            if case.mode == "decode":
                out = out[:, -1:]
        grads = ()
        if case.mode == "fwd_bwd":
            grads = torch.autograd.grad(out, tuple(leaves.values()), grad_out.to(dtype))
    return out.detach(), tuple(g.detach() for g in grads)


def _truth_kind(method: Method) -> str:
    """The kind whose truth and output layout the check uses; a method with its own ``truth`` has
    V1's output layout ``(B, H, Lq, 2d)``."""
    if method.kind in ("standard", "diff_v2"):
        return method.kind
    if method.kind in ("diff", "peer") or method.truth is not None:
        return "diff"
    raise ValueError(f"{method.name}: kind {method.kind!r} has no truth of its own; give the Method a truth")


def check_method(method: Method, case: Case, seed: int = 0) -> Verdict:
    """Run ``method`` on the small ``case`` in the case dtype and compare with the float64 truth."""
    try:
        return _check(method, case, seed)
    except Exception as exc:  # noqa: BLE001 - a method that cannot even run the check is reported, not fatal
        return Verdict("error", None, None, f"{type(exc).__name__}: {exc}")


def _check(method: Method, case: Case, seed: int) -> Verdict:
    base = make_tensors(case, seed)  # in the case dtype
    kind = _truth_kind(method)
    grad_out = None
    if case.mode == "fwd_bwd":
        shape = _canonical_shape(case, kind)
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1),
                               dtype=torch.float64).to(case.device)
    # Decode: op level draws one query against N keys; module level compares the cached step
    # with the last position of the truth's full pass.
    if method.truth is not None and case.level != "op":
        raise ValueError(f"{method.name}: a method's own truth is for op-level cases, got level {case.level!r}")
    truth, truth_grads = _run_truth(case, kind, base, torch.float64, True, grad_out, method.truth)
    plain, plain_grads = _run_truth(case, kind, base, case.dtype, False, grad_out, method.truth)

    tensors = _fresh(base, requires_grad=case.mode == "fwd_bwd")
    names = ("q", "k", "v") if case.level == "op" else ("x",)
    if case.mode == "fwd_bwd":
        state = method.prepare(case, tensors)
        out = method.canonical(method.run(state))
        grads = torch.autograd.grad(out, tuple(tensors[n] for n in names), grad_out.to(out.dtype))
    else:
        with torch.inference_mode():
            state = method.prepare(case, tensors)
            if "before_each" in state:
                state["before_each"]()
            out = method.canonical(method.run(state))
        grads = ()

    labels = ["output", *[f"d{n}" for n in names]] if grads else ["output"]
    errors = [rel_error(out, truth), *[rel_error(g, tg) for g, tg in zip(grads, truth_grads, strict=True)]]
    plain_errors = [rel_error(plain, truth), *[rel_error(g, tg) for g, tg in zip(plain_grads, truth_grads, strict=True)]]
    floor = FLOOR.get(case.dtype, 1e-2)
    worst, worst_tol, parts = 0.0, floor, []
    failed = []
    for label, err, base in zip(labels, errors, plain_errors, strict=True):
        tol = max(FACTOR * base, floor) if base == base else floor  # base is NaN only if the plain run overflows
        parts.append(f"{label} {err:.1e} (tol {tol:.1e})")
        if not err <= tol:  # NaN fails too
            failed.append(f"{label} rel. error {err:.2e} > tol {tol:.2e}")
        if not err <= worst or err != err:
            worst, worst_tol = err, tol
    if failed:
        return Verdict("wrong", worst, worst_tol, "; ".join(failed))
    return Verdict("pass", worst, worst_tol, ", ".join(parts))


def _canonical_shape(case: Case, kind: str) -> tuple[int, ...]:
    if case.level == "module":
        return (case.batch, case.q_len, case.embed_dim)
    if kind == "standard":
        return (case.batch, 2 * case.heads, case.q_len, case.head_dim)
    if kind == "diff_v2":
        return (case.batch, case.heads, case.q_len, case.head_dim)
    return (case.batch, case.heads, case.q_len, 2 * case.head_dim)


def _fresh(base: dict, *, requires_grad: bool) -> dict:
    """The method's own copies of the inputs (leaves for the gradient check)."""
    out = {}
    for name, value in base.items():
        if name == "weights":
            out[name] = {n: w.clone() for n, w in value.items()}
        elif name == "lam":
            out[name] = value.clone()
        else:
            out[name] = value.detach().clone().requires_grad_(requires_grad)
    return out
