"""Triton kernels for fused differential attention (private module).

This module imports triton at import time, so ``fused_triton`` only imports it
lazily, the first time a kernel is actually needed.

Notation used throughout:
  * one *program* handles one (batch, differential head) pair and a tile of
    query rows (forward, dq) or one (batch, kv group) pair and a tile of key
    rows (dk/dv);
  * map 1 / map 2 are the two softmax maps of a differential head, built from
    q maps 2h / 2h+1 and k maps 2g / 2g+1, sharing the value head g;
  * scores are kept in base-2 units when ``EXP2`` is set (the softmax scale
    and the additive mask are pre-multiplied by log2(e)), otherwise (float64)
    in natural units;
  * a "bias" tile holds 0 for visible (row, key) pairs, -inf for hidden ones
    and the (scaled) additive mask value otherwise.  It is built once per tile
    and added to the scores of both maps;
  * every query row j sees the keys [LO[j], HI[j]) (causal, sliding window and
    packed sequences are all such intervals; both bounds are non-decreasing in
    j), intersected with the optional mask.  Tiles outside every row's interval
    are never visited;
  * ``EDGE`` tiles are the ones that may contain hidden pairs because they
    cross some row's interval bound or the end of the sequence.  Interior
    tiles skip that bookkeeping.
"""

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with ACC accumulation.  UPCAST (interpreter + bfloat16 only) feeds
    float32 copies of the operands, because the interpreter's dot multiplies
    the raw bit patterns of bfloat16 tensors (triton-lang/triton#11584)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC, out_dtype=ACC)


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (see _mm)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=ACC)


@triton.jit
def _exp(x, EXP2: tl.constexpr):
    if EXP2:
        return tl.exp2(x)
    else:
        return tl.exp(x)


@triton.jit
def _log(x, EXP2: tl.constexpr):
    if EXP2:
        return tl.log2(x)
    else:
        return tl.log(x)


@triton.jit
def _bias_tile(qi, kj, lo, hi, Lq, Lk, mask_base, smm, smn, mask_scale,
               HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
               EDGE: tl.constexpr, ACC: tl.constexpr):
    """Bias for the tile spanned by query indices ``qi`` and key indices ``kj``.

    ``qi`` and ``kj`` are 2-D (one of them a row, the other a column vector), so
    the same helper serves the row-major (forward, dq) and the transposed (dk/dv)
    tiles; ``lo`` and ``hi`` are the rows' key intervals, shaped like ``qi``.
    Out-of-range pairs are always hidden; the interval rule (key kj is visible
    from query qi iff lo <= kj < hi) is only evaluated on EDGE tiles, the only
    ones where it can hide something.
    """
    ok = (qi < Lq) & (kj < Lk)
    if EDGE:
        ok = ok & (kj >= lo) & (kj < hi)
    if HAS_MASK:
        mval = tl.load(mask_base + qi * smm + kj * smn, mask=ok, other=0)
        if MASK_BOOL:
            ok = ok & (mval != 0)
            bias = tl.where(ok, 0.0, float("-inf")).to(ACC)
        else:
            bias = tl.where(ok, mval.to(ACC) * mask_scale, float("-inf")).to(ACC)
    else:
        bias = tl.where(ok, 0.0, float("-inf")).to(ACC)
    return bias


@triton.jit
def _key_range(LO, HI, start_m, offs_m, Lq, BLOCK_N: tl.constexpr):
    """The rows' intervals and the key tiles of the query tile starting at ``start_m``.

    Returns ``lo, hi`` (per row; rows past Lq repeat the last one) and the tile
    starts ``n_begin <= n_fs <= n_fe <= n_end``: tiles in [n_fs, n_fe) lie inside
    every row's interval (no per-element masking), those in [n_begin, n_fs) and
    [n_fe, n_end) are EDGE tiles.  Bounds are non-decreasing in the row, so the
    first row holds the smallest bounds and the last one the largest (the
    reductions below do not rely on it).
    """
    rows = tl.minimum(offs_m, Lq - 1)
    lo = tl.load(LO + rows)
    hi = tl.load(HI + rows)
    lo_first = tl.min(lo, 0)
    lo_last = tl.max(lo, 0)
    hi_first = tl.min(hi, 0)
    hi_last = tl.max(hi, 0)
    n_begin = lo_first // BLOCK_N * BLOCK_N
    n_end = tl.maximum(hi_last, n_begin)
    n_fs = tl.minimum(tl.maximum((lo_last + BLOCK_N - 1) // BLOCK_N * BLOCK_N, n_begin), n_end)
    n_fe = tl.minimum(tl.maximum(hi_first // BLOCK_N * BLOCK_N, n_fs), n_end)
    return lo, hi, n_begin, n_fs, n_fe, n_end


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------

@triton.jit
def _fwd_tile(q1, q2, k1_base, k2_base, v_base, skn, skd, svn, svd,
              m1, l1, acc1, m2, l2, acc2,
              start_n, offs_m, offs_nb, offs_d, offs_e, lo, hi,
              Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
              HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
              EDGE: tl.constexpr,
              EXP2: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """Fold one key tile into the two online-softmax states."""
    offs_n = start_n + offs_nb
    k_off = offs_n[:, None] * skn + offs_d[None, :] * skd
    v_off = offs_n[:, None] * svn + offs_e[None, :] * svd
    if EDGE:
        col_ok = (offs_n < Lk)[:, None]
        k1 = tl.load(k1_base + k_off, mask=col_ok, other=0.0)
        k2 = tl.load(k2_base + k_off, mask=col_ok, other=0.0)
        v = tl.load(v_base + v_off, mask=col_ok, other=0.0)
    else:
        k1 = tl.load(k1_base + k_off)
        k2 = tl.load(k2_base + k_off)
        v = tl.load(v_base + v_off)

    s1 = _mm(q1, tl.trans(k1), DOT_PREC, ACC, UPCAST) * qk_scale
    s2 = _mm(q2, tl.trans(k2), DOT_PREC, ACC, UPCAST) * qk_scale
    if HAS_MASK or EDGE:
        bias = _bias_tile(offs_m[:, None], offs_n[None, :], lo[:, None], hi[:, None], Lq, Lk,
                          mask_base, smm, smn, mask_scale,
                          HAS_MASK, MASK_BOOL, EDGE, ACC)
        s1 = s1 + bias
        s2 = s2 + bias

    # Map 1.  A row that has seen no visible key yet keeps m == -inf; the
    # exponent reference is then taken as 0 so that no (-inf) - (-inf) occurs.
    m1_new = tl.maximum(m1, tl.max(s1, 1))
    m1_ref = tl.where(m1_new == float("-inf"), 0.0, m1_new)
    alpha1 = _exp(m1 - m1_ref, EXP2)
    p1 = _exp(s1 - m1_ref[:, None], EXP2)
    l1 = l1 * alpha1 + tl.sum(p1, 1)
    acc1 = _mma(p1.to(v.dtype), v, acc1 * alpha1[:, None], DOT_PREC, ACC, UPCAST)
    # Map 2, same value tile.
    m2_new = tl.maximum(m2, tl.max(s2, 1))
    m2_ref = tl.where(m2_new == float("-inf"), 0.0, m2_new)
    alpha2 = _exp(m2 - m2_ref, EXP2)
    p2 = _exp(s2 - m2_ref[:, None], EXP2)
    l2 = l2 * alpha2 + tl.sum(p2, 1)
    acc2 = _mma(p2.to(v.dtype), v, acc2 * alpha2[:, None], DOT_PREC, ACC, UPCAST)
    return m1_new, l1, acc1, m2_new, l2, acc2


@triton.jit
def diff_attn_fwd_kernel(
    Q, K, V, LAM, MASK, LO, HI, O, O2, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    H, GROUP, Lq, Lk,
    qk_hi, qk_lo, mask_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    STORE_AUX: tl.constexpr, EXP2: tl.constexpr, ACC: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """O[b, h] = softmax(S1) V - lam[h] softmax(S2) V for one query tile.

    O and O2 (map 2's normalised output, kept for the backward) are contiguous
    (B, H, Lq, 2D); LSE is contiguous (B, H, 2, Lq).
    """
    # Under a causal mask the last query tiles do the most work: start them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = h // GROUP

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_e = tl.arange(0, 2 * D)
    row_ok = offs_m < Lq

    q1_base = Q + b * sqb + (2 * h).to(tl.int64) * sqh
    q2_base = q1_base + sqh
    k1_base = K + b * skb + (2 * g).to(tl.int64) * skh
    k2_base = k1_base + skh
    v_base = V + b * svb + g.to(tl.int64) * svh
    mask_base = MASK + b * smb + h.to(tl.int64) * smh

    q_off = offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q1 = tl.load(q1_base + q_off, mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q2_base + q_off, mask=row_ok[:, None], other=0.0)
    qk_scale = tl.cast(qk_hi, ACC) + tl.cast(qk_lo, ACC)

    m1 = tl.full([BLOCK_M], float("-inf"), ACC)
    m2 = tl.full([BLOCK_M], float("-inf"), ACC)
    l1 = tl.zeros([BLOCK_M], ACC)
    l2 = tl.zeros([BLOCK_M], ACC)
    acc1 = tl.zeros([BLOCK_M, 2 * D], ACC)
    acc2 = tl.zeros([BLOCK_M, 2 * D], ACC)

    lo, hi, n_begin, n_fs, n_fe, n_end = _key_range(LO, HI, start_m, offs_m, Lq, BLOCK_N)
    for start_n in range(n_begin, n_fs, BLOCK_N):
        m1, l1, acc1, m2, l2, acc2 = _fwd_tile(
            q1, q2, k1_base, k2_base, v_base, skn, skd, svn, svd,
            m1, l1, acc1, m2, l2, acc2, start_n, offs_m, offs_nb, offs_d, offs_e, lo, hi,
            Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
            HAS_MASK, MASK_BOOL, True, EXP2, ACC, DOT_PREC, UPCAST)
    for start_n in range(n_fs, n_fe, BLOCK_N):
        m1, l1, acc1, m2, l2, acc2 = _fwd_tile(
            q1, q2, k1_base, k2_base, v_base, skn, skd, svn, svd,
            m1, l1, acc1, m2, l2, acc2, start_n, offs_m, offs_nb, offs_d, offs_e, lo, hi,
            Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
            HAS_MASK, MASK_BOOL, False, EXP2, ACC, DOT_PREC, UPCAST)
    for start_n in range(n_fe, n_end, BLOCK_N):
        m1, l1, acc1, m2, l2, acc2 = _fwd_tile(
            q1, q2, k1_base, k2_base, v_base, skn, skd, svn, svd,
            m1, l1, acc1, m2, l2, acc2, start_n, offs_m, offs_nb, offs_d, offs_e, lo, hi,
            Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
            HAS_MASK, MASK_BOOL, True, EXP2, ACC, DOT_PREC, UPCAST)

    # Rows that saw no key have l == 0 and acc == 0: they produce zeros.
    l1_safe = tl.where(l1 > 0, l1, 1.0)
    l2_safe = tl.where(l2 > 0, l2, 1.0)
    inv1 = tl.where(l1 > 0, 1.0 / l1_safe, 0.0)
    inv2 = tl.where(l2 > 0, 1.0 / l2_safe, 0.0)
    o2 = acc2 * inv2[:, None]
    lam = tl.load(LAM + h).to(ACC)
    o = acc1 * inv1[:, None] - lam * o2

    bh = pid_bh.to(tl.int64)
    o_off = bh * Lq * (2 * D) + offs_m[:, None] * (2 * D) + offs_e[None, :]
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    if STORE_AUX:
        tl.store(O2 + o_off, o2.to(O2.dtype.element_ty), mask=row_ok[:, None])
        # log-sum-exp per map; +inf for empty rows makes every recomputed
        # probability exp(s - lse) exactly 0 in the backward.
        lse1 = tl.where(l1 > 0, m1 + _log(l1_safe, EXP2), float("inf"))
        lse2 = tl.where(l2 > 0, m2 + _log(l2_safe, EXP2), float("inf"))
        lse_base = LSE + bh * 2 * Lq
        tl.store(lse_base + offs_m, lse1, mask=row_ok)
        tl.store(lse_base + Lq + offs_m, lse2, mask=row_ok)


# --------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------

@triton.jit
def diff_attn_bwd_pre_kernel(
    O, O2, DO, LAM, DELTA,
    sdb, sdh, sdm, sde,
    H, Lq,
    D: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
):
    """Row terms of the softmax backward, for both maps.

    With O1 = O + lam O2 (map 1's normalised output):
      DELTA[b, h, 0] = rowsum(dO * O1) = rowsum(dO * O) + lam * rowsum(dO * O2)
      DELTA[b, h, 1] = rowsum(dO * O2)
    (map 2 sees the upstream gradient -lam dO; that factor is applied in the
    main kernels).  DELTA is contiguous (B, H, 2, Lq).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, 2 * D)
    row_ok = offs_m < Lq
    bh = pid_bh.to(tl.int64)

    o_off = bh * Lq * (2 * D) + offs_m[:, None] * (2 * D) + offs_e[None, :]
    o = tl.load(O + o_off, mask=row_ok[:, None], other=0.0).to(ACC)
    o2 = tl.load(O2 + o_off, mask=row_ok[:, None], other=0.0).to(ACC)
    do_off = b * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdm + offs_e[None, :] * sde
    do = tl.load(DO + do_off, mask=row_ok[:, None], other=0.0).to(ACC)
    lam = tl.load(LAM + h).to(ACC)

    d2 = tl.sum(do * o2, 1)
    d1 = tl.sum(do * o, 1) + lam * d2
    base = DELTA + bh * 2 * Lq
    tl.store(base + offs_m, d1, mask=row_ok)
    tl.store(base + Lq + offs_m, d2, mask=row_ok)


@triton.jit
def _bwd_kv_tile(k1, k2, v, dk1, dk2, dv, lam,
                 q1_base, q2_base, do_base, lse_base, dl_base,
                 sqm, sqd, sdm, sde,
                 start_m, offs_n, offs_mb, offs_d, offs_e, LO, HI,
                 Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                 EDGE: tl.constexpr,
                 EXP2: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Accumulate one query tile's contribution to dK1, dK2, dV.

    Works on transposed tiles (keys along rows) so that the products with Q
    and dO need no transposition of the accumulators.
    """
    offs_m = start_m + offs_mb
    row_ok = offs_m < Lq
    q_off = offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q1 = tl.load(q1_base + q_off, mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q2_base + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdm + offs_e[None, :] * sde,
                 mask=row_ok[:, None], other=0.0)
    # Padding rows get lse = +inf, hence probability 0.
    lse1 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.load(lse_base + Lq + offs_m, mask=row_ok, other=float("inf"))
    d1 = tl.load(dl_base + offs_m, mask=row_ok, other=0.0)
    d2 = tl.load(dl_base + Lq + offs_m, mask=row_ok, other=0.0)

    s1t = _mm(k1, tl.trans(q1), DOT_PREC, ACC, UPCAST) * qk_scale
    s2t = _mm(k2, tl.trans(q2), DOT_PREC, ACC, UPCAST) * qk_scale
    if HAS_MASK or EDGE:
        rows = tl.minimum(offs_m, Lq - 1)
        lo = tl.load(LO + rows)
        hi = tl.load(HI + rows)
        bias = _bias_tile(offs_m[None, :], offs_n[:, None], lo[None, :], hi[None, :], Lq, Lk,
                          mask_base, smm, smn, mask_scale,
                          HAS_MASK, MASK_BOOL, EDGE, ACC)
        s1t = s1t + bias
        s2t = s2t + bias
    p1t = _exp(s1t - lse1[None, :], EXP2)
    p2t = _exp(s2t - lse2[None, :], EXP2)

    # dV = (P1 - lam P2)^T dO, one product for both maps.
    dv = _mma((p1t - lam * p2t).to(do.dtype), do, dv, DOT_PREC, ACC, UPCAST)
    # dP1 = dO V^T is shared; map 2's is -lam times it.
    dpt = _mm(v, tl.trans(do), DOT_PREC, ACC, UPCAST)
    ds1t = p1t * (dpt - d1[None, :])
    ds2t = (-lam) * p2t * (dpt - d2[None, :])
    dk1 = _mma(ds1t.to(q1.dtype), q1, dk1, DOT_PREC, ACC, UPCAST)
    dk2 = _mma(ds2t.to(q2.dtype), q2, dk2, DOT_PREC, ACC, UPCAST)
    return dk1, dk2, dv


@triton.jit
def diff_attn_bwd_kv_kernel(
    Q, K, V, LAM, MASK, LO, HI, MT, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdb, sdh, sdm, sde,
    H, HKV, GROUP, Lq, Lk,
    qk_hi, qk_lo, sm_hi, sm_lo, mask_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    EXP2: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK (both maps of group g) and dV (value head g) for one key tile.

    Loops over the GROUP differential heads sharing this kv group and over the
    query tiles that can see the key tile, so no atomics are needed.  MT holds,
    per key tile, the query tile starts m_begin <= m_fs <= m_fe <= m_end
    (contiguous int32 (n_tiles, 4)): tiles in [m_fs, m_fe) see every key of the
    tile, the others are EDGE tiles; no other query tile sees any of its keys.
    DK is contiguous (B, 2*HKV, Lk, D), DV contiguous (B, HKV, Lk, 2D).
    """
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = pid_bg % HKV

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_e = tl.arange(0, 2 * D)
    col_ok = offs_n < Lk

    k1_base = K + b * skb + (2 * g).to(tl.int64) * skh
    k_off = offs_n[:, None] * skn + offs_d[None, :] * skd
    k1 = tl.load(k1_base + k_off, mask=col_ok[:, None], other=0.0)
    k2 = tl.load(k1_base + skh + k_off, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + g.to(tl.int64) * svh
                + offs_n[:, None] * svn + offs_e[None, :] * svd,
                mask=col_ok[:, None], other=0.0)
    qk_scale = tl.cast(qk_hi, ACC) + tl.cast(qk_lo, ACC)

    dk1 = tl.zeros([BLOCK_N, D], ACC)
    dk2 = tl.zeros([BLOCK_N, D], ACC)
    dv = tl.zeros([BLOCK_N, 2 * D], ACC)

    m_begin = tl.load(MT + pid_n * 4)
    m_fs = tl.load(MT + pid_n * 4 + 1)
    m_fe = tl.load(MT + pid_n * 4 + 2)
    m_end = tl.load(MT + pid_n * 4 + 3)

    for h in range(g * GROUP, g * GROUP + GROUP):
        h64 = tl.cast(h, tl.int64)
        lam = tl.load(LAM + h).to(ACC)
        q1_base = Q + b * sqb + (2 * h64) * sqh
        q2_base = q1_base + sqh
        do_base = DO + b * sdb + h64 * sdh
        row_base = (b * H + h64) * 2 * Lq
        lse_base = LSE + row_base
        dl_base = DELTA + row_base
        mask_base = MASK + b * smb + h64 * smh
        for start_m in range(m_begin, m_fs, BLOCK_M):
            dk1, dk2, dv = _bwd_kv_tile(
                k1, k2, v, dk1, dk2, dv, lam, q1_base, q2_base, do_base, lse_base, dl_base,
                sqm, sqd, sdm, sde, start_m, offs_n, offs_mb, offs_d, offs_e, LO, HI,
                Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
                HAS_MASK, MASK_BOOL, True, EXP2, ACC, DOT_PREC, UPCAST)
        for start_m in range(m_fs, m_fe, BLOCK_M):
            dk1, dk2, dv = _bwd_kv_tile(
                k1, k2, v, dk1, dk2, dv, lam, q1_base, q2_base, do_base, lse_base, dl_base,
                sqm, sqd, sdm, sde, start_m, offs_n, offs_mb, offs_d, offs_e, LO, HI,
                Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
                HAS_MASK, MASK_BOOL, False, EXP2, ACC, DOT_PREC, UPCAST)
        for start_m in range(m_fe, m_end, BLOCK_M):
            dk1, dk2, dv = _bwd_kv_tile(
                k1, k2, v, dk1, dk2, dv, lam, q1_base, q2_base, do_base, lse_base, dl_base,
                sqm, sqd, sdm, sde, start_m, offs_n, offs_mb, offs_d, offs_e, LO, HI,
                Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
                HAS_MASK, MASK_BOOL, True, EXP2, ACC, DOT_PREC, UPCAST)

    sm_scale = tl.cast(sm_hi, ACC) + tl.cast(sm_lo, ACC)
    dk1 = dk1 * sm_scale
    dk2 = dk2 * sm_scale
    dk_base = DK + (b * (2 * HKV) + 2 * g.to(tl.int64)) * Lk * D
    dk_off = offs_n[:, None] * D + offs_d[None, :]
    tl.store(dk_base + dk_off, dk1.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dk_base + Lk * D + dk_off, dk2.to(DK.dtype.element_ty), mask=col_ok[:, None])
    dv_base = DV + (b * HKV + g.to(tl.int64)) * Lk * (2 * D)
    tl.store(dv_base + offs_n[:, None] * (2 * D) + offs_e[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_q_tile(q1, q2, do, dq1, dq2, lam, lse1, lse2, d1, d2,
                k1_base, k2_base, v_base, skn, skd, svn, svd,
                start_n, offs_m, offs_nb, offs_d, offs_e, lo, hi,
                Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
                HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                EDGE: tl.constexpr,
                EXP2: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    """Accumulate one key tile's contribution to dQ1, dQ2."""
    offs_n = start_n + offs_nb
    k_off = offs_n[:, None] * skn + offs_d[None, :] * skd
    v_off = offs_n[:, None] * svn + offs_e[None, :] * svd
    if EDGE:
        col_ok = (offs_n < Lk)[:, None]
        k1 = tl.load(k1_base + k_off, mask=col_ok, other=0.0)
        k2 = tl.load(k2_base + k_off, mask=col_ok, other=0.0)
        v = tl.load(v_base + v_off, mask=col_ok, other=0.0)
    else:
        k1 = tl.load(k1_base + k_off)
        k2 = tl.load(k2_base + k_off)
        v = tl.load(v_base + v_off)

    s1 = _mm(q1, tl.trans(k1), DOT_PREC, ACC, UPCAST) * qk_scale
    s2 = _mm(q2, tl.trans(k2), DOT_PREC, ACC, UPCAST) * qk_scale
    if HAS_MASK or EDGE:
        bias = _bias_tile(offs_m[:, None], offs_n[None, :], lo[:, None], hi[:, None], Lq, Lk,
                          mask_base, smm, smn, mask_scale,
                          HAS_MASK, MASK_BOOL, EDGE, ACC)
        s1 = s1 + bias
        s2 = s2 + bias
    p1 = _exp(s1 - lse1[:, None], EXP2)
    p2 = _exp(s2 - lse2[:, None], EXP2)
    dp = _mm(do, tl.trans(v), DOT_PREC, ACC, UPCAST)
    ds1 = p1 * (dp - d1[:, None])
    ds2 = (-lam) * p2 * (dp - d2[:, None])
    dq1 = _mma(ds1.to(k1.dtype), k1, dq1, DOT_PREC, ACC, UPCAST)
    dq2 = _mma(ds2.to(k2.dtype), k2, dq2, DOT_PREC, ACC, UPCAST)
    return dq1, dq2


@triton.jit
def diff_attn_bwd_q_kernel(
    Q, K, V, LAM, MASK, LO, HI, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdb, sdh, sdm, sde,
    H, GROUP, Lq, Lk,
    qk_hi, qk_lo, sm_hi, sm_lo, mask_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    EXP2: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dQ for both maps of one differential head and one query tile.

    DQ is contiguous (B, 2H, Lq, D).
    """
    # Under a causal mask the last query tiles do the most work: start them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = h // GROUP
    h64 = tl.cast(h, tl.int64)
    bh = pid_bh.to(tl.int64)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_e = tl.arange(0, 2 * D)
    row_ok = offs_m < Lq

    q1_base = Q + b * sqb + (2 * h64) * sqh
    q_off = offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q1 = tl.load(q1_base + q_off, mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q1_base + sqh + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h64 * sdh + offs_m[:, None] * sdm + offs_e[None, :] * sde,
                 mask=row_ok[:, None], other=0.0)
    row_base = bh * 2 * Lq
    lse1 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.load(LSE + row_base + Lq + offs_m, mask=row_ok, other=float("inf"))
    d1 = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    d2 = tl.load(DELTA + row_base + Lq + offs_m, mask=row_ok, other=0.0)
    lam = tl.load(LAM + h).to(ACC)
    qk_scale = tl.cast(qk_hi, ACC) + tl.cast(qk_lo, ACC)

    k1_base = K + b * skb + (2 * g).to(tl.int64) * skh
    k2_base = k1_base + skh
    v_base = V + b * svb + g.to(tl.int64) * svh
    mask_base = MASK + b * smb + h64 * smh

    dq1 = tl.zeros([BLOCK_M, D], ACC)
    dq2 = tl.zeros([BLOCK_M, D], ACC)

    lo, hi, n_begin, n_fs, n_fe, n_end = _key_range(LO, HI, start_m, offs_m, Lq, BLOCK_N)
    for start_n in range(n_begin, n_fs, BLOCK_N):
        dq1, dq2 = _bwd_q_tile(
            q1, q2, do, dq1, dq2, lam, lse1, lse2, d1, d2,
            k1_base, k2_base, v_base, skn, skd, svn, svd,
            start_n, offs_m, offs_nb, offs_d, offs_e, lo, hi,
            Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
            HAS_MASK, MASK_BOOL, True, EXP2, ACC, DOT_PREC, UPCAST)
    for start_n in range(n_fs, n_fe, BLOCK_N):
        dq1, dq2 = _bwd_q_tile(
            q1, q2, do, dq1, dq2, lam, lse1, lse2, d1, d2,
            k1_base, k2_base, v_base, skn, skd, svn, svd,
            start_n, offs_m, offs_nb, offs_d, offs_e, lo, hi,
            Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
            HAS_MASK, MASK_BOOL, False, EXP2, ACC, DOT_PREC, UPCAST)
    for start_n in range(n_fe, n_end, BLOCK_N):
        dq1, dq2 = _bwd_q_tile(
            q1, q2, do, dq1, dq2, lam, lse1, lse2, d1, d2,
            k1_base, k2_base, v_base, skn, skd, svn, svd,
            start_n, offs_m, offs_nb, offs_d, offs_e, lo, hi,
            Lq, Lk, mask_base, smm, smn, mask_scale, qk_scale,
            HAS_MASK, MASK_BOOL, True, EXP2, ACC, DOT_PREC, UPCAST)

    sm_scale = tl.cast(sm_hi, ACC) + tl.cast(sm_lo, ACC)
    dq_base = DQ + (b * (2 * H) + 2 * h64) * Lq * D
    dq_off = offs_m[:, None] * D + offs_d[None, :]
    tl.store(dq_base + dq_off, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(dq_base + Lq * D + dq_off, (dq2 * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])
