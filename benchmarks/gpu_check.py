"""GPU check of the fused Triton differential attention (run on an H100).

    python gpu_check.py            # correctness + timings
    python gpu_check.py --sweep    # also try a few block configurations
    python gpu_check.py --no-compile   # without the torch-op / torch.compile checks

Shapes: bf16, B=1, H=6 differential heads (12 q/k maps of width d, 6 value heads
of width 2d), d in {64, 128}, N in {1024, 2048, 4096, 8192}, causal.

Correctness:
  * N=1024: against an explicit float32 reference (materialised scores), for the
    output and the gradients of q, k, v, lam; the kernel's error must stay within
    about 2x of the error of the same computation done with bf16 SDPA (see compare).
  * every N: against a float32 reference built from two SDPA calls (math/efficient
    backends), same 2x rule;
  * self-consistency: bit-identical reruns (determinism, no atomics); the last
    C query rows computed alone against all N keys (bottom-right causal, Lq < Lk)
    match the corresponding rows of the full run; (B, L, heads, d)-transposed
    (non-contiguous) inputs match contiguous ones.
  * the torch ops (d=64, N=1024, skipped with --no-compile): the ops are
    torch.library.triton_op ops (not the interpreter's custom_op);
    diff_attention(impl="triton") with gradients (through torch.ops.sdpadiff.triton_fwd/_bwd)
    agrees with the kernel called directly, and torch.compile(fullgraph=True) (Inductor) of
    forward+backward with eager, by the same 2x rule; and impl="auto" under
    torch.compile puts sdpadiff::triton_fwd in the graph (auto keeps triton).

Timing (triton.testing.do_bench): forward and forward+backward against
torch.nn.functional.scaled_dot_product_attention with 12 heads of width d, causal,
flash backend.  Note the differential op does twice the P@V work of that baseline
(two maps against a value of width 2d), so a ratio near 1.5 is expected even for
an equally efficient kernel.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import multihead_sdpadiff.ops.triton_fused as ft  # noqa: E402
from multihead_sdpadiff.ops.triton_fused import triton_diff_attention, triton_not_supported_reasons  # noqa: E402

DEV = "cuda"
B, H = 1, 6


def make(N, d, Hkv=H, dtype=torch.bfloat16, seed=0, layout="bhld"):
    g = torch.Generator(device=DEV).manual_seed(seed)
    if layout == "blhd":
        q = torch.randn(B, N, 2 * H, d, device=DEV, generator=g, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, N, 2 * Hkv, d, device=DEV, generator=g, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, N, Hkv, 2 * d, device=DEV, generator=g, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, 2 * H, N, d, device=DEV, generator=g, dtype=dtype)
        k = torch.randn(B, 2 * Hkv, N, d, device=DEV, generator=g, dtype=dtype)
        v = torch.randn(B, Hkv, N, 2 * d, device=DEV, generator=g, dtype=dtype)
    lam = 0.2 + 0.6 * torch.rand(H, device=DEV, generator=g)
    return q, k, v, lam


def explicit_reference(q, k, v, lam, scale):
    """float32, materialised scores, bottom-right causal, explicit head loop."""
    q, k, v, lam = q.float(), k.float(), v.float(), lam.float()
    N, M = q.shape[2], k.shape[2]
    Hkv = v.shape[1]
    group = H // Hkv
    keep = torch.ones(N, M, dtype=torch.bool, device=q.device).tril(M - N)
    outs = []
    for i in range(H):
        gi = i // group
        parts = []
        for m in (0, 1):
            s = (q[:, 2 * i + m] @ k[:, 2 * gi + m].transpose(-1, -2)) * scale
            s = s.masked_fill(~keep, float("-inf"))
            parts.append(torch.softmax(s, -1) @ v[:, gi])
        outs.append(parts[0] - lam[i] * parts[1])
    return torch.stack(outs, 1)


def sdpa_reference(q, k, v, lam, scale, dtype=torch.float32):
    """Two SDPA calls (Lq == Lk, causal), value heads repeated for the reference only."""
    q, k, v, lam = q.to(dtype), k.to(dtype), v.to(dtype), lam.to(dtype)
    group = H // v.shape[1]
    k1, k2 = k[:, 0::2].repeat_interleave(group, 1), k[:, 1::2].repeat_interleave(group, 1)
    vv = v.repeat_interleave(group, 1)
    o1 = F.scaled_dot_product_attention(q[:, 0::2], k1, vv, is_causal=True, scale=scale)
    o2 = F.scaled_dot_product_attention(q[:, 1::2], k2, vv, is_causal=True, scale=scale)
    return o1 - lam[None, :, None, None] * o2


def fwd_bwd(fn, q, k, v, lam, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, lam)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def rel_rms(a, r):
    return ((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()


def compare(tag, got, ref, base):
    """got/ref/base: lists of tensors (out, dq, dk, dv, dlam).

    Pass if the relative RMS error is within 2x the bf16 torch baseline's plus one
    bf16 epsilon, and the max error within 2x the baseline's plus two bf16 ulps of
    the largest reference value (single max-error samples are quantised to ulps).
    """
    ok = True
    eps = 2.0 ** -8
    for name, a, r, b in zip(("out", "dq", "dk", "dv", "dlam"), got, ref, base, strict=True):
        e, eb = max_err(a, r), max_err(b, r)
        rr, rb = rel_rms(a, r), rel_rms(b, r)
        top = r.float().abs().max().item()
        ulp = 2.0 ** (torch.tensor(max(top, 1e-30)).log2().floor().item() - 7)
        good = (torch.isfinite(a).all().item() and rr <= 2 * rb + eps and e <= 2 * eb + 2 * ulp)
        ok &= good
        print(f"  {tag:<28s} {name:<5s} max {e:.2e} (torch bf16 {eb:.2e})  "
              f"rel-rms {rr:.2e} (torch bf16 {rb:.2e})  {'ok' if good else 'FAIL'}")
    return ok


def check_correctness(d, Ns):
    ok = True
    scale = d ** -0.5
    kern = lambda q, k, v, lam: triton_diff_attention(q, k, v, lam, None, True, scale)  # noqa: E731
    for Hkv in (H, 2):  # MHA and GQA (3 heads per group)
        for N in Ns:
            q, k, v, lam = make(N, d, Hkv=Hkv, seed=N + d)
            reasons = triton_not_supported_reasons(q, k, v, lam, None, True)
            assert not reasons, reasons
            dout = torch.randn(B, H, N, 2 * d, device=DEV, dtype=torch.bfloat16)
            got = fwd_bwd(kern, q, k, v, lam, dout)
            got = [got[0], *got[1]]
            # bf16 baseline: two bf16 SDPA calls (flash/efficient kernels)
            base = fwd_bwd(lambda *t: sdpa_reference(*t, scale, dtype=torch.bfloat16), q, k, v, lam, dout)
            base = [base[0], *base[1]]
            if N <= 1024:
                ref = fwd_bwd(lambda *t: explicit_reference(*t, scale), q, k, v, lam, dout)
                ok &= compare(f"d={d} Hkv={Hkv} N={N} explicit", got, [ref[0], *ref[1]], base)
            ref = fwd_bwd(lambda *t: sdpa_reference(*t, scale), q, k, v, lam, dout)
            ok &= compare(f"d={d} Hkv={Hkv} N={N} sdpa-fp32", got, [ref[0], *ref[1]], base)

            # determinism
            again = fwd_bwd(kern, q, k, v, lam, dout)
            same = all(torch.equal(a, b) for a, b in zip(got, [again[0], *again[1]], strict=True))
            print(f"  d={d} Hkv={Hkv} N={N} rerun bit-identical: {same}")
            ok &= same

            # last C query rows alone (Lq < Lk, bottom-right causal)
            C = 256 + 7
            with torch.no_grad():
                tail = triton_diff_attention(q[:, :, -C:], k, v, lam, None, True, scale)
            e = max_err(tail, got[0][:, :, -C:])
            print(f"  d={d} Hkv={Hkv} N={N} tail-rows vs full: max diff {e:.3e}")
            ok &= e <= 2e-2

            # non-contiguous (B, L, heads, d) layout
            qt, kt, vt, _ = make(N, d, Hkv=Hkv, seed=N + d, layout="blhd")
            with torch.no_grad():
                o_t = triton_diff_attention(qt, kt, vt, lam, None, True, scale)
                o_c = triton_diff_attention(qt.contiguous(), kt.contiguous(), vt.contiguous(),
                                            lam, None, True, scale)
            e = max_err(o_t, o_c)
            print(f"  d={d} Hkv={Hkv} N={N} transposed layout vs contiguous: max diff {e:.3e}")
            ok &= e <= 1e-2
    return ok


def check_ops_and_compile(d=64, N=1024):
    """The strategy through the torch ops, eagerly and under torch.compile(fullgraph=True)."""
    from multihead_sdpadiff import diff_attention

    ok = True
    scale = d ** -0.5
    q, k, v, lam = make(N, d, seed=7)
    dout = torch.randn(B, H, N, 2 * d, device=DEV, dtype=torch.bfloat16)
    strategy = lambda q, k, v, lam: diff_attention(q, k, v, lam, is_causal=True, impl="triton")  # noqa: E731
    eager = fwd_bwd(strategy, q, k, v, lam, dout)  # needs gradients: goes through the ops
    kind = ft._ops_kind
    print(f"  ops kind after a differentiable call: {kind} (want triton_op)")
    ok &= kind == "triton_op"
    direct = fwd_bwd(lambda *t: triton_diff_attention(*t, None, True, scale), q, k, v, lam, dout)
    ref = fwd_bwd(lambda *t: sdpa_reference(*t, scale), q, k, v, lam, dout)
    ref = [ref[0], *ref[1]]
    # Each within 2x of the error of the other run of the same kernel (see compare).
    ok &= compare(f"d={d} N={N} strategy vs fp32", [eager[0], *eager[1]], ref, [direct[0], *direct[1]])

    torch._dynamo.reset()
    compiled = torch.compile(strategy, fullgraph=True)
    got = fwd_bwd(compiled, q, k, v, lam, dout)
    ok &= compare(f"d={d} N={N} compiled vs fp32", [got[0], *got[1]], ref, [eager[0], *eager[1]])

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    auto = torch.compile(lambda q, k, v, lam: diff_attention(q, k, v, lam, is_causal=True), fullgraph=True,
                         backend=capture)
    fwd_bwd(auto, q, k, v, lam, dout)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes]
    kept = any("sdpadiff.triton_fwd" in t for t in targets)
    print(f"  impl='auto' under torch.compile: sdpadiff::triton_fwd in the graph: {kept}")
    ok &= kept
    torch._dynamo.reset()
    return ok


def bench(d, Ns):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    scale = d ** -0.5
    print(f"\n timings d={d} (ms; ratio = triton diff-attn / SDPA flash, 12 heads of width {d})")
    print(f"  {'N':>6s} {'fwd':>8s} {'sdpa':>8s} {'ratio':>6s} | {'fwd+bwd':>8s} {'sdpa':>8s} {'ratio':>6s}")
    for N in Ns:
        q, k, v, lam = make(N, d)
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lam.requires_grad_()
        dout = torch.randn(B, H, N, 2 * d, device=DEV, dtype=torch.bfloat16)
        qs = torch.randn(B, 2 * H, N, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        ks = torch.randn(B, 2 * H, N, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        vs = torch.randn(B, 2 * H, N, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        douts = torch.randn_like(qs)

        def f_tri():
            with torch.no_grad():
                return triton_diff_attention(q, k, v, lam, None, True, scale)

        def fb_tri():
            out = triton_diff_attention(q, k, v, lam, None, True, scale)
            return torch.autograd.grad(out, (q, k, v, lam), dout)

        def f_sdpa():
            with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)

        def fb_sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
            return torch.autograd.grad(out, (qs, ks, vs), douts)

        t_f, t_fs = do_bench(f_tri), do_bench(f_sdpa)
        t_fb, t_fbs = do_bench(fb_tri), do_bench(fb_sdpa)
        print(f"  {N:6d} {t_f:8.3f} {t_fs:8.3f} {t_f / t_fs:6.2f} | {t_fb:8.3f} {t_fbs:8.3f} {t_fb / t_fbs:6.2f}")


def sweep(d, N=4096):
    """Time a few block configurations per kernel (others left at default)."""
    from triton.testing import do_bench

    scale = d ** -0.5
    q, k, v, lam = make(N, d)
    dout = torch.randn(B, H, N, 2 * d, device=DEV, dtype=torch.bfloat16)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lam.requires_grad_()
    out = triton_diff_attention(q, k, v, lam, None, True, scale)
    saved = dict(ft.CONFIG_OVERRIDE)
    cands = {
        "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2),
                (64, 32, 4, 3)],
        "bwd_kv": [(32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2),
                   (64, 32, 4, 2)],
        "bwd_q": [(64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
    }
    print(f"\n config sweep d={d} N={N} (BLOCK_M, BLOCK_N, warps, stages): ms")
    for kind, lst in cands.items():
        for bm, bn, w, s in lst:
            ft.CONFIG_OVERRIDE.clear()
            ft.CONFIG_OVERRIDE.update(saved)
            ft.CONFIG_OVERRIDE[kind] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            try:
                if kind == "fwd":
                    def fn():
                        with torch.no_grad():
                            return triton_diff_attention(q, k, v, lam, None, True, scale)
                else:
                    def fn():
                        return torch.autograd.grad(out, (q, k, v, lam), dout, retain_graph=True)
                t = do_bench(fn)
                print(f"  {kind:<7s} {(bm, bn, w, s)}: {t:.3f}")
            except Exception as e:  # e.g. out of shared memory
                print(f"  {kind:<7s} {(bm, bn, w, s)}: failed ({type(e).__name__}: {str(e)[:80]})")
    ft.CONFIG_OVERRIDE.clear()
    ft.CONFIG_OVERRIDE.update(saved)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--Ns", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--check-Ns", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch-op and torch.compile checks")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    os.environ.pop("TRITON_INTERPRET", None)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    ok = True
    for d in args.dims:
        print(f"\n correctness d={d}")
        ok &= check_correctness(d, args.check_Ns)
    if not args.no_compile:
        print("\n torch ops and torch.compile(fullgraph=True), d=64 N=1024")
        ok &= check_ops_and_compile()
    for d in args.dims:
        bench(d, args.Ns)
    if args.sweep:
        for d in args.dims:
            sweep(d)
    print("\nALL CHECKS PASSED" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
