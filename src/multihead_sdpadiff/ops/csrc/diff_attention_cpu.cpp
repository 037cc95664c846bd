// Fused differential attention for CPU: forward, backward and decode at the FLOPs of standard
// attention of width 2d.
//
//   A1 = softmax(Q1 K1^T s + M)   A2 = softmax(Q2 K2^T s + M)   O = (A1 - lam A2) V
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

// S (R x n, ld ldc) = Qf (R x d, float) * K[0, n)^T, K rows of width d read in place.
template <typename T>
inline void scores_small(int64_t R, int64_t n, int64_t d, const float* Qf, const T* K, float* S, int64_t ldc,
                         float* krow) {
  const int64_t W = fVec::size();
  for (int64_t j = 0; j < n; j++) {
    const float* kr;
    if constexpr (std::is_same<T, float>::value) {
      kr = K + j * d;
    } else {
      to_float<T>(K + j * d, krow, d);
      kr = krow;
    }
    for (int64_t r = 0; r < R; r++) {
      const float* qr = Qf + r * d;
      fVec acc(0.f);
      int64_t c = 0;
      for (; c + W <= d; c += W) acc = at::vec::fmadd(fVec::loadu(qr + c), fVec::loadu(kr + c), acc);
      float sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc);
      for (; c < d; c++) sum += qr[c] * kr[c];
      S[r * ldc + j] = sum;
    }
  }
}

// O (R x d2) (+)= A (R x n, float, ld lda) * V[0, n) (rows of width d2 read in place): small R.
template <typename T>
inline void av_small(int64_t R, int64_t n, int64_t d2, const float* A, int64_t lda, const T* V, float* O,
                     bool add, float* vrow) {
  const int64_t W = fVec::size();
  if (!add) std::fill_n(O, R * d2, 0.f);
  for (int64_t j = 0; j < n; j++) {
    const float* vr;
    if constexpr (std::is_same<T, float>::value) {
      vr = V + j * d2;
    } else {
      to_float<T>(V + j * d2, vrow, d2);
      vr = vrow;
    }
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

// s[0, n) <- exp(s * mul - sub) * post (0 where s is -inf); returns the sum. sub must be finite.
// s * mul is rounded before the subtraction (no fma) so that the max entry gives exp(0) exactly, as
// in the forward: near one-hot rows need P to the last bit, since dS = P (dA - sum P dA) cancels.
inline float exp_row(float* s, int64_t n, int64_t c0, int64_t c1, float sub, float mul, float post = 1.f) {
  for (int64_t c = 0; c < c0; c++) s[c] = 0.f;
  for (int64_t c = c1; c < n; c++) s[c] = 0.f;
  const int64_t W = fVec::size();
  fVec vsub(sub), vmul(mul), vpost(post), vsum(0.f);
  const fVec vninf(NEG_INF), vzero(0.f);
  int64_t c = c0;
  for (; c + W <= c1; c += W) {
    fVec x = fVec::loadu(s + c);
    fVec e = ((x * vmul) - vsub).exp_u20() * vpost;
    e = fVec::blendv(e, vzero, x == vninf);
    e.store(s + c);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, vsum);
  for (; c < c1; c++) {
    float xm = s[c] * mul;
    float e = s[c] == NEG_INF ? 0.f : std::exp(xm - sub) * post;
    s[c] = e;
    sum += e;
  }
  return sum;
}

struct Geometry {
  int64_t B, H, Hkv, rep, Lq, Lk, d, nq, nblocks, KT;
  int64_t lo_sb;     // batch stride of lo/hi (0 when shared by the batch)
  int64_t ksb, ksh;  // batch and head strides of k (its rows are dense: sequence stride d)
  int64_t vsb, vsh;  // the same for v (sequence stride 2d)
};

// Query rows [i0, i1) of the block and their stacked rows: row r -> head j = r / nq_b, i = i0 + r % nq_b.
// The key range of the block: [klo, khi) = union of its rows' intervals.
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

Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo,
                  int64_t block_rows, int64_t key_tile) {
  Geometry G;
  G.B = q.size(0);
  G.H = q.size(1) / 2;
  G.Lq = q.size(2);
  G.d = q.size(3);
  G.Hkv = k.size(1) / 2;
  G.Lk = k.size(2);
  G.rep = G.H / G.Hkv;
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

Mask make_mask(const c10::optional<at::Tensor>& mask_opt, const Geometry& G) {
  Mask mask;
  if (!mask_opt.has_value()) return mask;
  const at::Tensor& m = *mask_opt;
  TORCH_CHECK(m.dim() == 4, "cpu_fused: mask must be 4-D");
  mask.kind = m.scalar_type() == at::kBool ? 1 : 2;
  TORCH_CHECK(mask.kind == 1 || m.scalar_type() == at::kFloat, "cpu_fused: mask must be bool or float32");
  auto stride = [&](int dim, int64_t full) { return m.size(dim) == 1 && full != 1 ? 0 : m.stride(dim); };
  mask.sb = stride(0, G.B);
  mask.sh = stride(1, G.H);
  mask.sq = stride(2, G.Lq);
  mask.sk = stride(3, G.Lk);
  if (mask.kind == 1)
    mask.b = m.data_ptr<bool>();
  else
    mask.f = m.data_ptr<float>();
  return mask;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam,
                  const at::Tensor& lo, const at::Tensor& hi) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "cpu_fused: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "cpu_fused: q, k, v must be 4-D");
  // k and v may be slices of a longer buffer (a preallocated KV cache): any batch and head strides,
  // but each head's rows must be dense.
  auto rows_dense = [](const at::Tensor& t) {
    return (t.size(3) <= 1 || t.stride(3) == 1) && (t.size(2) <= 1 || t.stride(2) == t.size(3));
  };
  TORCH_CHECK(q.is_contiguous() && rows_dense(k) && rows_dense(v),
              "cpu_fused: q must be contiguous and k, v dense within each head");
  TORCH_CHECK(lam.scalar_type() == at::kFloat && lam.is_contiguous(), "cpu_fused: lam must be contiguous float32");
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt && lo.is_contiguous() && hi.is_contiguous(),
              "cpu_fused: lo/hi must be contiguous int32");
  TORCH_CHECK(lo.dim() == 2 && lo.sizes() == hi.sizes() && lo.size(1) == q.size(2), "cpu_fused: lo/hi must be (1|B, Lq)");
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam,
                    const at::Tensor& lo_t, const at::Tensor& hi_t, const Mask& mask, double scale_d,
                    const Geometry& G, at::Tensor& out, at::Tensor& lse) {
  const int64_t d = G.d, d2 = 2 * d, Lq = G.Lq, Lk = G.Lk, KT = G.KT;
  const float scale = static_cast<float>(scale_d);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const float* lamp = lam.data_ptr<float>();
  const int32_t* lo = lo_t.data_ptr<int32_t>();
  const int32_t* hi = hi_t.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  float* lsep = lse.data_ptr<float>();
  const int64_t ntasks = G.B * G.Hkv * G.nblocks;
  const int64_t Rmax = G.rep * G.nq;
  // k transposed once, in float32, as the B operand of Q K^T: (B, 2Hkv, d, Lk). Decode steps
  // (fewer stacked rows than SMALL_ROWS in every block) read k in place instead.
  at::Tensor kt;
  const float* ktp = nullptr;
  if (G.rep * std::min(G.nq, Lq) >= SMALL_ROWS) {
    kt = k.transpose(-1, -2).to(at::kFloat).contiguous();
    ktp = kt.data_ptr<float>();
  }

  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch: packed q rows, both maps' exps over the block's whole key range, tile stats.
    const int64_t ntiles_max = (Lk + KT - 1) / KT;
    // Score buffers are tile-major: tile t's R x KT block is contiguous (row stride KT), so each
    // pass streams one block instead of R rows a whole key range apart.
    const int64_t ldE = KT, ntiles_all = (Lk + KT - 1) / KT;
    std::vector<T> Q1(Rmax * d), Q2(Rmax * d);
    std::vector<float> E1(Rmax * ntiles_all * KT), E2(Rmax * ntiles_all * KT);
    std::vector<float> m1(Rmax * ntiles_max), l1(Rmax * ntiles_max), m2(Rmax * ntiles_max), l2(Rmax * ntiles_max);
    std::vector<float> O(Rmax * d2), f1(Rmax), f2(Rmax), M1(Rmax), M2(Rmax), L1(Rmax), L2(Rmax);
    // The forward's GEMMs all run in float32: bf16/half q rows and k/v tiles are converted once per
    // tile (O(tile) work against the tile's O(rows * tile * d) products), which is both faster than
    // the low-precision GEMM here and keeps A1 - lam A2 in float32 for the product with v.
    constexpr bool is_f32 = std::is_same<T, float>::value;
    std::vector<float> Vf(is_f32 ? 0 : KT * d2);
    std::vector<float> Qf(Rmax * 2 * d), row(d2);  // q rows in float; one converted k/v row
    std::vector<int64_t> c0s(Rmax), c1s(Rmax);

    for (int64_t task = begin; task < end; task++) {
      const int64_t blk = task % G.nblocks;
      const int64_t g = (task / G.nblocks) % G.Hkv;
      const int64_t bi = task / (G.nblocks * G.Hkv);
      const int64_t i0 = blk * G.nq, i1 = std::min(Lq, i0 + G.nq), nqb = i1 - i0;
      const int64_t R = G.rep * nqb;
      int64_t klo, khi;
      block_keys(G, lo, hi, bi, i0, i1, klo, khi);
      auto out_row = [&](int64_t r) {
        int64_t h = g * G.rep + r / nqb, i = i0 + r % nqb;
        return op + ((bi * G.H + h) * Lq + i) * d2;
      };
      auto lse_row = [&](int64_t r, int64_t map) {
        int64_t h = g * G.rep + r / nqb, i = i0 + r % nqb;
        return lsep + ((bi * G.H + h) * 4 + map) * Lq + i;
      };
      if (khi <= klo) {  // no row of this block sees any key
        for (int64_t r = 0; r < R; r++) {
          std::fill_n(out_row(r), d2, T(0));
          *lse_row(r, 0) = *lse_row(r, 2) = NEG_INF;
          *lse_row(r, 1) = *lse_row(r, 3) = 0.f;
        }
        continue;
      }
      for (int64_t r = 0; r < R; r++) {
        int64_t h = g * G.rep + r / nqb, i = i0 + r % nqb;
        std::copy_n(qp + ((bi * 2 * G.H + 2 * h) * Lq + i) * d, d, Q1.data() + r * d);
        std::copy_n(qp + ((bi * 2 * G.H + 2 * h + 1) * Lq + i) * d, d, Q2.data() + r * d);
        c0s[r] = lo[bi * G.lo_sb + i];
        c1s[r] = hi[bi * G.lo_sb + i];
      }
      const T* k1 = kp + bi * G.ksb + 2 * g * G.ksh;
      const T* k2 = k1 + G.ksh;
      const T* vg = vp + bi * G.vsb + g * G.vsh;
      const int64_t nt = (khi - klo + KT - 1) / KT;
      const bool small = R < SMALL_ROWS;
      to_float<T>(Q1.data(), Qf.data(), R * d);
      to_float<T>(Q2.data(), Qf.data() + R * d, R * d);

      // Scores and exps, tile by tile, relative to each tile's row max.
      for (int64_t t = 0; t < nt; t++) {
        const int64_t t0 = klo + t * KT, t1 = std::min(khi, t0 + KT), n = t1 - t0;
        float* e1 = E1.data() + t * R * KT;
        float* e2 = E2.data() + t * R * KT;
        if (small) {
          scores_small<T>(R, n, d, Qf.data(), k1 + t0 * d, e1, ldE, row.data());
          scores_small<T>(R, n, d, Qf.data() + R * d, k2 + t0 * d, e2, ldE, row.data());
        } else {
          const float* kt1 = ktp + (bi * 2 * G.Hkv + 2 * g) * d * Lk;
          gemm<float>(R, n, d, Qf.data(), d, kt1 + t0, Lk, e1, ldE, false);
          gemm<float>(R, n, d, Qf.data() + R * d, d, kt1 + d * Lk + t0, Lk, e2, ldE, false);
        }
        for (int64_t r = 0; r < R; r++) {
          const int64_t h = g * G.rep + r / nqb, i = i0 + r % nqb;
          const int64_t c0 = std::clamp<int64_t>(c0s[r] - t0, 0, n), c1 = std::clamp<int64_t>(c1s[r] - t0, 0, n);
          float* s1 = e1 + r * ldE;
          float* s2 = e2 + r * ldE;
          if (c1 <= c0) {
            std::fill_n(s1, n, 0.f);
            std::fill_n(s2, n, 0.f);
            m1[r * nt + t] = m2[r * nt + t] = NEG_INF;
            l1[r * nt + t] = l2[r * nt + t] = 0.f;
            continue;
          }
          float mul1, mul2;
          float mx1 = prepare_row(s1, n, c0, c1, scale, mask, bi, h, i, t0, mul1);
          float mx2 = prepare_row(s2, n, c0, c1, scale, mask, bi, h, i, t0, mul2);
          m1[r * nt + t] = mx1;
          m2[r * nt + t] = mx2;
          l1[r * nt + t] = mx1 == NEG_INF ? (std::fill_n(s1, n, 0.f), 0.f) : exp_row(s1, n, c0, c1, mx1, mul1);
          l2[r * nt + t] = mx2 == NEG_INF ? (std::fill_n(s2, n, 0.f), 0.f) : exp_row(s2, n, c0, c1, mx2, mul2);
        }
      }
      // Row statistics.
      for (int64_t r = 0; r < R; r++) {
        float a = NEG_INF, b = NEG_INF;
        for (int64_t t = 0; t < nt; t++) {
          a = std::max(a, m1[r * nt + t]);
          b = std::max(b, m2[r * nt + t]);
        }
        float sa = 0.f, sb = 0.f;
        for (int64_t t = 0; t < nt; t++) {
          if (a != NEG_INF && m1[r * nt + t] != NEG_INF) sa += l1[r * nt + t] * std::exp(m1[r * nt + t] - a);
          if (b != NEG_INF && m2[r * nt + t] != NEG_INF) sb += l2[r * nt + t] * std::exp(m2[r * nt + t] - b);
        }
        M1[r] = a;
        M2[r] = b;
        L1[r] = sa;
        L2[r] = sb;
        *lse_row(r, 0) = sa > 0.f ? a : NEG_INF;  // row max and sum of each map, for the backward
        *lse_row(r, 1) = sa;
        *lse_row(r, 2) = sb > 0.f ? b : NEG_INF;
        *lse_row(r, 3) = sb;
      }
      // A1 - lam A2 tile by tile, then one product with v.
      for (int64_t t = 0; t < nt; t++) {
        const int64_t t0 = klo + t * KT, t1 = std::min(khi, t0 + KT), n = t1 - t0;
        for (int64_t r = 0; r < R; r++) {
          const float lam_h = lamp[g * G.rep + r / nqb];
          const float mt1 = m1[r * nt + t], mt2 = m2[r * nt + t];
          const float a = (L1[r] > 0.f && mt1 != NEG_INF) ? std::exp(mt1 - M1[r]) / L1[r] : 0.f;
          const float b = (L2[r] > 0.f && mt2 != NEG_INF) ? lam_h * std::exp(mt2 - M2[r]) / L2[r] : 0.f;
          float* s1 = E1.data() + t * R * KT + r * ldE;
          const float* s2 = E2.data() + t * R * KT + r * ldE;
          const fVec va(a), vb(b);
          const int64_t W = fVec::size();
          int64_t c = 0;
          for (; c + W <= n; c += W) (fVec::loadu(s1 + c) * va - fVec::loadu(s2 + c) * vb).store(s1 + c);
          for (; c < n; c++) s1[c] = s1[c] * a - s2[c] * b;
        }
        const float* A = E1.data() + t * R * KT;
        if (small) {
          av_small<T>(R, n, d2, A, ldE, vg + t0 * d2, O.data(), t > 0, row.data());
        } else if constexpr (is_f32) {
          gemm<float>(R, d2, n, A, ldE, vg + t0 * d2, d2, O.data(), d2, t > 0);
        } else {
          to_float<T>(vg + t0 * d2, Vf.data(), n * d2);
          gemm<float>(R, d2, n, A, ldE, Vf.data(), d2, O.data(), d2, t > 0);
        }
      }
      for (int64_t r = 0; r < R; r++) from_float<T>(O.data() + r * d2, out_row(r), d2);
    }
  });
}

std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam,
                            const at::Tensor& lo, const at::Tensor& hi, const c10::optional<at::Tensor>& mask_opt,
                            double scale, int64_t block_rows, int64_t key_tile) {
  check_inputs(q, k, v, lam, lo, hi);
  Geometry G = geometry(q, k, v, lo, block_rows, key_tile);
  Mask mask = make_mask(mask_opt, G);
  at::Tensor out = at::empty({G.B, G.H, G.Lq, 2 * G.d}, q.options());
  at::Tensor lse = at::empty({G.B, G.H, 4, G.Lq}, q.options().dtype(at::kFloat));  // max1, sum1, max2, sum2
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cpu_fused_fwd", [&] {
    if constexpr (std::is_same<scalar_t, double>::value) {
      TORCH_CHECK(false, "cpu_fused: float64 is not supported");
    } else {
      forward_kernel<scalar_t>(q, k, v, lam, lo, hi, mask, scale, G, out, lse);
    }
  });
  return {out, lse};
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

template <typename T>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& lam, const at::Tensor& lo_t, const at::Tensor& hi_t, const Mask& mask,
                     const at::Tensor& lse, double scale_d, const Geometry& G, at::Tensor& dq, at::Tensor& dkT_acc,
                     at::Tensor& dvT_acc, at::Tensor& dlam_acc) {
  const int64_t d = G.d, d2 = 2 * d, Lq = G.Lq, Lk = G.Lk, KT = G.KT;
  const float scale = static_cast<float>(scale_d);
  at::Tensor kt = k.transpose(-1, -2).contiguous();  // (B, 2Hkv, d, Lk)
  at::Tensor vt = v.transpose(-1, -2).contiguous();  // (B, Hkv, 2d, Lk)
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* ktp = kt.data_ptr<T>();
  const T* vtp = vt.data_ptr<T>();
  const T* dop = dout.data_ptr<T>();
  const float* lamp = lam.data_ptr<float>();
  const float* lsep = lse.data_ptr<float>();
  const int32_t* lo = lo_t.data_ptr<int32_t>();
  const int32_t* hi = hi_t.data_ptr<int32_t>();
  T* dqp = dq.data_ptr<T>();
  const int64_t ntasks = G.B * G.Hkv * G.nblocks;
  const int64_t Rmax = G.rep * G.nq;
  const int64_t nthreads = dkT_acc.size(0);

  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), nthreads - 1);
    float* dkT = dkT_acc.data_ptr<float>() + tid * G.B * 2 * G.Hkv * d * Lk;
    float* dvT = dvT_acc.data_ptr<float>() + tid * G.B * G.Hkv * d2 * Lk;
    double* dlam = dlam_acc.data_ptr<double>() + tid * G.H;
    // Score buffers are tile-major: tile t's R x KT block is contiguous (row stride KT), so each
    // pass streams one block instead of R rows a whole key range apart.
    const int64_t ldE = KT, ntiles_all = (Lk + KT - 1) / KT;
    std::vector<T> Q1(Rmax * d), Q2(Rmax * d), QT1(d * Rmax), QT2(d * Rmax), dO(Rmax * d2), dOT(d2 * Rmax);
    std::vector<float> P1(Rmax * ntiles_all * KT), P2(Rmax * ntiles_all * KT), dA(Rmax * ntiles_all * KT);
    std::vector<float> r1(Rmax), r2(Rmax), lse1(Rmax), lse2(Rmax), sum1(Rmax), sum2(Rmax), dQ1(Rmax * d), dQ2(Rmax * d), tmp(std::max(d2, KT));
    constexpr bool is_bf16 = std::is_same<T, at::BFloat16>::value, is_half = std::is_same<T, at::Half>::value;
    std::vector<T> Ab(Rmax * KT), DS1(is_bf16 ? Rmax * KT : 0), DS2(is_bf16 ? Rmax * KT : 0);
    std::vector<float> Kf(is_half ? 2 * KT * d : 0), QTf(is_half ? 2 * d * Rmax : 0);
    std::vector<int64_t> c0s(Rmax), c1s(Rmax);

    for (int64_t task = begin; task < end; task++) {
      const int64_t blk = task % G.nblocks;
      const int64_t g = (task / G.nblocks) % G.Hkv;
      const int64_t bi = task / (G.nblocks * G.Hkv);
      const int64_t i0 = blk * G.nq, i1 = std::min(Lq, i0 + G.nq), nqb = i1 - i0;
      const int64_t R = G.rep * nqb;
      int64_t klo, khi;
      block_keys(G, lo, hi, bi, i0, i1, klo, khi);
      auto head = [&](int64_t r) { return g * G.rep + r / nqb; };
      auto qrow = [&](int64_t r, int64_t map) {
        return ((bi * 2 * G.H + 2 * head(r) + map) * Lq + i0 + r % nqb) * d;
      };
      if (khi <= klo) {
        for (int64_t r = 0; r < R; r++) {
          std::fill_n(dqp + qrow(r, 0), d, T(0));
          std::fill_n(dqp + qrow(r, 1), d, T(0));
        }
        continue;
      }
      for (int64_t r = 0; r < R; r++) {
        const int64_t h = head(r), i = i0 + r % nqb;
        std::copy_n(qp + qrow(r, 0), d, Q1.data() + r * d);
        std::copy_n(qp + qrow(r, 1), d, Q2.data() + r * d);
        std::copy_n(dop + ((bi * G.H + h) * Lq + i) * d2, d2, dO.data() + r * d2);
        lse1[r] = lsep[((bi * G.H + h) * 4 + 0) * Lq + i];
        sum1[r] = lsep[((bi * G.H + h) * 4 + 1) * Lq + i];
        lse2[r] = lsep[((bi * G.H + h) * 4 + 2) * Lq + i];
        sum2[r] = lsep[((bi * G.H + h) * 4 + 3) * Lq + i];
        c0s[r] = lo[bi * G.lo_sb + i];
        c1s[r] = hi[bi * G.lo_sb + i];
        r1[r] = r2[r] = 0.f;
      }
      for (int64_t c = 0; c < d; c++)
        for (int64_t r = 0; r < R; r++) {
          QT1[c * R + r] = Q1[r * d + c];
          QT2[c * R + r] = Q2[r * d + c];
        }
      for (int64_t c = 0; c < d2; c++)
        for (int64_t r = 0; r < R; r++) dOT[c * R + r] = dO[r * d2 + c];
      if constexpr (is_half) {
        to_float<T>(QT1.data(), QTf.data(), d * R);
        to_float<T>(QT2.data(), QTf.data() + d * R, d * R);
      }
      const T* kt1 = ktp + (bi * 2 * G.Hkv + 2 * g) * d * Lk;
      const T* kt2 = kt1 + d * Lk;
      const T* k1 = kp + bi * G.ksb + 2 * g * G.ksh;
      const T* k2 = k1 + G.ksh;
      const T* vtg = vtp + (bi * G.Hkv + g) * d2 * Lk;
      float* dkT1 = dkT + (bi * 2 * G.Hkv + 2 * g) * d * Lk;
      float* dkT2 = dkT1 + d * Lk;
      float* dvTg = dvT + (bi * G.Hkv + g) * d2 * Lk;
      const int64_t nt = (khi - klo + KT - 1) / KT;
      const int64_t W = fVec::size();

      // Pass 1: P1, P2 (from the saved row max and sum), dA = dO V^T; dV^T += dO^T A; r = rowsum(dA * P).
      for (int64_t t = 0; t < nt; t++) {
        const int64_t t0 = klo + t * KT, t1 = std::min(khi, t0 + KT), n = t1 - t0;
        float* p1 = P1.data() + t * R * KT;
        float* p2 = P2.data() + t * R * KT;
        float* da = dA.data() + t * R * KT;
        gemm<T>(R, n, d, Q1.data(), d, kt1 + t0, Lk, p1, ldE, false);
        gemm<T>(R, n, d, Q2.data(), d, kt2 + t0, Lk, p2, ldE, false);
        gemm<T>(R, n, d2, dO.data(), d2, vtg + t0, Lk, da, ldE, false);
        for (int64_t r = 0; r < R; r++) {
          const int64_t h = head(r), i = i0 + r % nqb;
          const int64_t c0 = std::clamp<int64_t>(c0s[r] - t0, 0, n), c1 = std::clamp<int64_t>(c1s[r] - t0, 0, n);
          float* s1 = p1 + r * ldE;
          float* s2 = p2 + r * ldE;
          const float* dar = da + r * ldE;
          if (c1 <= c0 || lse1[r] == NEG_INF) {
            std::fill_n(s1, n, 0.f);
          } else {
            float mul;
            prepare_row(s1, n, c0, c1, scale, mask, bi, h, i, t0, mul);
            exp_row(s1, n, c0, c1, lse1[r], mul, 1.f / sum1[r]);
          }
          if (c1 <= c0 || lse2[r] == NEG_INF) {
            std::fill_n(s2, n, 0.f);
          } else {
            float mul;
            prepare_row(s2, n, c0, c1, scale, mask, bi, h, i, t0, mul);
            exp_row(s2, n, c0, c1, lse2[r], mul, 1.f / sum2[r]);
          }
          const float lam_h = lamp[h];
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
          float a1 = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc1);
          float a2 = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc2);
          for (; c < n; c++) {
            a1 += s1[c] * dar[c];
            a2 += s2[c] * dar[c];
            a_out[c] = s1[c] - lam_h * s2[c];
          }
          r1[r] += a1;
          r2[r] += a2;
          if constexpr (!std::is_same<T, float>::value) from_float<T>(a_out, Ab.data() + r * KT, n);
        }
        gemm<T>(d2, n, R, dOT.data(), R, Ab.data(), KT, dvTg + t0, Lk, true);
      }
      // Pass 2: dS, then dQ += dS K and dK^T += Q^T dS.
      for (int64_t t = 0; t < nt; t++) {
        const int64_t t0 = klo + t * KT, t1 = std::min(khi, t0 + KT), n = t1 - t0;
        float* p1 = P1.data() + t * R * KT;
        float* p2 = P2.data() + t * R * KT;
        const float* da = dA.data() + t * R * KT;
        for (int64_t r = 0; r < R; r++) {
          const float nl = -lamp[head(r)] * scale;
          float* s1 = p1 + r * ldE;
          float* s2 = p2 + r * ldE;
          const float* dar = da + r * ldE;
          const fVec vr1(r1[r]), vr2(r2[r]), vs(scale), vnl(nl);
          int64_t c = 0;
          for (; c + W <= n; c += W) {
            fVec gv = fVec::loadu(dar + c);
            (fVec::loadu(s1 + c) * (gv - vr1) * vs).store(s1 + c);
            (fVec::loadu(s2 + c) * (gv - vr2) * vnl).store(s2 + c);
          }
          for (; c < n; c++) {
            s1[c] = s1[c] * (dar[c] - r1[r]) * scale;
            s2[c] = s2[c] * (dar[c] - r2[r]) * nl;
          }
          if constexpr (std::is_same<T, at::BFloat16>::value) {
            from_float<T>(s1, DS1.data() + r * KT, n);
            from_float<T>(s2, DS2.data() + r * KT, n);
          }
        }
        if constexpr (std::is_same<T, at::Half>::value) {
          // float16 would flush the small entries of dS to zero (its range ends near 6e-8): the dS
          // products run in float32, with the key tile converted.
          to_float<T>(k1 + t0 * d, Kf.data(), n * d);
          to_float<T>(k2 + t0 * d, Kf.data() + n * d, n * d);
          gemm<float>(R, d, n, p1, ldE, Kf.data(), d, dQ1.data(), d, t > 0);
          gemm<float>(R, d, n, p2, ldE, Kf.data() + n * d, d, dQ2.data(), d, t > 0);
          gemm<float>(d, n, R, QTf.data(), R, p1, ldE, dkT1 + t0, Lk, true);
          gemm<float>(d, n, R, QTf.data() + d * R, R, p2, ldE, dkT2 + t0, Lk, true);
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
        gemm<T>(R, d, n, ds1, ld, k1 + t0 * d, d, dQ1.data(), d, t > 0);
        gemm<T>(R, d, n, ds2, ld, k2 + t0 * d, d, dQ2.data(), d, t > 0);
        gemm<T>(d, n, R, QT1.data(), R, ds1, ld, dkT1 + t0, Lk, true);
        gemm<T>(d, n, R, QT2.data(), R, ds2, ld, dkT2 + t0, Lk, true);
      }
      for (int64_t r = 0; r < R; r++) {
        from_float<T>(dQ1.data() + r * d, dqp + qrow(r, 0), d);
        from_float<T>(dQ2.data() + r * d, dqp + qrow(r, 1), d);
        dlam[head(r)] -= r2[r];
      }
    }
  });
}

std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lam, const at::Tensor& lo, const at::Tensor& hi,
                            const c10::optional<at::Tensor>& mask_opt, const at::Tensor& lse, double scale,
                            int64_t block_rows, int64_t key_tile) {
  check_inputs(q, k, v, lam, lo, hi);
  TORCH_CHECK(dout.is_contiguous() && dout.scalar_type() == q.scalar_type(), "cpu_fused: grad_out must be contiguous, q's dtype");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat, "cpu_fused: lse must be contiguous float32");
  Geometry G = geometry(q, k, v, lo, block_rows, key_tile);
  Mask mask = make_mask(mask_opt, G);
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), G.B * G.Hkv * G.nblocks));
  at::Tensor dq = at::empty_like(q);
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dkT = at::zeros({T, G.B, 2 * G.Hkv, G.d, G.Lk}, f32);
  at::Tensor dvT = at::zeros({T, G.B, G.Hkv, 2 * G.d, G.Lk}, f32);
  at::Tensor dlam = at::zeros({T, G.H}, q.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cpu_fused_bwd", [&] {
    if constexpr (std::is_same<scalar_t, double>::value) {
      TORCH_CHECK(false, "cpu_fused: float64 is not supported");
    } else {
      backward_kernel<scalar_t>(dout, q, k, v, lam, lo, hi, mask, lse, scale, G, dq, dkT, dvT, dlam);
    }
  });
  at::Tensor dk = (T == 1 ? dkT[0] : dkT.sum(0)).transpose(-1, -2).to(q.scalar_type()).contiguous();
  at::Tensor dv = (T == 1 ? dvT[0] : dvT.sum(0)).transpose(-1, -2).to(q.scalar_type()).contiguous();
  return {dq, dk, dv, dlam.sum(0).to(at::kFloat)};
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
  m.def("vec_size", [] { return (int64_t)fVec::size(); }, "float lanes of at::vec in this build");
  m.def("vec_is_native", &vec_is_native, "whether at::vec was compiled for a vector ISA");
}
