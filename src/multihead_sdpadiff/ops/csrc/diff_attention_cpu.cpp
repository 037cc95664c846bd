// Fused differential attention for CPU: forward, backward and decode at the FLOPs of standard
// attention of width 2d.
//
//   A1 = softmax(Q1 K1^T s + M)   A2 = softmax(Q2 K2^T s + M)   O = (A1 - lam A2) V
//
// The same kernel serves three layouts (see Geometry): V1 (above); V2, whose two maps read one kv
// head, with values of width d and lam per query row; and GDA (grouped differential attention),
// where one noise map (the A2 role) serves r signal maps.
//
// Work is split by at::parallel_for over (batch, kv group, query block). The rep = H / Hkv heads
// of a group are stacked along the rows of a block, so k and v are read in place (never repeated)
// and each key tile is used by every head of the group while it is in cache.
//
// Forward, per block: for each key tile (KT keys) both maps' scores come from one GEMM each; the
// exps are stored relative to the tile's own row max, with per-tile row sums. Once every tile of
// the row is done, the row's max and sum are known, and the factors exp(m_tile - m_row) / l_row
// (times lam for map 2) form A1 - lam A2 tile by tile, followed by ONE product with v. Per
// (query, key) pair this is 4d (two QK^T of width d) + 4d (A V of width 2d) FLOPs: standard
// attention's 8d. Each map's row max and sum are returned for the backward (kept apart, not as
// a logsumexp: at large scores max + log(sum) rounds away the digits near-one-hot rows need).
// Scores and A1 - lam A2 live in one R x KT tile that is reused tile after tile and so stays in
// cache; only the exps go out to the row-long buffers. Decode blocks (fewer than SMALL_ROWS rows)
// use dot products over k and v read in place instead of GEMMs.
//
// Key-minor buffers (k transposed, dK^T, dV^T) have a row stride of key_ld(Lk), not Lk: a power-
// of-two stride maps the d rows of a tile onto the same cache sets.
//
// Backward, per block: pass 1 recomputes P1, P2 from the saved row max and sum, dA = dO V^T, dV +=
// A^T dO, and the row sums r_m = sum_j dA_j P_m,j; pass 2 forms dS1 = P1 (dA - r1) s and
// dS2 = -lam P2 (dA - r2) s, then dQ += dS K and dK += dS^T Q. 20d per pair, standard attention's
// backward. dK and dV are summed in per-thread float32 buffers (several blocks and heads write the
// same keys), reduced once at the end; d lam = -sum r2.
//
// Key ranges: each query row i sees keys [lo[i], hi[i]) (from the bottom-right causal mask, and
// from the dense mask's first/last visible key; other interval sources plug in here), intersected
// with an optional dense mask (bool = may attend, or float32 added to the scaled scores, broadcast
// over batch and heads by its strides). Key tiles outside every row's interval of a block are never
// touched. A row that sees no key gives zeros and zero gradients.
//
// GEMMs run through at::native::cpublas::brgemm (float32 accumulation for bf16/half inputs).
// at::vec needs CPU_CAPABILITY defined at compile time or it is scalar code (see cpu_fused.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// C (M x N, ldc) (+)= A (M x K, lda) * B (K x N, ldb); all row-major, float32 accumulation.
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                 float* C, int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add)
      for (int64_t i = 0; i < M; i++) std::fill_n(C + i * ldc, N, 0.f);
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  at::vec::convert<T, float>(src, dst, n);
}
template <>
inline void to_float<float>(const float* src, float* dst, int64_t n) {
  std::copy_n(src, n, dst);
}
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  at::vec::convert<float, T>(src, dst, n);
}
template <>
inline void from_float<float>(const float* src, float* dst, int64_t n) {
  if (src != dst) std::copy_n(src, n, dst);
}


// Below this many stacked rows (decode steps) scores are dot products over k read in place.
constexpr int64_t SMALL_ROWS = 8;

// Decode steps work on KEYS_AT_ONCE keys at a time: a dot product of width d is a chain of
// dependent FMAs, and four independent chains (and one load of each q or O vector for four keys)
// keep the FMA units busy. The per-key order of the sums is that of one key at a time.
constexpr int64_t KEYS_AT_ONCE = 4;

// The rows [j, j + m) of K (width d) in float32: in place for float, else converted into buf.
template <typename T>
inline const float* key_rows(const T* K, int64_t j, int64_t m, int64_t d, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    return K + j * d;
  } else {
    to_float<T>(K + j * d, buf, m * d);
    return buf;
  }
}

// S (R x n, ld ldc) = Qf (R x d, float) * K[0, n)^T, K rows of width d read in place. krow holds
// KEYS_AT_ONCE converted rows (KEYS_AT_ONCE * d floats).
template <typename T>
inline void scores_small(int64_t R, int64_t n, int64_t d, const float* Qf, const T* K, float* S, int64_t ldc,
                         float* krow) {
  const int64_t W = fVec::size();
  constexpr int64_t U = KEYS_AT_ONCE;
  auto reduce = [](fVec& a) { return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, a); };
  int64_t j = 0;
  for (; j + U <= n; j += U) {
    const float* kr = key_rows<T>(K, j, U, d, krow);
    for (int64_t r = 0; r < R; r++) {
      const float* qr = Qf + r * d;
      fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
      int64_t c = 0;
      for (; c + W <= d; c += W) {
        const fVec qv = fVec::loadu(qr + c);
        a0 = at::vec::fmadd(qv, fVec::loadu(kr + c), a0);
        a1 = at::vec::fmadd(qv, fVec::loadu(kr + d + c), a1);
        a2 = at::vec::fmadd(qv, fVec::loadu(kr + 2 * d + c), a2);
        a3 = at::vec::fmadd(qv, fVec::loadu(kr + 3 * d + c), a3);
      }
      float s4[U] = {reduce(a0), reduce(a1), reduce(a2), reduce(a3)};
      for (int64_t u = 0; u < U; u++) {
        for (int64_t cc = c; cc < d; cc++) s4[u] += qr[cc] * kr[u * d + cc];
        S[r * ldc + j + u] = s4[u];
      }
    }
  }
  for (; j < n; j++) {
    const float* kr = key_rows<T>(K, j, 1, d, krow);
    for (int64_t r = 0; r < R; r++) {
      const float* qr = Qf + r * d;
      fVec acc(0.f);
      int64_t c = 0;
      for (; c + W <= d; c += W) acc = at::vec::fmadd(fVec::loadu(qr + c), fVec::loadu(kr + c), acc);
      float sum = reduce(acc);
      for (; c < d; c++) sum += qr[c] * kr[c];
      S[r * ldc + j] = sum;
    }
  }
}

// O (R x d2) (+)= A (R x n, float, ld lda) * V[0, n) (rows of width d2 read in place): small R.
// vrow holds KEYS_AT_ONCE converted rows. Each O entry adds the keys' terms in key order.
template <typename T>
inline void av_small(int64_t R, int64_t n, int64_t d2, const float* A, int64_t lda, const T* V, float* O,
                     bool add, float* vrow) {
  const int64_t W = fVec::size();
  constexpr int64_t U = KEYS_AT_ONCE;
  if (!add) std::fill_n(O, R * d2, 0.f);
  int64_t j = 0;
  for (; j + U <= n; j += U) {
    const float* vr = key_rows<T>(V, j, U, d2, vrow);
    for (int64_t r = 0; r < R; r++) {
      const float* a = A + r * lda + j;
      if (a[0] == 0.f && a[1] == 0.f && a[2] == 0.f && a[3] == 0.f) continue;
      float* o = O + r * d2;
      const fVec v0(a[0]), v1(a[1]), v2(a[2]), v3(a[3]);
      int64_t c = 0;
      for (; c + W <= d2; c += W) {
        fVec x = at::vec::fmadd(v0, fVec::loadu(vr + c), fVec::loadu(o + c));
        x = at::vec::fmadd(v1, fVec::loadu(vr + d2 + c), x);
        x = at::vec::fmadd(v2, fVec::loadu(vr + 2 * d2 + c), x);
        at::vec::fmadd(v3, fVec::loadu(vr + 3 * d2 + c), x).store(o + c);
      }
      for (; c < d2; c++)
        for (int64_t u = 0; u < U; u++) o[c] += a[u] * vr[u * d2 + c];
    }
  }
  for (; j < n; j++) {
    const float* vr = key_rows<T>(V, j, 1, d2, vrow);
    for (int64_t r = 0; r < R; r++) {
      const float a = A[r * lda + j];
      if (a == 0.f) continue;
      float* o = O + r * d2;
      const fVec va(a);
      int64_t c = 0;
      for (; c + W <= d2; c += W) at::vec::fmadd(va, fVec::loadu(vr + c), fVec::loadu(o + c)).store(o + c);
      for (; c < d2; c++) o[c] += a * vr[c];
    }
  }
}

// The dense mask, broadcast over batch and heads by its strides (0 where broadcast).
struct Mask {
  int kind = 0;  // 0 none, 1 bool, 2 float32 additive
  const bool* b = nullptr;
  const float* f = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  template <typename U>
  inline const U* row(const U* base, int64_t bi, int64_t h, int64_t i) const {
    return base + bi * sb + h * sh + i * sq;
  }
};

// Raw scores s[0, n) of one row and key tile. With a mask they become scaled, masked scores and
// mul = 1; without one they stay raw and mul = scale (folded into the exp pass). Columns outside
// [c0, c1) become -inf. Returns the row max of the scaled scores (-inf if nothing is visible).
inline float prepare_row(float* s, int64_t n, int64_t c0, int64_t c1, float scale, const Mask& mask,
                         int64_t bi, int64_t h, int64_t i, int64_t t0, float& mul) {
  for (int64_t c = 0; c < c0; c++) s[c] = NEG_INF;
  for (int64_t c = c1; c < n; c++) s[c] = NEG_INF;
  if (mask.kind == 1) {
    const bool* m = mask.row(mask.b, bi, h, i);
    for (int64_t c = c0; c < c1; c++) s[c] = m[(t0 + c) * mask.sk] ? s[c] * scale : NEG_INF;
  } else if (mask.kind == 2) {
    const float* m = mask.row(mask.f, bi, h, i);
    for (int64_t c = c0; c < c1; c++) s[c] = s[c] * scale + m[(t0 + c) * mask.sk];
  }
  mul = mask.kind == 0 ? scale : 1.f;
  const int64_t W = fVec::size();
  fVec vmax(NEG_INF);
  int64_t c = c0;
  for (; c + W <= c1; c += W) vmax = at::vec::maximum(vmax, fVec::loadu(s + c));
  float mx = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; c < c1; c++) mx = std::max(mx, s[c]);
  return mx == NEG_INF ? mx : mx * mul;
}

// dst[0, n) <- exp(s * mul - sub) * post (0 where s is -inf); returns the sum. sub must be finite;
// dst may be s. s * mul is rounded before the subtraction (no fma) so that the max entry gives
// exp(0) exactly, as in the forward: near one-hot rows need P to the last bit, since
// dS = P (dA - sum P dA) cancels.
inline float exp_row(const float* s, float* dst, int64_t n, int64_t c0, int64_t c1, float sub, float mul,
                     float post = 1.f) {
  for (int64_t c = 0; c < c0; c++) dst[c] = 0.f;
  for (int64_t c = c1; c < n; c++) dst[c] = 0.f;
  const int64_t W = fVec::size();
  fVec vsub(sub), vmul(mul), vpost(post), vsum(0.f);
  const fVec vninf(NEG_INF), vzero(0.f);
  int64_t c = c0;
  for (; c + W <= c1; c += W) {
    fVec x = fVec::loadu(s + c);
    fVec e = ((x * vmul) - vsub).exp_u20() * vpost;
    e = fVec::blendv(e, vzero, x == vninf);
    e.store(dst + c);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, vsum);
  for (; c < c1; c++) {
    float xm = s[c] * mul;
    float e = s[c] == NEG_INF ? 0.f : std::exp(xm - sub) * post;
    dst[c] = e;
    sum += e;
  }
  return sum;
}

// The heads of a call. Each kv group (pair) g holds rep signal heads j = g * rep + jl and rep2 noise
// heads n = g * rep2 + nl; signal head j subtracts noise head j / r (r = rep / rep2). V1 is r = 1:
// head h's second map is its noise map. GDA (grouped differential attention) has r > 1: one noise
// softmax serves r signal heads. The dense mask is indexed by the noise head (V1: the head).
struct Geometry {
  int64_t B, H, Nn, Hkv, rep, rep2, r, Lq, Lk, d, nq, nblocks, KT;
  int64_t ldk;         // row stride of the transposed (key-minor) k, v, dK and dV buffers; see key_ld
  int64_t dv;          // the value width: 2d (V1, GDA) or d (V2)
  int64_t nkh;         // heads of k: 2 Hkv (a K1, K2 pair per group) or Hkv (V2: both maps read one key)
  int64_t kh1m, kh2o;  // group g's K1 is k head g * kh1m, its K2 is kh2o heads further (1, or 0 in V2)
  // lam of signal head j at query row i of batch bi is lam[bi * lmb + j * lmh + i * lmi]; nlam
  // entries in all: (H,) per head (V1, GDA) or (B, H, Lq) per token (V2).
  int64_t lmb, lmh, lmi, nlam;
  inline int64_t lam_at(int64_t bi, int64_t j, int64_t i) const { return bi * lmb + j * lmh + i * lmi; }
  int64_t lo_sb;     // batch stride of lo/hi (0 when shared by the batch)
  int64_t ksb, ksh;  // batch and head strides of k (its rows are dense: sequence stride d)
  int64_t vsb, vsh;  // the same for v (sequence stride 2d)
  // Query row i of signal head j starts at q1 + bi * q1b + j * q1h + i * d (noise: q2, q2b, q2h);
  // the same offsets locate dq. Its statistics (max, then sum, Lq apart) start at
  // lse + bi * lsb + j * ls1h + ls1o + i (noise: ls2h, ls2o).
  int64_t q1b, q1h, q2b, q2h;
  int64_t lsb, ls1h, ls1o, ls2h, ls2o;
};

// The key range of the query rows [i0, i1) of a block: [klo, khi) = union of their intervals.
inline void block_keys(const Geometry& G, const int32_t* lo, const int32_t* hi, int64_t bi, int64_t i0,
                       int64_t i1, int64_t& klo, int64_t& khi) {
  klo = G.Lk;
  khi = 0;
  for (int64_t i = i0; i < i1; i++) {
    int64_t a = lo[bi * G.lo_sb + i], b = hi[bi * G.lo_sb + i];
    if (a < b) {
      klo = std::min(klo, a);
      khi = std::max(khi, b);
    }
  }
  if (khi <= klo) klo = khi = 0;
}

// Task t is query block t % nblocks of kv group (t / nblocks) % Hkv of batch t / (nblocks Hkv): rows
// [i0, i1) (nqb of them), R1 = rep * nqb stacked signal rows and R2 = rep2 * nqb noise rows.
struct Task {
  int64_t bi, g, i0, i1, nqb, R1, R2;
};

inline Task task_at(const Geometry& G, int64_t task) {
  const int64_t blk = task % G.nblocks, g = (task / G.nblocks) % G.Hkv, bi = task / (G.nblocks * G.Hkv);
  const int64_t i0 = blk * G.nq, i1 = std::min(G.Lq, i0 + G.nq), nqb = i1 - i0;
  return Task{bi, g, i0, i1, nqb, G.rep * nqb, G.rep2 * nqb};
}

// The row stride of a key-minor buffer (one row of Lk floats per feature): Lk rounded up to 16 and
// one cache line more. With a stride of exactly Lk, a power of two, the d rows that one GEMM tile
// reads fall into the same few cache sets and evict each other: at Lk = 16384 all 64 rows of a k
// tile mapped to one L2 set. One line more spreads them over consecutive sets.
inline int64_t key_ld(int64_t Lk) { return (Lk + 15) / 16 * 16 + 16; }

// Floats of the buffer where decode steps convert KEYS_AT_ONCE k or v rows (scores_small, av_small).
inline int64_t decode_rows_floats(const Geometry& G) { return KEYS_AT_ONCE * std::max(G.d, G.dv); }

// Sizes shared by the layouts: signal heads H, noise heads Nn, kv groups Hkv.
Geometry geometry(int64_t H, int64_t Nn, int64_t Hkv, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo,
                  int64_t Lq, int64_t d, int64_t block_rows, int64_t key_tile) {
  Geometry G;
  G.B = k.size(0);
  G.H = H;
  G.Nn = Nn;
  G.Lq = Lq;
  G.d = d;
  G.Hkv = Hkv;
  G.dv = v.size(3);
  G.nkh = k.size(1);
  G.kh1m = G.nkh / G.Hkv;
  G.kh2o = G.kh1m - 1;
  G.lmb = 0;
  G.lmh = 1;
  G.lmi = 0;
  G.nlam = H;
  G.Lk = k.size(2);
  G.ldk = key_ld(G.Lk);
  TORCH_CHECK(H > 0 && Hkv > 0 && Nn > 0 && H % Nn == 0 && H % Hkv == 0 && Nn % Hkv == 0,
              "cpu_fused: head counts must be positive and divide");
  TORCH_CHECK(k.size(3) == d && v.size(0) == G.B && v.size(1) == Hkv && v.size(2) == G.Lk,
              "cpu_fused: k must be (B, heads, Lk, d) and v (B, Hkv, Lk, width)");
  TORCH_CHECK(lo.size(0) == 1 || lo.size(0) == G.B, "cpu_fused: lo/hi must be (1|B, Lq)");
  G.rep = G.H / G.Hkv;
  G.rep2 = G.Nn / G.Hkv;
  G.r = G.H / G.Nn;
  G.nq = std::max<int64_t>(1, std::min<int64_t>(G.Lq, block_rows / G.rep));
  G.nblocks = (G.Lq + G.nq - 1) / G.nq;
  G.KT = key_tile;
  G.lo_sb = lo.size(0) == 1 ? 0 : G.Lq;
  G.ksb = k.stride(0);
  G.ksh = k.stride(1);
  G.vsb = v.stride(0);
  G.vsh = v.stride(1);
  return G;
}

// q (B, 2H, Lq, d) with head h's maps at 2h and 2h + 1; lse (B, H, 4, Lq) (V1 and V2).
void set_v1_layout(Geometry& G) {
  G.q1b = G.q2b = 2 * G.H * G.Lq * G.d;
  G.q1h = G.q2h = 2 * G.Lq * G.d;
  G.lsb = 4 * G.H * G.Lq;
  G.ls1h = G.ls2h = 4 * G.Lq;
  G.ls1o = 0;
  G.ls2o = 2 * G.Lq;
}

// V1: q as above; k (B, 2Hkv, Lk, d) (a K1, K2 pair per group), v (B, Hkv, Lk, 2d), lam (H,).
Geometry geometry_v1(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo,
                     int64_t block_rows, int64_t key_tile) {
  const int64_t H = q.size(1) / 2, Lq = q.size(2), d = q.size(3);
  Geometry G = geometry(H, H, k.size(1) / 2, k, v, lo, Lq, d, block_rows, key_tile);
  set_v1_layout(G);
  return G;
}

// GDA: signal queries (B, H, Lq, d), noise queries (B, Nn, Lq, d); lse (B, H + Nn, 2, Lq).
Geometry geometry_gda(const at::Tensor& qs, const at::Tensor& qn, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& lo, int64_t block_rows, int64_t key_tile) {
  const int64_t H = qs.size(1), Nn = qn.size(1), Lq = qs.size(2), d = qs.size(3);
  Geometry G = geometry(H, Nn, k.size(1) / 2, k, v, lo, Lq, d, block_rows, key_tile);
  G.q1b = H * Lq * d;
  G.q2b = Nn * Lq * d;
  G.q1h = G.q2h = Lq * d;
  G.lsb = 2 * (H + Nn) * Lq;
  G.ls1h = G.ls2h = 2 * Lq;
  G.ls1o = 0;
  G.ls2o = 2 * H * Lq;
  return G;
}

// V2: q as in V1; k and v (B, Hkv, Lk, d), both maps of head h reading kv head h / (H / Hkv);
// lam (B, H, Lq) per token.
Geometry geometry_v2(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo,
                     int64_t block_rows, int64_t key_tile) {
  const int64_t H = q.size(1) / 2, Lq = q.size(2), d = q.size(3);
  Geometry V = geometry(H, H, k.size(1), k, v, lo, Lq, d, block_rows, key_tile);
  set_v1_layout(V);
  V.lmb = V.H * V.Lq;
  V.lmh = V.Lq;
  V.lmi = 1;
  V.nlam = V.B * V.H * V.Lq;
  return V;
}

Mask make_mask(const c10::optional<at::Tensor>& mask_opt, const Geometry& G) {
  Mask mask;
  if (!mask_opt.has_value()) return mask;
  const at::Tensor& m = *mask_opt;
  TORCH_CHECK(m.dim() == 4, "cpu_fused: mask must be 4-D");
  mask.kind = m.scalar_type() == at::kBool ? 1 : 2;
  TORCH_CHECK(mask.kind == 1 || m.scalar_type() == at::kFloat, "cpu_fused: mask must be bool or float32");
  auto stride = [&](int dim, int64_t full) { return m.size(dim) == 1 && full != 1 ? 0 : m.stride(dim); };
  mask.sb = stride(0, G.B);
  mask.sh = stride(1, G.Nn);
  mask.sq = stride(2, G.Lq);
  mask.sk = stride(3, G.Lk);
  if (mask.kind == 1)
    mask.b = m.data_ptr<bool>();
  else
    mask.f = m.data_ptr<float>();
  return mask;
}

bool rows_dense(const at::Tensor& t) {
  return t.numel() == 0 || ((t.size(3) <= 1 || t.stride(3) == 1) && (t.size(2) <= 1 || t.stride(2) == t.size(3)));
}

// k and v may be slices of a longer buffer (a preallocated KV cache): any batch and head strides,
// but each head's rows must be dense. Query tensors must be contiguous.
void check_inputs(std::initializer_list<const at::Tensor*> qs, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& lam, const at::Tensor& lo, const at::Tensor& hi) {
  for (const at::Tensor* q : qs) {
    TORCH_CHECK(q->device().is_cpu() && q->dim() == 4 && q->is_contiguous(), "cpu_fused: queries must be contiguous 4-D CPU tensors");
    TORCH_CHECK(q->scalar_type() == k.scalar_type(), "cpu_fused: q, k, v must have one dtype");
    TORCH_CHECK(lo.dim() == 2 && lo.size(1) == q->size(2), "cpu_fused: lo/hi must be (1|B, Lq)");
  }
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), "cpu_fused: CPU tensors only");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "cpu_fused: k, v must be 4-D");
  TORCH_CHECK(rows_dense(k) && rows_dense(v), "cpu_fused: k and v must be dense within each head");
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "cpu_fused: q, k, v must have one dtype");
  TORCH_CHECK(lam.scalar_type() == at::kFloat && lam.is_contiguous(), "cpu_fused: lam must be contiguous float32");
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt && lo.is_contiguous() && hi.is_contiguous(),
              "cpu_fused: lo/hi must be contiguous int32");
  TORCH_CHECK(lo.sizes() == hi.sizes(), "cpu_fused: lo/hi must be (1|B, Lq)");
}

// x (B, heads, Lk, width) as (B, heads, width, ld) in dtype t: rows of Lk keys, ld apart (key_ld).
at::Tensor transposed_keys(const at::Tensor& x, at::ScalarType t, int64_t ld) {
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(3), ld}, x.options().dtype(t));
  out.narrow(3, 0, x.size(2)).copy_(x.transpose(-1, -2));
  return out;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename T>
void forward_kernel(const T* q1p, const T* q2p, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam,
                    const at::Tensor& lo_t, const at::Tensor& hi_t, const Mask& mask, double scale_d,
                    const Geometry& G, at::Tensor& out, at::Tensor& lse) {
  const int64_t d = G.d, d2 = G.dv, Lq = G.Lq, Lk = G.Lk, KT = G.KT;  // d2: the value width
  const float scale = static_cast<float>(scale_d);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const float* lamp = lam.data_ptr<float>();
  const int32_t* lo = lo_t.data_ptr<int32_t>();
  const int32_t* hi = hi_t.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  float* lsep = lse.data_ptr<float>();
  const int64_t ntasks = G.B * G.Hkv * G.nblocks;
  const int64_t R1max = G.rep * G.nq, R2max = G.rep2 * G.nq;
  // k transposed once, in float32, as the B operand of Q K^T: (B, 2Hkv, d, ldk). Decode steps
  // (fewer stacked rows than SMALL_ROWS in every block) read k in place instead.
  at::Tensor kt;
  const float* ktp = nullptr;
  const int64_t ldk = G.ldk;
  if (G.rep * std::min(G.nq, Lq) >= SMALL_ROWS) {
    kt = transposed_keys(k, at::kFloat, ldk);
    ktp = kt.data_ptr<float>();
  }

  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch: packed q rows, both maps' exps over the block's whole key range, tile
    // stats. Score buffers are tile-major: tile t's R x KT block is contiguous (row stride KT), so
    // each pass streams one block instead of R rows a whole key range apart.
    const int64_t ldE = KT, ntiles = (Lk + KT - 1) / KT;
    std::vector<float> E1(R1max * ntiles * KT), E2(R2max * ntiles * KT);
    std::vector<float> m1(R1max * ntiles), l1(R1max * ntiles), m2(R2max * ntiles), l2(R2max * ntiles);
    std::vector<float> O(R1max * d2), M1(R1max), L1(R1max), M2(R2max), L2(R2max);
    // The forward's GEMMs all run in float32: bf16/half q rows and k/v tiles are converted once per
    // tile (O(tile) work against the tile's O(rows * tile * d) products), which is both faster than
    // the low-precision GEMM here and keeps A1 - lam A2 in float32 for the product with v.
    constexpr bool is_f32 = std::is_same<T, float>::value;
    std::vector<float> Vf(is_f32 ? 0 : KT * d2);
    std::vector<float> Qf((R1max + R2max) * d), row(decode_rows_floats(G));  // q rows in float; decode's k/v rows
    // One tile of scores (or of A1 - lam A2), reused tile after tile so that it stays in cache: the
    // GEMMs and the exp pass work there, and only the exps go out to the (long) E buffers.
    std::vector<float> S(std::max(R1max, R2max) * KT);
    std::vector<int64_t> c0s(G.nq), c1s(G.nq);

    for (int64_t task = begin; task < end; task++) {
      const auto [bi, g, i0, i1, nqb, R1, R2] = task_at(G, task);
      int64_t klo, khi;
      block_keys(G, lo, hi, bi, i0, i1, klo, khi);
      // Stacked row r of map 1 is signal head j = g * rep + r / nqb, query i0 + r % nqb; row r of
      // map 2 is noise head g * rep2 + r / nqb. Signal row r reads noise row noise_of(r).
      auto sig = [&](int64_t r) { return g * G.rep + r / nqb; };
      auto noi = [&](int64_t r) { return g * G.rep2 + r / nqb; };
      auto noise_of = [&](int64_t r) { return (r / nqb) / G.r * nqb + r % nqb; };
      auto lse1 = [&](int64_t r) { return lsep + bi * G.lsb + sig(r) * G.ls1h + G.ls1o + i0 + r % nqb; };
      auto lse2 = [&](int64_t r) { return lsep + bi * G.lsb + noi(r) * G.ls2h + G.ls2o + i0 + r % nqb; };
      auto out_row = [&](int64_t r) { return op + ((bi * G.H + sig(r)) * Lq + i0 + r % nqb) * d2; };
      if (khi <= klo) {  // no row of this block sees any key
        for (int64_t r = 0; r < R1; r++) {
          std::fill_n(out_row(r), d2, T(0));
          lse1(r)[0] = NEG_INF;
          lse1(r)[Lq] = 0.f;
        }
        for (int64_t r = 0; r < R2; r++) {
          lse2(r)[0] = NEG_INF;
          lse2(r)[Lq] = 0.f;
        }
        continue;
      }
      for (int64_t i = i0; i < i1; i++) {
        c0s[i - i0] = lo[bi * G.lo_sb + i];
        c1s[i - i0] = hi[bi * G.lo_sb + i];
      }
      float* Qf1 = Qf.data();
      float* Qf2 = Qf.data() + R1 * d;
      for (int64_t r = 0; r < R1; r++)
        to_float<T>(q1p + bi * G.q1b + sig(r) * G.q1h + (i0 + r % nqb) * d, Qf1 + r * d, d);
      for (int64_t r = 0; r < R2; r++)
        to_float<T>(q2p + bi * G.q2b + noi(r) * G.q2h + (i0 + r % nqb) * d, Qf2 + r * d, d);
      const T* k1 = kp + bi * G.ksb + g * G.kh1m * G.ksh;
      const T* k2 = k1 + G.kh2o * G.ksh;
      const T* vg = vp + bi * G.vsb + g * G.vsh;
      const int64_t nt = (khi - klo + KT - 1) / KT;
      const bool small = R1 < SMALL_ROWS;

      // Scores of R rows of one map in tile t (S, in cache), then their exps relative to each row's
      // tile max, written to the map's buffer e; the mask head of row r is mhead(r).
      auto exps = [&](float* e, int64_t R, float* mt, float* lt, int64_t t, int64_t t0, int64_t n, auto mhead) {
        for (int64_t r = 0; r < R; r++) {
          const int64_t i = i0 + r % nqb;
          const int64_t c0 = std::clamp<int64_t>(c0s[i - i0] - t0, 0, n), c1 = std::clamp<int64_t>(c1s[i - i0] - t0, 0, n);
          float* s = S.data() + r * KT;
          float* dst = e + r * ldE;
          float mul, mx = NEG_INF;
          if (c1 > c0) mx = prepare_row(s, n, c0, c1, scale, mask, bi, mhead(r), i, t0, mul);
          mt[r * nt + t] = mx;
          lt[r * nt + t] = mx == NEG_INF ? (std::fill_n(dst, n, 0.f), 0.f) : exp_row(s, dst, n, c0, c1, mx, mul);
        }
      };
      const float* kt1 = small ? nullptr : ktp + (bi * G.nkh + g * G.kh1m) * d * ldk;
      auto map_tile = [&](int64_t R, const float* Qm, const T* km, const float* ktm, float* e, float* mt, float* lt,
                          int64_t t, auto mhead) {
        const int64_t t0 = klo + t * KT, n = std::min(khi, t0 + KT) - t0;
        if (small) scores_small<T>(R, n, d, Qm, km + t0 * d, S.data(), KT, row.data());
        else gemm<float>(R, n, d, Qm, d, ktm + t0, ldk, S.data(), KT, false);
        exps(e, R, mt, lt, t, t0, n, mhead);
      };
      for (int64_t t = 0; t < nt; t++) {
        map_tile(R1, Qf1, k1, kt1, E1.data() + t * R1 * KT, m1.data(), l1.data(), t,
                 [&](int64_t r) { return sig(r) / G.r; });
        map_tile(R2, Qf2, k2, small ? nullptr : kt1 + G.kh2o * d * ldk, E2.data() + t * R2 * KT, m2.data(),
                 l2.data(), t, noi);
      }
      // Row statistics: max over the tiles' maxima, and the sum of the rescaled tile sums.
      auto stats = [&](int64_t R, const float* mt, const float* lt, float* M, float* L, auto lse_row) {
        for (int64_t r = 0; r < R; r++) {
          float a = NEG_INF;
          for (int64_t t = 0; t < nt; t++) a = std::max(a, mt[r * nt + t]);
          float sa = 0.f;
          for (int64_t t = 0; t < nt; t++)
            if (a != NEG_INF && mt[r * nt + t] != NEG_INF) sa += lt[r * nt + t] * std::exp(mt[r * nt + t] - a);
          M[r] = a;
          L[r] = sa;
          float* out_stats = lse_row(r);  // row max and sum of the map, for the backward
          out_stats[0] = sa > 0.f ? a : NEG_INF;
          out_stats[Lq] = sa;
        }
      };
      stats(R1, m1.data(), l1.data(), M1.data(), L1.data(), lse1);
      stats(R2, m2.data(), l2.data(), M2.data(), L2.data(), lse2);
      // A1 - lam A2 tile by tile, then one product with v.
      for (int64_t t = 0; t < nt; t++) {
        const int64_t t0 = klo + t * KT, t1 = std::min(khi, t0 + KT), n = t1 - t0;
        for (int64_t r = 0; r < R1; r++) {
          const int64_t rn = noise_of(r);
          const float lam_h = lamp[G.lam_at(bi, sig(r), i0 + r % nqb)];
          const float mt1 = m1[r * nt + t], mt2 = m2[rn * nt + t];
          const float a = (L1[r] > 0.f && mt1 != NEG_INF) ? std::exp(mt1 - M1[r]) / L1[r] : 0.f;
          const float b = (L2[rn] > 0.f && mt2 != NEG_INF) ? lam_h * std::exp(mt2 - M2[rn]) / L2[rn] : 0.f;
          const float* s1 = E1.data() + t * R1 * KT + r * ldE;
          const float* s2 = E2.data() + t * R2 * KT + rn * ldE;
          float* ar = S.data() + r * KT;
          const fVec va(a), vb(b);
          const int64_t W = fVec::size();
          int64_t c = 0;
          for (; c + W <= n; c += W) (fVec::loadu(s1 + c) * va - fVec::loadu(s2 + c) * vb).store(ar + c);
          for (; c < n; c++) ar[c] = s1[c] * a - s2[c] * b;
        }
        const float* A = S.data();  // A1 - lam A2 of this tile, in cache for the product with v
        if (small) {
          av_small<T>(R1, n, d2, A, ldE, vg + t0 * d2, O.data(), t > 0, row.data());
        } else if constexpr (is_f32) {
          gemm<float>(R1, d2, n, A, ldE, vg + t0 * d2, d2, O.data(), d2, t > 0);
        } else {
          to_float<T>(vg + t0 * d2, Vf.data(), n * d2);
          gemm<float>(R1, d2, n, A, ldE, Vf.data(), d2, O.data(), d2, t > 0);
        }
      }
      for (int64_t r = 0; r < R1; r++) from_float<T>(O.data() + r * d2, out_row(r), d2);
    }
  });
}

// Decode steps with fewer (batch, kv group, block) tasks than threads: the key range is cut into S
// chunks so that every thread reads part of the cache (as flash-decoding does on GPUs). Each chunk
// keeps, per row and map, its own max, sum and unnormalised product with v; the merge rescales
// them to the row's max and forms O = O1 / L1 - lam O2 / L2, the same numbers as one pass.
constexpr int64_t SPLIT_MIN_KEYS = 256;

int64_t decode_chunks(const Geometry& G) {
  const int64_t ntasks = G.B * G.Hkv * G.nblocks, nthr = at::get_num_threads();
  if (ntasks == 0 || G.rep * std::min(G.nq, G.Lq) >= SMALL_ROWS || ntasks >= nthr) return 1;
  return std::max<int64_t>(1, std::min<int64_t>((nthr + ntasks - 1) / ntasks, G.Lk / SPLIT_MIN_KEYS));
}

template <typename T>
void decode_split_kernel(const T* q1p, const T* q2p, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam,
                         const at::Tensor& lo_t, const at::Tensor& hi_t, const Mask& mask, double scale_d,
                         const Geometry& G, int64_t S, at::Tensor& out, at::Tensor& lse) {
  const int64_t d = G.d, d2 = G.dv, Lq = G.Lq, Lk = G.Lk;
  const float scale = static_cast<float>(scale_d);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const float* lamp = lam.data_ptr<float>();
  const int32_t* lo = lo_t.data_ptr<int32_t>();
  const int32_t* hi = hi_t.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  float* lsep = lse.data_ptr<float>();
  const int64_t ntasks = G.B * G.Hkv * G.nblocks;
  const int64_t Rt = (G.rep + G.rep2) * G.nq;  // signal rows, then noise rows
  const int64_t CL = (Lk + S - 1) / S;
  std::vector<float> pm(ntasks * S * Rt), pl(ntasks * S * Rt), pO(ntasks * S * Rt * d2);

  at::parallel_for(0, ntasks * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> E(Rt * CL), Qf(Rt * d), row(decode_rows_floats(G));
    for (int64_t item = begin; item < end; item++) {
      const int64_t task = item / S, c = item % S;
      const Task tk = task_at(G, task);
      float* m = pm.data() + item * Rt;
      float* l = pl.data() + item * Rt;
      float* o = pO.data() + item * Rt * d2;
      int64_t klo, khi;
      block_keys(G, lo, hi, tk.bi, tk.i0, tk.i1, klo, khi);
      const int64_t len = (khi - klo + S - 1) / S;
      const int64_t t0 = std::min(khi, klo + c * len), t1 = std::min(khi, t0 + len), n = t1 - t0;
      const int64_t R = tk.R1 + tk.R2;
      if (n <= 0) {
        std::fill_n(m, R, NEG_INF);
        std::fill_n(l, R, 0.f);
        std::fill_n(o, R * d2, 0.f);
        continue;
      }
      // Row r < R1: signal head g * rep + r / nqb; row R1 + u: noise head g * rep2 + u / nqb.
      auto head = [&](int64_t r) {
        return r < tk.R1 ? tk.g * G.rep + r / tk.nqb : tk.g * G.rep2 + (r - tk.R1) / tk.nqb;
      };
      for (int64_t r = 0; r < R; r++) {
        const int64_t i = tk.i0 + r % tk.nqb;  // R1 is a multiple of nqb
        const T* src = r < tk.R1 ? q1p + tk.bi * G.q1b + head(r) * G.q1h + i * d
                                 : q2p + tk.bi * G.q2b + head(r) * G.q2h + i * d;
        to_float<T>(src, Qf.data() + r * d, d);
      }
      const T* k1 = kp + tk.bi * G.ksb + tk.g * G.kh1m * G.ksh;
      const T* vg = vp + tk.bi * G.vsb + tk.g * G.vsh;
      scores_small<T>(tk.R1, n, d, Qf.data(), k1 + t0 * d, E.data(), CL, row.data());
      scores_small<T>(tk.R2, n, d, Qf.data() + tk.R1 * d, k1 + G.kh2o * G.ksh + t0 * d, E.data() + tk.R1 * CL, CL, row.data());
      for (int64_t r = 0; r < R; r++) {
        const int64_t i = tk.i0 + r % tk.nqb;
        const int64_t c0 = std::clamp<int64_t>(lo[tk.bi * G.lo_sb + i] - t0, 0, n);
        const int64_t c1 = std::clamp<int64_t>(hi[tk.bi * G.lo_sb + i] - t0, 0, n);
        float* s = E.data() + r * CL;
        const int64_t mhead = r < tk.R1 ? head(r) / G.r : head(r);
        float mx = NEG_INF, mul = 1.f;
        if (c1 > c0) mx = prepare_row(s, n, c0, c1, scale, mask, tk.bi, mhead, i, t0, mul);
        m[r] = mx;
        l[r] = mx == NEG_INF ? (std::fill_n(s, n, 0.f), 0.f) : exp_row(s, s, n, c0, c1, mx, mul);
      }
      av_small<T>(R, n, d2, E.data(), CL, vg + t0 * d2, o, false, row.data());
    }
  });

  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> M(Rt), L(Rt), acc(d2);
    for (int64_t task = begin; task < end; task++) {
      const Task tk = task_at(G, task);
      const int64_t R = tk.R1 + tk.R2;
      const float* m = pm.data() + task * S * Rt;
      const float* l = pl.data() + task * S * Rt;
      const float* o = pO.data() + task * S * Rt * d2;
      for (int64_t r = 0; r < R; r++) {
        float a = NEG_INF;
        for (int64_t c = 0; c < S; c++) a = std::max(a, m[c * Rt + r]);
        float sum = 0.f;
        for (int64_t c = 0; c < S; c++)
          if (a != NEG_INF && m[c * Rt + r] != NEG_INF) sum += l[c * Rt + r] * std::exp(m[c * Rt + r] - a);
        M[r] = a;
        L[r] = sum;
        const int64_t i = tk.i0 + r % tk.nqb;
        float* st = r < tk.R1 ? lsep + tk.bi * G.lsb + (tk.g * G.rep + r / tk.nqb) * G.ls1h + G.ls1o + i
                              : lsep + tk.bi * G.lsb + (tk.g * G.rep2 + (r - tk.R1) / tk.nqb) * G.ls2h + G.ls2o + i;
        st[0] = sum > 0.f ? a : NEG_INF;
        st[Lq] = sum;
      }
      for (int64_t r = 0; r < tk.R1; r++) {
        const int64_t rn = tk.R1 + (r / tk.nqb) / G.r * tk.nqb + r % tk.nqb;
        const int64_t j = tk.g * G.rep + r / tk.nqb;
        std::fill_n(acc.data(), d2, 0.f);
        for (int64_t c = 0; c < S; c++) {
          const float m1 = m[c * Rt + r], m2 = m[c * Rt + rn];
          const float a = (L[r] > 0.f && m1 != NEG_INF) ? std::exp(m1 - M[r]) / L[r] : 0.f;
          const float b = (L[rn] > 0.f && m2 != NEG_INF) ? lamp[G.lam_at(tk.bi, j, tk.i0 + r % tk.nqb)] * std::exp(m2 - M[rn]) / L[rn] : 0.f;
          const float* o1 = o + (c * Rt + r) * d2;
          const float* o2 = o + (c * Rt + rn) * d2;
          for (int64_t e = 0; e < d2; e++) acc[e] += a * o1[e] - b * o2[e];
        }
        from_float<T>(acc.data(), op + ((tk.bi * G.H + j) * Lq + tk.i0 + r % tk.nqb) * d2, d2);
      }
    }
  });
}

template <typename F>
void dispatch(const at::Tensor& q, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cpu_fused", [&] {
    if constexpr (std::is_same<scalar_t, double>::value) {
      TORCH_CHECK(false, "cpu_fused: float64 is not supported");
    } else {
      f(scalar_t(0));
    }
  });
}

// V1 and V2 (q holds both maps of each head) through one geometry.
std::vector<at::Tensor> fwd_maps(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam,
                                 const at::Tensor& lo, const at::Tensor& hi, const c10::optional<at::Tensor>& mask_opt,
                                 double scale, const Geometry& G) {
  TORCH_CHECK(lam.numel() == G.nlam, "cpu_fused: lam has the wrong number of entries");
  Mask mask = make_mask(mask_opt, G);
  at::Tensor out = at::empty({G.B, G.H, G.Lq, G.dv}, q.options());
  at::Tensor lse = at::empty({G.B, G.H, 4, G.Lq}, q.options().dtype(at::kFloat));  // max1, sum1, max2, sum2
  dispatch(q, [&](auto x) {
    using T = decltype(x);
    const T* qp = q.data_ptr<T>();
    const int64_t S = decode_chunks(G);
    if (S > 1)
      decode_split_kernel<T>(qp, qp + G.Lq * G.d, k, v, lam, lo, hi, mask, scale, G, S, out, lse);
    else
      forward_kernel<T>(qp, qp + G.Lq * G.d, k, v, lam, lo, hi, mask, scale, G, out, lse);
  });
  return {out, lse};
}

std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam,
                            const at::Tensor& lo, const at::Tensor& hi, const c10::optional<at::Tensor>& mask_opt,
                            double scale, int64_t block_rows, int64_t key_tile) {
  check_inputs({&q}, k, v, lam, lo, hi);
  return fwd_maps(q, k, v, lam, lo, hi, mask_opt, scale, geometry_v1(q, k, v, lo, block_rows, key_tile));
}

std::vector<at::Tensor> v2_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam,
                               const at::Tensor& lo, const at::Tensor& hi, const c10::optional<at::Tensor>& mask_opt,
                               double scale, int64_t block_rows, int64_t key_tile) {
  check_inputs({&q}, k, v, lam, lo, hi);
  TORCH_CHECK(k.size(1) > 0 && (q.size(1) / 2) % k.size(1) == 0 && v.size(3) == q.size(3),
              "cpu_fused: V2 needs Hkv dividing H and v as wide as q");
  return fwd_maps(q, k, v, lam, lo, hi, mask_opt, scale, geometry_v2(q, k, v, lo, block_rows, key_tile));
}

std::vector<at::Tensor> gda_fwd(const at::Tensor& qs, const at::Tensor& qn, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& lam, const at::Tensor& lo, const at::Tensor& hi,
                                const c10::optional<at::Tensor>& mask_opt, double scale, int64_t block_rows,
                                int64_t key_tile) {
  check_inputs({&qs, &qn}, k, v, lam, lo, hi);
  Geometry G = geometry_gda(qs, qn, k, v, lo, block_rows, key_tile);
  TORCH_CHECK(lam.numel() == G.nlam, "cpu_fused: lam must hold one entry per signal head");
  Mask mask = make_mask(mask_opt, G);
  at::Tensor out = at::empty({G.B, G.H, G.Lq, 2 * G.d}, qs.options());
  at::Tensor lse = at::empty({G.B, G.H + G.Nn, 2, G.Lq}, qs.options().dtype(at::kFloat));  // (max, sum) per head
  dispatch(qs, [&](auto x) {
    using T = decltype(x);
    const int64_t S = decode_chunks(G);
    if (S > 1)
      decode_split_kernel<T>(qs.data_ptr<T>(), qn.data_ptr<T>(), k, v, lam, lo, hi, mask, scale, G, S, out, lse);
    else
      forward_kernel<T>(qs.data_ptr<T>(), qn.data_ptr<T>(), k, v, lam, lo, hi, mask, scale, G, out, lse);
  });
  return {out, lse};
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
//
// With r signal heads per noise head, the noise map's gradient collects its r signal heads:
// dS2 = P2 * (sum_j -lam_j s (dA_j - a_j)) with a_j = rowsum(dA_j P2); r = 1 is V1's formula.

template <typename T>
void backward_kernel(const at::Tensor& dout, const T* q1p, const T* q2p, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& lam, const at::Tensor& lo_t, const at::Tensor& hi_t, const Mask& mask,
                     const at::Tensor& lse, double scale_d, const Geometry& G, T* dq1p, T* dq2p,
                     at::Tensor& dkT_acc, at::Tensor& dvT_acc, at::Tensor& dlam_acc) {
  const int64_t d = G.d, d2 = G.dv, Lq = G.Lq, Lk = G.Lk, KT = G.KT;  // d2: the value width
  const float scale = static_cast<float>(scale_d);
  const int64_t ldk = G.ldk;
  at::Tensor kt = transposed_keys(k, k.scalar_type(), ldk);  // (B, 2Hkv, d, ldk)
  at::Tensor vt = transposed_keys(v, v.scalar_type(), ldk);  // (B, Hkv, 2d, ldk)
  const T* kp = k.data_ptr<T>();
  const T* ktp = kt.data_ptr<T>();
  const T* vtp = vt.data_ptr<T>();
  const T* dop = dout.data_ptr<T>();
  const float* lamp = lam.data_ptr<float>();
  const float* lsep = lse.data_ptr<float>();
  const int32_t* lo = lo_t.data_ptr<int32_t>();
  const int32_t* hi = hi_t.data_ptr<int32_t>();
  const int64_t ntasks = G.B * G.Hkv * G.nblocks;
  const int64_t R1max = G.rep * G.nq, R2max = G.rep2 * G.nq;
  const int64_t nthreads = dkT_acc.size(0);

  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), nthreads - 1);
    float* dkT = dkT_acc.data_ptr<float>() + tid * G.B * G.nkh * d * ldk;
    float* dvT = dvT_acc.data_ptr<float>() + tid * G.B * G.Hkv * d2 * ldk;
    double* dlam = dlam_acc.data_ptr<double>() + tid * G.nlam;
    // Score buffers are tile-major, as in the forward.
    const int64_t ldE = KT, ntiles = (Lk + KT - 1) / KT;
    std::vector<T> Q1(R1max * d), Q2(R2max * d), QT1(d * R1max), QT2(d * R2max), dO(R1max * d2), dOT(d2 * R1max);
    std::vector<float> P1(R1max * ntiles * KT), P2(R2max * ntiles * KT), dA(R1max * ntiles * KT);
    std::vector<float> r1(R1max), a2(R1max), lse1(R1max), sum1(R1max), lse2(R2max), sum2(R2max);
    std::vector<float> dQ1(R1max * d), dQ2(R2max * d), tmp(std::max(d2, KT)), acc(KT);
    constexpr bool is_bf16 = std::is_same<T, at::BFloat16>::value, is_half = std::is_same<T, at::Half>::value;
    std::vector<T> Ab(R1max * KT), DS1(is_bf16 ? R1max * KT : 0), DS2(is_bf16 ? R2max * KT : 0);
    std::vector<float> Kf(is_half ? 2 * KT * d : 0), QTf(is_half ? d * (R1max + R2max) : 0);
    std::vector<int64_t> c0s(G.nq), c1s(G.nq);

    for (int64_t task = begin; task < end; task++) {
      const auto [bi, g, i0, i1, nqb, R1, R2] = task_at(G, task);
      int64_t klo, khi;
      block_keys(G, lo, hi, bi, i0, i1, klo, khi);
      auto sig = [&](int64_t r) { return g * G.rep + r / nqb; };
      auto noi = [&](int64_t r) { return g * G.rep2 + r / nqb; };
      auto noise_of = [&](int64_t r) { return (r / nqb) / G.r * nqb + r % nqb; };
      auto q1row = [&](int64_t r) { return bi * G.q1b + sig(r) * G.q1h + (i0 + r % nqb) * d; };
      auto q2row = [&](int64_t r) { return bi * G.q2b + noi(r) * G.q2h + (i0 + r % nqb) * d; };
      if (khi <= klo) {
        for (int64_t r = 0; r < R1; r++) std::fill_n(dq1p + q1row(r), d, T(0));
        for (int64_t r = 0; r < R2; r++) std::fill_n(dq2p + q2row(r), d, T(0));
        continue;
      }
      for (int64_t i = i0; i < i1; i++) {
        c0s[i - i0] = lo[bi * G.lo_sb + i];
        c1s[i - i0] = hi[bi * G.lo_sb + i];
      }
      for (int64_t r = 0; r < R1; r++) {
        const int64_t i = i0 + r % nqb;
        std::copy_n(q1p + q1row(r), d, Q1.data() + r * d);
        std::copy_n(dop + ((bi * G.H + sig(r)) * Lq + i) * d2, d2, dO.data() + r * d2);
        const float* st = lsep + bi * G.lsb + sig(r) * G.ls1h + G.ls1o + i;
        lse1[r] = st[0];
        sum1[r] = st[Lq];
        r1[r] = a2[r] = 0.f;
      }
      for (int64_t r = 0; r < R2; r++) {
        std::copy_n(q2p + q2row(r), d, Q2.data() + r * d);
        const float* st = lsep + bi * G.lsb + noi(r) * G.ls2h + G.ls2o + i0 + r % nqb;
        lse2[r] = st[0];
        sum2[r] = st[Lq];
      }
      for (int64_t c = 0; c < d; c++) {
        for (int64_t r = 0; r < R1; r++) QT1[c * R1 + r] = Q1[r * d + c];
        for (int64_t r = 0; r < R2; r++) QT2[c * R2 + r] = Q2[r * d + c];
      }
      for (int64_t c = 0; c < d2; c++)
        for (int64_t r = 0; r < R1; r++) dOT[c * R1 + r] = dO[r * d2 + c];
      if constexpr (is_half) {
        to_float<T>(QT1.data(), QTf.data(), d * R1);
        to_float<T>(QT2.data(), QTf.data() + d * R1, d * R2);
      }
      const T* kt1 = ktp + (bi * G.nkh + g * G.kh1m) * d * ldk;
      const T* kt2 = kt1 + G.kh2o * d * ldk;
      const T* k1 = kp + bi * G.ksb + g * G.kh1m * G.ksh;
      const T* k2 = k1 + G.kh2o * G.ksh;
      const T* vtg = vtp + (bi * G.Hkv + g) * d2 * ldk;
      float* dkT1 = dkT + (bi * G.nkh + g * G.kh1m) * d * ldk;
      float* dkT2 = dkT1 + G.kh2o * d * ldk;  // the same buffer in V2: both maps' dK add up
      float* dvTg = dvT + (bi * G.Hkv + g) * d2 * ldk;
      const int64_t nt = (khi - klo + KT - 1) / KT;
      const int64_t W = fVec::size();

      // P of one row from the saved row max and sum (zeros where the row sees nothing).
      auto probs = [&](float* s, int64_t n, int64_t t0, int64_t r, float mx, float sum, int64_t mhead) {
        const int64_t i = i0 + r % nqb;
        const int64_t c0 = std::clamp<int64_t>(c0s[i - i0] - t0, 0, n), c1 = std::clamp<int64_t>(c1s[i - i0] - t0, 0, n);
        if (c1 <= c0 || mx == NEG_INF) {
          std::fill_n(s, n, 0.f);
          return;
        }
        float mul;
        prepare_row(s, n, c0, c1, scale, mask, bi, mhead, i, t0, mul);
        exp_row(s, s, n, c0, c1, mx, mul, 1.f / sum);
      };

      // Pass 1: P1, P2 (from the saved row max and sum), dA = dO V^T; dV^T += dO^T A; the row sums
      // r1 = rowsum(dA * P1) and a2 = rowsum(dA * P2) of each signal row.
      for (int64_t t = 0; t < nt; t++) {
        const int64_t t0 = klo + t * KT, t1 = std::min(khi, t0 + KT), n = t1 - t0;
        float* p1 = P1.data() + t * R1 * KT;
        float* p2 = P2.data() + t * R2 * KT;
        float* da = dA.data() + t * R1 * KT;
        gemm<T>(R1, n, d, Q1.data(), d, kt1 + t0, ldk, p1, ldE, false);
        gemm<T>(R2, n, d, Q2.data(), d, kt2 + t0, ldk, p2, ldE, false);
        gemm<T>(R1, n, d2, dO.data(), d2, vtg + t0, ldk, da, ldE, false);
        for (int64_t r = 0; r < R2; r++) probs(p2 + r * ldE, n, t0, r, lse2[r], sum2[r], noi(r));
        for (int64_t r = 0; r < R1; r++) {
          float* s1 = p1 + r * ldE;
          const float* s2 = p2 + noise_of(r) * ldE;
          const float* dar = da + r * ldE;
          probs(s1, n, t0, r, lse1[r], sum1[r], sig(r) / G.r);
          const float lam_h = lamp[G.lam_at(bi, sig(r), i0 + r % nqb)];
          fVec acc1(0.f), acc2(0.f);
          const fVec vl(lam_h);
          float* a_out;
          if constexpr (std::is_same<T, float>::value) a_out = Ab.data() + r * KT;
          else a_out = tmp.data();
          int64_t c = 0;
          for (; c + W <= n; c += W) {
            fVec x1 = fVec::loadu(s1 + c), x2 = fVec::loadu(s2 + c), gv = fVec::loadu(dar + c);
            acc1 = at::vec::fmadd(x1, gv, acc1);
            acc2 = at::vec::fmadd(x2, gv, acc2);
            (x1 - x2 * vl).store(a_out + c);
          }
          float s_1 = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc1);
          float s_2 = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc2);
          for (; c < n; c++) {
            s_1 += s1[c] * dar[c];
            s_2 += s2[c] * dar[c];
            a_out[c] = s1[c] - lam_h * s2[c];
          }
          r1[r] += s_1;
          a2[r] += s_2;
          if constexpr (!std::is_same<T, float>::value) from_float<T>(a_out, Ab.data() + r * KT, n);
        }
        gemm<T>(d2, n, R1, dOT.data(), R1, Ab.data(), KT, dvTg + t0, ldk, true);
      }
      // Pass 2: dS1 = P1 (dA - r1) s per signal row; dS2 = P2 * sum over the noise row's signal rows
      // of -lam s (dA - a2); then dQ += dS K and dK^T += Q^T dS.
      for (int64_t t = 0; t < nt; t++) {
        const int64_t t0 = klo + t * KT, t1 = std::min(khi, t0 + KT), n = t1 - t0;
        float* p1 = P1.data() + t * R1 * KT;
        float* p2 = P2.data() + t * R2 * KT;
        const float* da = dA.data() + t * R1 * KT;
        for (int64_t r = 0; r < R1; r++) {
          float* s1 = p1 + r * ldE;
          const float* dar = da + r * ldE;
          const fVec vr1(r1[r]), vs(scale);
          int64_t c = 0;
          for (; c + W <= n; c += W) (fVec::loadu(s1 + c) * (fVec::loadu(dar + c) - vr1) * vs).store(s1 + c);
          for (; c < n; c++) s1[c] = s1[c] * (dar[c] - r1[r]) * scale;
          if constexpr (is_bf16) from_float<T>(s1, DS1.data() + r * KT, n);
        }
        for (int64_t rn = 0; rn < R2; rn++) {
          float* s2 = p2 + rn * ldE;
          // The signal rows of noise row rn: heads (rn / nqb) * r + u, u < r, at the same query.
          const int64_t first = (rn / nqb) * G.r * nqb + rn % nqb;
          if (G.r == 1) {
            const float* dar = da + first * ldE;
            const float nl = -lamp[G.lam_at(bi, sig(first), i0 + first % nqb)] * scale;
            const fVec va(a2[first]), vnl(nl);
            int64_t c = 0;
            for (; c + W <= n; c += W) (fVec::loadu(s2 + c) * (fVec::loadu(dar + c) - va) * vnl).store(s2 + c);
            for (; c < n; c++) s2[c] = s2[c] * (dar[c] - a2[first]) * nl;
          } else {
            std::fill_n(acc.data(), n, 0.f);
            for (int64_t u = 0; u < G.r; u++) {
              const int64_t rs = first + u * nqb;
              const float* dar = da + rs * ldE;
              const float nl = -lamp[G.lam_at(bi, sig(rs), i0 + rs % nqb)] * scale;
              const fVec va(a2[rs]), vnl(nl);
              int64_t c = 0;
              for (; c + W <= n; c += W)
                at::vec::fmadd(fVec::loadu(dar + c) - va, vnl, fVec::loadu(acc.data() + c)).store(acc.data() + c);
              for (; c < n; c++) acc[c] += (dar[c] - a2[rs]) * nl;
            }
            int64_t c = 0;
            for (; c + W <= n; c += W) (fVec::loadu(s2 + c) * fVec::loadu(acc.data() + c)).store(s2 + c);
            for (; c < n; c++) s2[c] *= acc[c];
          }
          if constexpr (is_bf16) from_float<T>(s2, DS2.data() + rn * KT, n);
        }
        if constexpr (is_half) {
          // float16 would flush the small entries of dS to zero (its range ends near 6e-8): the dS
          // products run in float32, with the key tile converted.
          to_float<T>(k1 + t0 * d, Kf.data(), n * d);
          to_float<T>(k2 + t0 * d, Kf.data() + n * d, n * d);
          gemm<float>(R1, d, n, p1, ldE, Kf.data(), d, dQ1.data(), d, t > 0);
          gemm<float>(R2, d, n, p2, ldE, Kf.data() + n * d, d, dQ2.data(), d, t > 0);
          gemm<float>(d, n, R1, QTf.data(), R1, p1, ldE, dkT1 + t0, ldk, true);
          gemm<float>(d, n, R2, QTf.data() + d * R1, R2, p2, ldE, dkT2 + t0, ldk, true);
          continue;
        }
        const T* ds1;
        const T* ds2;
        int64_t ld;
        if constexpr (std::is_same<T, float>::value) {
          ds1 = p1;
          ds2 = p2;
          ld = ldE;
        } else {
          ds1 = DS1.data();
          ds2 = DS2.data();
          ld = KT;
        }
        gemm<T>(R1, d, n, ds1, ld, k1 + t0 * d, d, dQ1.data(), d, t > 0);
        gemm<T>(R2, d, n, ds2, ld, k2 + t0 * d, d, dQ2.data(), d, t > 0);
        gemm<T>(d, n, R1, QT1.data(), R1, ds1, ld, dkT1 + t0, ldk, true);
        gemm<T>(d, n, R2, QT2.data(), R2, ds2, ld, dkT2 + t0, ldk, true);
      }
      for (int64_t r = 0; r < R1; r++) {
        from_float<T>(dQ1.data() + r * d, dq1p + q1row(r), d);
        dlam[G.lam_at(bi, sig(r), i0 + r % nqb)] -= a2[r];
      }
      for (int64_t r = 0; r < R2; r++) from_float<T>(dQ2.data() + r * d, dq2p + q2row(r), d);
    }
  });
}

// Per-thread float32 dK^T / dV^T buffers, reduced and transposed once at the end.
struct GradBuffers {
  int64_t T, Lk;
  at::Tensor dkT, dvT, dlam;  // (T, B, heads, width, ldk): rows of Lk keys, ldk apart
  GradBuffers(const Geometry& G, const at::Tensor& like) {
    T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), G.B * G.Hkv * G.nblocks));
    auto f32 = like.options().dtype(at::kFloat);
    dkT = at::zeros({T, G.B, G.nkh, G.d, G.ldk}, f32);
    dvT = at::zeros({T, G.B, G.Hkv, G.dv, G.ldk}, f32);
    Lk = G.Lk;
    dlam = at::zeros({T, G.nlam}, like.options().dtype(at::kDouble));
  }
  // One thread's buffer, or their sum, without the padding, as (B, heads, Lk, width) in dtype t.
  at::Tensor keys_major(const at::Tensor& acc, at::ScalarType t) const {
    return (T == 1 ? acc[0] : acc.sum(0)).narrow(-1, 0, Lk).transpose(-1, -2).to(t).contiguous();
  }
  at::Tensor dk(at::ScalarType t) const { return keys_major(dkT, t); }
  at::Tensor dv(at::ScalarType t) const { return keys_major(dvT, t); }
  at::Tensor dl() const { return dlam.sum(0).to(at::kFloat); }
};

void check_grad_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& lse) {
  TORCH_CHECK(dout.is_contiguous() && dout.scalar_type() == q.scalar_type(), "cpu_fused: grad_out must be contiguous, q's dtype");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat, "cpu_fused: lse must be contiguous float32");
}

std::vector<at::Tensor> bwd_maps(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& lam, const at::Tensor& lo, const at::Tensor& hi,
                                 const c10::optional<at::Tensor>& mask_opt, const at::Tensor& lse, double scale,
                                 const Geometry& G) {
  check_grad_inputs(dout, q, lse);
  TORCH_CHECK(lam.numel() == G.nlam, "cpu_fused: lam has the wrong number of entries");
  Mask mask = make_mask(mask_opt, G);
  GradBuffers buf(G, q);
  at::Tensor dq = at::empty_like(q);
  dispatch(q, [&](auto x) {
    using T = decltype(x);
    const T* qp = q.data_ptr<T>();
    T* dqp = dq.data_ptr<T>();
    const int64_t off = G.Lq * G.d;
    backward_kernel<T>(dout, qp, qp + off, k, v, lam, lo, hi, mask, lse, scale, G, dqp, dqp + off, buf.dkT, buf.dvT,
                       buf.dlam);
  });
  return {dq, buf.dk(q.scalar_type()), buf.dv(q.scalar_type()), buf.dl().view(lam.sizes())};
}

std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lam, const at::Tensor& lo, const at::Tensor& hi,
                            const c10::optional<at::Tensor>& mask_opt, const at::Tensor& lse, double scale,
                            int64_t block_rows, int64_t key_tile) {
  check_inputs({&q}, k, v, lam, lo, hi);
  return bwd_maps(dout, q, k, v, lam, lo, hi, mask_opt, lse, scale, geometry_v1(q, k, v, lo, block_rows, key_tile));
}

std::vector<at::Tensor> v2_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& lam, const at::Tensor& lo, const at::Tensor& hi,
                               const c10::optional<at::Tensor>& mask_opt, const at::Tensor& lse, double scale,
                               int64_t block_rows, int64_t key_tile) {
  check_inputs({&q}, k, v, lam, lo, hi);
  return bwd_maps(dout, q, k, v, lam, lo, hi, mask_opt, lse, scale, geometry_v2(q, k, v, lo, block_rows, key_tile));
}

std::vector<at::Tensor> gda_bwd(const at::Tensor& dout, const at::Tensor& qs, const at::Tensor& qn, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& lam, const at::Tensor& lo, const at::Tensor& hi,
                                const c10::optional<at::Tensor>& mask_opt, const at::Tensor& lse, double scale,
                                int64_t block_rows, int64_t key_tile) {
  check_inputs({&qs, &qn}, k, v, lam, lo, hi);
  check_grad_inputs(dout, qs, lse);
  Geometry G = geometry_gda(qs, qn, k, v, lo, block_rows, key_tile);
  TORCH_CHECK(lam.numel() == G.nlam, "cpu_fused: lam must hold one entry per signal head");
  Mask mask = make_mask(mask_opt, G);
  GradBuffers buf(G, qs);
  at::Tensor dqs = at::empty_like(qs), dqn = at::empty_like(qn);
  dispatch(qs, [&](auto x) {
    using T = decltype(x);
    backward_kernel<T>(dout, qs.data_ptr<T>(), qn.data_ptr<T>(), k, v, lam, lo, hi, mask, lse, scale, G,
                       dqs.data_ptr<T>(), dqn.data_ptr<T>(), buf.dkT, buf.dvT, buf.dlam);
  });
  return {dqs, dqn, buf.dk(qs.scalar_type()), buf.dv(qs.scalar_type()), buf.dl()};
}

// The key intervals without a window or packing, in one call (a decode step would otherwise pay for
// four small torch ops; row_intervals narrows them by a dense mask). Row j sees [0, Lk) or, under
// the bottom-right causal mask, [0, clamp(j + Lk - Lq + 1, 0, Lk)).
std::vector<at::Tensor> intervals(int64_t lq, int64_t lk, bool causal) {
  TORCH_CHECK(lq >= 0 && lk >= 0, "cpu_fused: lq and lk must be non-negative");
  at::Tensor lo = at::zeros({1, lq}, at::kInt), hi = at::empty({1, lq}, at::kInt);
  int32_t* h = hi.data_ptr<int32_t>();
  for (int64_t j = 0; j < lq; j++) h[j] = static_cast<int32_t>(causal ? std::clamp<int64_t>(j + lk - lq + 1, 0, lk) : lk);
  return {lo, hi};
}

bool vec_is_native() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_SVE)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "fused differential attention forward: (out, lse)");
  m.def("bwd", &bwd, "fused differential attention backward: (dq, dk, dv, dlam)");
  m.def("v2_fwd", &v2_fwd, "fused differential attention V2 forward (lam per token): (out, lse)");
  m.def("v2_bwd", &v2_bwd, "fused differential attention V2 backward: (dq, dk, dv, dlam)");
  m.def("gda_fwd", &gda_fwd, "fused grouped differential attention forward: (out, lse)");
  m.def("gda_bwd", &gda_bwd, "fused grouped differential attention backward: (dq_signal, dq_noise, dk, dv, dlam)");
  m.def("decode_chunks", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo,
                            int64_t block_rows, int64_t key_tile) {
    return decode_chunks(geometry_v1(q, k, v, lo, block_rows, key_tile));
  }, "key chunks a V1 forward of these shapes splits the cache into (1: no split)");
  m.def("intervals", &intervals, "(lo, hi) int32 (1, Lq): every key, or the bottom-right causal range");
  m.def("vec_size", [] { return (int64_t)fVec::size(); }, "float lanes of at::vec in this build");
  m.def("vec_is_native", &vec_is_native, "whether at::vec was compiled for a vector ISA");
}
