"""``sdpadiff check``: run every strategy against the reference on this device and print a table."""

from __future__ import annotations

import torch

from .ops import IMPLS, OpInputs, get_strategy
from .ops import _prepare as prepare_inputs

# (name, B, H, Hkv, Lq, Lk, d, causal, mask kind)
CASES = (
    ("MHA causal", 2, 4, 4, 97, 97, 32, True, None),
    ("GQA 2:1 causal", 2, 4, 2, 97, 97, 32, True, None),
    ("GQA 3:1 padding mask", 2, 6, 2, 65, 65, 24, True, "padding"),
    ("MHA bool mask", 1, 2, 2, 33, 33, 64, False, "bool"),
    ("MHA additive mask", 1, 2, 2, 33, 33, 64, False, "additive"),
    ("cache Lq<Lk causal", 2, 4, 2, 5, 40, 32, True, None),
)

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _make_case(b, h, hkv, lq, lk, d, kind, device, dtype, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    q, k, v = rnd(b, 2 * h, lq, d), rnd(b, 2 * hkv, lk, d), rnd(b, hkv, lk, 2 * d)
    lam = torch.rand(h, generator=gen, dtype=torch.float64).to(device) * 0.8
    mask = None
    if kind == "padding":
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        mask[0, ..., : lk // 3] = False
    elif kind == "bool":
        mask = torch.rand(b, h, lq, lk, generator=gen) > 0.3
    elif kind == "additive":
        mask = torch.randn(b, 1, lq, lk, generator=gen, dtype=torch.float64)
        mask[..., 0, :] = float("-inf")  # one row that sees nothing
    return q, k, v, lam, None if mask is None else mask.to(device)


def run_check(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> list[dict]:
    """Each strategy against the float64 reference on :data:`CASES`; returns one row per pair."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for name, b, h, hkv, lq, lk, d, causal, kind in CASES:
        q, k, v, lam, mask = _make_case(b, h, hkv, lq, lk, d, kind, device, dtype, gen)
        truth_inputs = prepare_inputs(q.double(), k.double(), v.double(), lam, mask, causal, None)
        truth = get_strategy("reference")(truth_inputs)
        inputs: OpInputs = prepare_inputs(q, k, v, lam, mask, causal, None)
        for impl in IMPLS:
            if impl == "auto":
                continue
            reasons = get_strategy(impl).not_supported_reasons(inputs)
            if reasons:
                rows.append({"case": name, "impl": impl, "error": None, "status": "skip: " + "; ".join(reasons)})
                continue
            try:
                out = get_strategy(impl)(inputs)
            except Exception as exc:  # a failing strategy is reported, not fatal
                rows.append({"case": name, "impl": impl, "error": None, "status": f"error: {exc}"})
                continue
            err = (out.double() - truth).abs().max().item()
            ok = err <= TOLERANCE[dtype] and not torch.isnan(out).any().item()
            rows.append({"case": name, "impl": impl, "error": err, "status": "pass" if ok else "FAIL"})
    return rows


def count_rows(rows: list[dict]) -> dict[str, int]:
    """``{"passed", "failed", "skipped"}``: a strategy that refused the case (its reason in the
    status) is a skip, not a pass; a FAIL or an error is a failure."""
    skipped = sum(r["status"].startswith("skip") for r in rows)
    failed = sum(r["status"] == "FAIL" or r["status"].startswith("error") for r in rows)
    return {"passed": len(rows) - skipped - failed, "failed": failed, "skipped": skipped}


def format_table(rows: list[dict]) -> str:
    width = max(len(r["case"]) for r in rows)
    impw = max(len(r["impl"]) for r in rows)
    lines = [f"{'case':<{width}}  {'impl':<{impw}}  {'max abs error':>13}  status"]
    for r in rows:
        err = "" if r["error"] is None else f"{r['error']:.2e}"
        lines.append(f"{r['case']:<{width}}  {r['impl']:<{impw}}  {err:>13}  {r['status']}")
    return "\n".join(lines)
