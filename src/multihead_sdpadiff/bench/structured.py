"""``sdpadiff bench --window W`` / ``--docs K``: sliding windows and packed documents.

For each length N it times, in one interleaved run (so load from other processes lands on all):

* ``diff``: the differential op (``--impls``, default ``auto``) with the structure: causal with
  ``window = (W - 1, 0)`` (transformers' ``sliding_window = W``), and/or ``K`` packed documents of
  ``N / K`` tokens through :func:`~multihead_sdpadiff.diff_attention_varlen` (causal per document).
* ``diff_dense``: the same op, dense causal over all N keys: the ratio the targets are stated in.
* ``standard``: standard causal attention of the same width (SDPA over the 2H maps of width d)
  with the same structure as one SDPA call with an explicit band / block-diagonal mask.
* ``standard_dense``: SDPA with ``is_causal=True`` over all N keys.
* ``flex``: FlexAttention (compiled) with the structure's block mask, where it runs here.

Every method's output is first checked on a small case of the same structure (N = ``check_len``)
against a float64 run of the same structure (the ``reference`` strategy for the differential op, a
plain masked softmax for standard attention). A method that fails, or that cannot run, is a
missing value with its reason. Forward only (``fwd``) or forward and backward (``fwd_bwd``).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import multihead_sdpadiff as msd

from .timing import Sampler, interleaved

__all__ = ["run_structured"]


def _cu(n: int, docs: int, device) -> torch.Tensor:
    bounds = [round(i * n / docs) for i in range(docs + 1)]
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _structure_mask(n: int, window: int | None, docs: int | None, device) -> torch.Tensor:
    """Bool (N, N): causal, within the window and within the document (True = may attend)."""
    j = torch.arange(n, device=device)[:, None]
    t = torch.arange(n, device=device)[None]
    vis = t <= j
    if window is not None:
        vis &= t > j - window
    if docs is not None:
        doc = torch.bucketize(torch.arange(n, device=device), _cu(n, docs, device)[1:].long(), right=True)
        vis &= doc[:, None] == doc[None]
    return vis


def _tensors(n, h, hkv, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(1, 2 * h, n, d), rnd(1, 2 * hkv, n, d), rnd(1, hkv, n, 2 * d)
    lam = torch.full((h,), 0.5, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    sv = v.unflatten(-1, (2, d)).transpose(2, 3).reshape(1, 2 * hkv, n, d)  # standard layout of the same v
    return q, k, v, lam, sv


def _methods(n, window, docs, impl, h, hkv, d, device, flex=True):
    """name -> (fn(q, k, v, lam, sv) -> out, reason it cannot run or None)."""
    win = (window - 1, 0) if window is not None else None
    cu = _cu(n, docs, device) if docs is not None else None
    longest = int((cu[1:] - cu[:-1]).max()) if cu is not None else n

    def diff(q, k, v, lam, sv, impl=impl):
        if cu is None:
            return msd.diff_attention(q, k, v, lam, is_causal=True, window=win, impl=impl)
        return msd.diff_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), lam, cu, cu,
                                         longest, longest, is_causal=True, window=win, impl=impl)

    def diff_dense(q, k, v, lam, sv):
        return msd.diff_attention(q, k, v, lam, is_causal=True, impl=impl)

    mask = _structure_mask(n, window, docs, device)
    gqa = h != hkv

    def standard(q, k, v, lam, sv):
        return F.scaled_dot_product_attention(q, k, sv, attn_mask=mask, enable_gqa=gqa)

    def standard_dense(q, k, v, lam, sv):
        return F.scaled_dot_product_attention(q, k, sv, is_causal=True, enable_gqa=gqa)

    methods = {"diff": (diff, None), "diff_dense": (diff_dense, None), "standard": (standard, None),
               "standard_dense": (standard_dense, None)}
    if not flex:
        methods["flex"] = (None, "not requested (flex=False)")
        return methods
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc_id = (torch.bucketize(torch.arange(n, device=device), cu[1:].long(), right=True)
                  if cu is not None else None)

        def mask_mod(b, hh, qi, ki):
            ok = ki <= qi
            if window is not None:
                ok = ok & (ki > qi - window)
            if doc_id is not None:
                ok = ok & (doc_id[qi] == doc_id[ki])
            return ok

        block_mask = create_block_mask(mask_mod, None, None, n, n, device=str(device))
        compiled = torch.compile(flex_attention, dynamic=False)

        def flex(q, k, v, lam, sv):
            return compiled(q, k, sv, block_mask=block_mask, enable_gqa=gqa)

        methods["flex"] = (flex, None)
    except Exception as exc:  # noqa: BLE001 - recorded as a missing value with its reason
        methods["flex"] = (None, f"{type(exc).__name__}: {exc}")
    return methods


def _check(name, fn, n, window, docs, h, hkv, d, device) -> str | None:
    """None if ``fn`` matches a float64 run of the same structure at this small N, else why not."""
    q, k, v, lam, sv = _tensors(n, h, hkv, d, torch.float32, device, seed=1)
    try:
        out = fn(q, k, v, lam, sv)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    if name.startswith("diff"):
        w = window if name == "diff" else None
        dd = docs if name == "diff" else None
        mask = _structure_mask(n, w, dd, device)
        want = msd.diff_attention(q.double(), k.double(), v.double(), lam.double(), attn_mask=mask, impl="reference")
        if dd is not None:
            out = out.transpose(0, 1).unsqueeze(0)
    else:
        dense = name == "standard_dense"
        mask = _structure_mask(n, None if dense else window, None if dense else docs, device)
        rep = h // hkv
        s = (q.double() @ k.double().repeat_interleave(rep, 1).transpose(-1, -2)) * d**-0.5
        s = s.masked_fill(~mask, float("-inf"))
        want = s.softmax(-1) @ sv.double().repeat_interleave(rep, 1)
    err = ((out.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
    return None if err < 1e-4 else f"relative error {err:.2e} against float64"


def run_structured(*, seq_lens, window, docs, impl, embed_dim, num_heads, num_kv_heads, dtype, device, threads,
                   modes, min_time, min_reps, max_time, check_len, out_dir: Path, command_line: str,
                   flex: bool = True) -> dict:
    torch.set_num_threads(threads)
    h, hkv, d = num_heads // 2, num_kv_heads // 2, embed_dim // num_heads
    rows = []
    for n in seq_lens:
        for mode in modes:
            methods = _methods(n, window, docs, impl, h, hkv, d, device, flex)
            small = min(check_len, n)
            small_window = window and min(window, max(2, small // 4))
            small_docs = docs and min(docs, small)
            small_methods = _methods(small, small_window, small_docs, impl, h, hkv, d, device, flex)
            q, k, v, lam, sv = _tensors(n, h, hkv, d, dtype, device, seed=0)
            grad = mode == "fwd_bwd"
            for t in (q, k, v, sv):
                t.requires_grad_(grad)
            samplers, names = [], []
            for name, (fn, reason) in methods.items():
                row = {"mode": mode, "seq_len": n, "method": name, "window": window, "docs": docs,
                       "median_s": None, "iqr_s": None, "samples": 0, "status": "ok", "reason": None}
                rows.append(row)
                if fn is None:
                    row.update(status="unavailable", reason=reason)
                    continue
                bad = _check(name, small_methods[name][0], small, small_window, small_docs, h, hkv, d, device)
                if bad is not None:
                    row.update(status="wrong" if bad.startswith("relative") else "error", reason=bad)
                    continue

                def call(fn=fn, args=(q, k, v, lam, sv), grad=grad):
                    out = fn(*args)
                    if grad:
                        out.sum().backward()
                    return out

                try:
                    start = time.perf_counter()
                    call()  # warm-up (and compile, for flex)
                    call()
                    est = (time.perf_counter() - start) / 2
                except Exception as exc:  # noqa: BLE001
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
                    continue
                samplers.append(Sampler(call, threads=threads, estimate_s=est))
                names.append(row)

            def failed(i, exc, names=names):
                names[i].update(status="error", reason=f"{type(exc).__name__}: {exc}")

            interleaved(samplers, min_time=min_time, min_reps=min_reps, max_time=max_time, on_error=failed)
            for s, row in zip(samplers, names, strict=True):
                if row["status"] == "ok":
                    t = s.timing()
                    row.update(median_s=t.median_s, iqr_s=t.iqr_s, samples=t.samples)
    by = {(r["mode"], r["seq_len"], r["method"]): r["median_s"] for r in rows}
    for r in rows:
        for base in ("diff_dense", "standard"):
            b = by.get((r["mode"], r["seq_len"], base))
            r[f"ratio_to_{base}"] = r["median_s"] / b if r["median_s"] and b else None
    doc = {"kind": "structured", "command": command_line, "torch": torch.__version__, "device": str(device),
           "cpu": platform.processor() or platform.machine(), "threads": threads, "dtype": str(dtype),
           "impl": impl, "embed_dim": embed_dim, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
           "window": window, "docs": docs, "results": rows,
           "median_of_medians_note": "ratios are of medians from one interleaved run"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1))
    return doc


def format_structured(doc: dict) -> str:
    lines = [f"structure: window={doc['window']} docs={doc['docs']}, {doc['dtype']}, {doc['threads']} threads, "
             f"impl={doc['impl']}",
             f"{'mode':8} {'N':>6} {'method':15} {'median ms':>10} {'IQR ms':>8} {'/diff_dense':>11} {'/standard':>10}  note"]
    for r in doc["results"]:
        ms = f"{r['median_s'] * 1e3:.2f}" if r["median_s"] else "-"
        iqr = f"{r['iqr_s'] * 1e3:.2f}" if r["iqr_s"] is not None else "-"
        a = f"{r['ratio_to_diff_dense']:.3f}" if r["ratio_to_diff_dense"] else "-"
        b = f"{r['ratio_to_standard']:.3f}" if r["ratio_to_standard"] else "-"
        note = "" if r["status"] == "ok" else f"{r['status']}: {(r['reason'] or '')[:90]}"
        lines.append(f"{r['mode']:8} {r['seq_len']:>6} {r['method']:15} {ms:>10} {iqr:>8} {a:>11} {b:>10}  {note}")
    return "\n".join(lines)

