// Fused segment-masked attention for XLA:CPU (the "cpu_flash" backend of sora_jax.models.attention).
//
// Forward and backward of softmax(q k^T / sqrt(D)) v with segment ids, FlashAttention-2 style: logits are
// formed a tile at a time in a buffer that stays in cache, masked, exponentiated and multiplied into the
// output without ever being written to memory as a whole, which is what bounds XLA:CPU's own attention.
// The contract is the one of attention.py: a query attends to keys with its own nonzero segment id; rows
// with segment 0 or with no valid key output 0 and get log-sum-exp 0.
//
// Layouts (row-major): q [B, Lq, H, D], k and v [B, Lk, H, D], segment ids int32 [B, L], lse f32 [B, H, Lq].
// float32 only; D must be a multiple of the vector width (16 floats covers both AVX2 and AVX-512 builds).
// Work is spread over XLA's intra-op thread pool: the forward over (batch, head, query block), the backward
// over (batch, head).
//
// Built on first use by sora_jax/kernels/cpu.py with the host's compiler (-O3 -march=native).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;  // floats per vector register
constexpr int MR = 6;   // rows per register tile
constexpr int NV = 4;   // vectors per register tile row (6 x 4 accumulators of 32 zmm registers)
#else
constexpr int VL = 8;
constexpr int MR = 6;
constexpr int NV = 2;   // 6 x 2 accumulators of 16 ymm registers
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline vi loadi(const int32_t* p) { vi v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
// A broadcast; cpu.py compiles with -fno-signed-zeros, without which `0 + x` stays a scalar add.
inline vf splat(float x) { return vf{} + x; }

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < VL; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

// exp(x) to about 2 ulp for x in [-87, 88] (Cody-Waite range reduction and a degree-6 polynomial);
// below -87 it returns a denormal-free tiny value, which the callers only ever multiply by a mask.
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.7f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer.
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// One register tile of C[R x NVEC*VL] (=, or += when acc) op(A)[R x K] . B[K x NVEC*VL].
// op(A)[i][k] is A[i * lda + k], or A[k * lda + i] when TA (A stored transposed).
template <bool TA, int R, int NVEC>
inline void tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
                 bool acc) {
  vf c[R][NVEC];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NVEC; ++v) c[r][v] = acc ? load(C + r * ldc + v * VL) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NVEC];
    for (int v = 0; v < NVEC; ++v) b[v] = load(B + k * ldb + v * VL);
    for (int r = 0; r < R; ++r) {
      const vf a = splat(TA ? A[k * lda + r] : A[r * lda + k]);
      for (int v = 0; v < NVEC; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NVEC; ++v) store(C + r * ldc + v * VL, c[r][v]);
}

template <bool TA, int NVEC>
inline void column_strip(int64_t m, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                         int64_t ldc, int64_t K, bool acc) {
  int64_t i = 0;
  auto a_at = [&](int64_t row) { return TA ? A + row : A + row * lda; };
  for (; i + MR <= m; i += MR) tile<TA, MR, NVEC>(a_at(i), lda, B, ldb, C + i * ldc, ldc, K, acc);
  switch (m - i) {
    case 5: tile<TA, 5, NVEC>(a_at(i), lda, B, ldb, C + i * ldc, ldc, K, acc); break;
    case 4: tile<TA, 4, NVEC>(a_at(i), lda, B, ldb, C + i * ldc, ldc, K, acc); break;
    case 3: tile<TA, 3, NVEC>(a_at(i), lda, B, ldb, C + i * ldc, ldc, K, acc); break;
    case 2: tile<TA, 2, NVEC>(a_at(i), lda, B, ldb, C + i * ldc, ldc, K, acc); break;
    case 1: tile<TA, 1, NVEC>(a_at(i), lda, B, ldb, C + i * ldc, ldc, K, acc); break;
    default: break;
  }
}

// C[m x n] (=, or += when acc) op(A)[m x K] . B[K x n]; n must be a multiple of VL.
template <bool TA>
void gemm(int64_t m, int64_t n, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc) {
  int64_t j = 0;
  for (; j + NV * VL <= n; j += NV * VL) column_strip<TA, NV>(m, A, lda, B + j, ldb, C + j, ldc, K, acc);
  switch ((n - j) / VL) {
#if defined(__AVX512F__)
    case 3: column_strip<TA, 3>(m, A, lda, B + j, ldb, C + j, ldc, K, acc); break;
    case 2: column_strip<TA, 2>(m, A, lda, B + j, ldb, C + j, ldc, K, acc); break;
#endif
    case 1: column_strip<TA, 1>(m, A, lda, B + j, ldb, C + j, ldc, K, acc); break;
    default: break;
  }
}

constexpr int64_t W = NV * VL;  // width of one column strip (and of a packed panel)

// C[m x n] (=, or += when acc) op(A)[m x K] . B, with B packed in panels of W columns: panel s holds columns
// [s W, (s + 1) W) as a contiguous [K][W] block, so a strip's loads stream without cache-set conflicts.
// n must be a multiple of W.
template <bool TA>
void gemm_panels(int64_t m, int64_t n, int64_t K, const float* A, int64_t lda, const float* Bp, float* C,
                 int64_t ldc, bool acc) {
  for (int64_t j = 0; j < n; j += W) column_strip<TA, NV>(m, A, lda, Bp + j * K, W, C + j, ldc, K, acc);
}

// Runs fn(i) for i in [0, n) on the calling thread and up to num_threads - 1 pool threads. Work is claimed
// from a shared counter and the caller waits only for claimed items, so a helper task that starts late (the
// pool busy elsewhere) finds nothing left and exits: no deadlock when several calls share the pool.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;
  std::mutex mu;
  std::condition_variable cv;
};

void run_items(const std::shared_ptr<ParallelState>& st) {
  for (;;) {
    const int64_t i = st->next.fetch_add(1);
    if (i >= st->n) return;
    (*st->fn)(i);
    if (st->done.fetch_add(1) + 1 == st->n) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  }
}

void parallel_for(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  auto st = std::make_shared<ParallelState>();
  st->n = n;
  st->fn = &fn;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([st] { run_items(st); });
  run_items(st);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == st->n; });
}

// A float buffer that its user writes in full before reading: unlike std::vector, no zero fill (megabytes a
// call for the packed keys and values).
class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(new float[n]) {}
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  float& operator[](int64_t i) { return data_[i]; }

 private:
  std::unique_ptr<float[]> data_;
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Nonzero segment id range [lo, hi] of ids[0, n); lo > hi when all are 0 (padding).
void segment_range(const int32_t* ids, int64_t n, int32_t* lo, int32_t* hi) {
  int32_t a = std::numeric_limits<int32_t>::max(), b = std::numeric_limits<int32_t>::min();
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] != 0) { a = std::min(a, ids[i]); b = std::max(b, ids[i]); }
  *lo = a; *hi = b;
}

struct Dims {
  int64_t B, Lq, Lk, H, D, Lkp;  // Lkp: Lk rounded up to W (the packed keys' length)
};

ffi::Error check(const Dims& d, ffi::AnyBuffer::Dimensions q, ffi::AnyBuffer::Dimensions k,
                 ffi::AnyBuffer::Dimensions v, ffi::AnyBuffer::Dimensions qs, ffi::AnyBuffer::Dimensions ks) {
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || qs.size() != 2 || ks.size() != 2)
    return ffi::Error::InvalidArgument("cpu_flash: expected q, k, v of rank 4 and segment ids of rank 2");
  for (int i = 0; i < 4; ++i)
    if (k[i] != v[i]) return ffi::Error::InvalidArgument("cpu_flash: k and v shapes differ");
  if (k[0] != d.B || k[2] != d.H || k[3] != d.D || qs[0] != d.B || qs[1] != d.Lq || ks[0] != d.B ||
      ks[1] != d.Lk)
    return ffi::Error::InvalidArgument("cpu_flash: q, k, v and segment id shapes do not agree");
  if (d.D % VL != 0)
    return ffi::Error::InvalidArgument("cpu_flash: head dim must be a multiple of the vector width");
  return ffi::Error::Success();
}

// The QK prologue of the "norm_rope" handlers: each head of each token is RMS-normalised with a learned
// per-channel scale, then rotated by its token's angles, pairs (c, c + D/2):
//   n = x / sqrt(mean(x^2) + eps),  y = n * scale,  z = (y1 cos - y2 sin, y1 sin + y2 cos).
// The same maths as layers.RMSNorm followed by rope.apply. The kernels apply it to each row as they pack q
// and k (and its backward as they write dq and dk), so it costs no pass over memory of its own: that is
// what saves XLA:CPU's passes for the norm, the rotation and their backward.
struct NormRope {
  const float* scale;  // [D]
  const float* cos;    // [B * L, D / 2], indexed by token
  const float* sin;
  float eps;
};

// Inverse RMS of one head's D values (D a multiple of VL).
inline float inv_rms(const float* x, int64_t D, float eps) {
  vf acc = vf{};
  for (int64_t c = 0; c < D; c += VL) acc += load(x + c) * load(x + c);
  return 1.f / std::sqrt(hsum(acc) / static_cast<float>(D) + eps);
}

// z = rotate(norm(x) * scale) for the head row x of token t, times `mul`.
inline void norm_rope_row(const NormRope& nr, int64_t t, const float* __restrict x, int64_t D, float mul,
                          float* __restrict z) {
  const int64_t half = D / 2;
  const float* __restrict cs = nr.cos + t * half;
  const float* __restrict sn = nr.sin + t * half;
  const float* __restrict g = nr.scale;
  const float r = inv_rms(x, D, nr.eps) * mul;
  for (int64_t c = 0; c < half; ++c) {
    const float y1 = x[c] * r * g[c], y2 = x[c + half] * r * g[c + half];
    z[c] = y1 * cs[c] - y2 * sn[c];
    z[c + half] = y1 * sn[c] + y2 * cs[c];
  }
}

// From dz (the gradient of norm_rope_row's z, mul 1): dx, and dscale += the scale's gradient. `n` and `dn`
// are D floats of scratch.
inline void norm_rope_row_backward(const NormRope& nr, int64_t t, const float* __restrict x,
                                   const float* __restrict dz, int64_t D, float* __restrict dx,
                                   float* __restrict dscale, float* __restrict n, float* __restrict dn) {
  const int64_t half = D / 2;
  const float* __restrict cs = nr.cos + t * half;
  const float* __restrict sn = nr.sin + t * half;
  const float* __restrict g = nr.scale;
  const float r = inv_rms(x, D, nr.eps);
  for (int64_t c = 0; c < half; ++c) {  // the rotation's transpose, then through the scale
    const float dy1 = dz[c] * cs[c] + dz[c + half] * sn[c];
    const float dy2 = dz[c + half] * cs[c] - dz[c] * sn[c];
    n[c] = x[c] * r;
    n[c + half] = x[c + half] * r;
    dscale[c] += dy1 * n[c];
    dscale[c + half] += dy2 * n[c + half];
    dn[c] = dy1 * g[c];
    dn[c + half] = dy2 * g[c + half];
  }
  vf acc = vf{};
  for (int64_t c = 0; c < D; c += VL) acc += load(dn + c) * load(n + c);
  const float m = hsum(acc) / static_cast<float>(D);
  for (int64_t c = 0; c < D; ++c) dx[c] = r * (dn[c] - n[c] * m);
}

// Packs one head's keys (or values) transposed and multiplied by `scale` into panels of W keys
// ([Lkp / W][D][W], see gemm_panels), zero past Lk; with `nr`, each key normalised and rotated first.
void pack_panels(const float* x, const Dims& d, int64_t b, int64_t h, float scale, float* out,
                 const NormRope* nr = nullptr) {
  const int64_t row = d.H * d.D;
  const float* base = x + b * d.Lk * row + h * d.D;
  std::vector<float> z(nr ? d.D : 0);
  for (int64_t p = 0; p < d.Lkp; p += W) {
    float* panel = out + p * d.D;
    for (int64_t j = 0; j < W; ++j) {
      const bool real = p + j < d.Lk;
      const float* src = base + (p + j) * row;
      float mul = scale;
      if (real && nr) {
        norm_rope_row(*nr, b * d.Lk + p + j, src, d.D, scale, z.data());
        src = z.data();
        mul = 1.f;
      }
      for (int64_t c = 0; c < d.D; ++c) panel[c * W + j] = real ? src[c] * mul : 0.f;
    }
  }
}

// Copies one head of x [B, L, H, D] into a contiguous [L][D] block; with `nr`, normalised and rotated.
void pack_rows(const float* x, int64_t L, const Dims& d, int64_t b, int64_t h, float* out,
               const NormRope* nr = nullptr) {
  const int64_t row = d.H * d.D;
  for (int64_t j = 0; j < L; ++j) {
    const float* src = x + (b * L + j) * row + h * d.D;
    if (nr)
      norm_rope_row(*nr, b * L + j, src, d.D, 1.f, out + j * d.D);
    else
      std::memcpy(out + j * d.D, src, d.D * sizeof(float));
  }
}

// Key segment ids padded to Lkp with -1 (never a query's id) so padded columns mask themselves.
std::vector<int32_t> padded_kv_segments(const int32_t* ks, const Dims& d) {
  std::vector<int32_t> out(d.B * d.Lkp, -1);
  for (int64_t b = 0; b < d.B; ++b) std::copy(ks + b * d.Lk, ks + (b + 1) * d.Lk, out.begin() + b * d.Lkp);
  return out;
}

// Per batch row and block: the nonzero segment range (to skip block pairs that share no segment), and
// whether every id in the block is that one segment (no mask needed against a query of that segment).
struct BlockSegments {
  std::vector<int32_t> lo, hi;
  std::vector<char> uniform;
};

BlockSegments block_segments(const int32_t* ids, int64_t B, int64_t L, int64_t stride, int64_t block) {
  const int64_t nb = (L + block - 1) / block;
  BlockSegments out{std::vector<int32_t>(B * nb), std::vector<int32_t>(B * nb), std::vector<char>(B * nb)};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t start = j * block, n = std::min(block, L - start);
      const int32_t* x = ids + b * stride + start;
      segment_range(x, n, &out.lo[b * nb + j], &out.hi[b * nb + j]);
      out.uniform[b * nb + j] = x[0] > 0 && std::all_of(x, x + n, [&](int32_t id) { return id == x[0]; });
    }
  return out;
}

// What forward and backward both derive from their inputs: shapes, tile sizes, and the segment ranges of
// every query and key block.
struct Plan {
  Dims d;
  int64_t bq, bk, lds, nq, nk, row;
  float scale;
  std::vector<int32_t> ksp;  // key segment ids padded to Lkp
  BlockSegments kb, qb;
};

ffi::Error make_plan(ffi::AnyBuffer::Dimensions qd, ffi::AnyBuffer::Dimensions kd, ffi::AnyBuffer::Dimensions vd,
                     ffi::AnyBuffer::Dimensions qsd, ffi::AnyBuffer::Dimensions ksd, const int32_t* qseg,
                     const int32_t* kseg, int64_t block_q, int64_t block_kv, Plan* p) {
  if (qd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument("cpu_flash: expected q, k, v of rank 4 and segment ids of rank 2");
  Dims& d = p->d;
  d = Dims{qd[0], qd[1], kd[1], qd[2], qd[3], 0};
  d.Lkp = round_up(std::max<int64_t>(d.Lk, 1), W);
  if (auto err = check(d, qd, kd, vd, qsd, ksd); err.failure()) return err;
  p->bq = std::max<int64_t>(1, block_q);
  p->bk = round_up(std::max<int64_t>(W, block_kv), W);
  p->lds = p->bk + VL;  // logit tile row stride: one vector more breaks cache-set aliasing
  p->nq = (d.Lq + p->bq - 1) / p->bq;
  p->nk = (d.Lkp + p->bk - 1) / p->bk;
  p->row = d.H * d.D;
  p->scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  p->ksp = padded_kv_segments(kseg, d);
  p->kb = block_segments(p->ksp.data(), d.B, d.Lkp, d.Lkp, p->bk);
  p->qb = block_segments(qseg, d.B, d.Lq, d.Lq, p->bq);
  return ffi::Error::Success();
}

// The forward pass on plain pointers: Q [B, Lq, H, D], K and V [B, Lk, H, D] -> O [B, Lq, H, D], LSE [B, H, Lq].
// With qnr and knr (the norm_rope handlers), q and k are normalised and rotated as they are packed.
void forward(ffi::ThreadPool& pool, const Plan& p, const float* Q, const float* K, const float* V,
             const int32_t* QS, float* O, float* LSE, const NormRope* qnr = nullptr,
             const NormRope* knr = nullptr) {
  const Dims& d = p.d;
  const int64_t bq = p.bq, bk = p.bk, lds = p.lds, nq = p.nq, nk = p.nk, row = p.row;
  const float scale = p.scale;
  const std::vector<int32_t>& ksp = p.ksp;
  const BlockSegments &kb = p.kb, &qb = p.qb;

  // Per head: keys in panels (scaled), values as contiguous rows.
  Scratch kt(d.B * d.H * d.D * d.Lkp), vr(d.B * d.H * d.Lk * d.D);
  parallel_for(pool, d.B * d.H, [&](int64_t bh) {
    pack_panels(K, d, bh / d.H, bh % d.H, scale, kt.data() + bh * d.D * d.Lkp, knr);
    pack_rows(V, d.Lk, d, bh / d.H, bh % d.H, vr.data() + bh * d.Lk * d.D);
  });

  parallel_for(pool, d.B * d.H * nq, [&](int64_t item) {
    const int64_t bh = item / nq, qi = item % nq, b = bh / d.H, h = bh % d.H;
    const int64_t q0 = qi * bq, rows = std::min(bq, d.Lq - q0);
    const float* qptr = Q + (b * d.Lq + q0) * row + h * d.D;
    int64_t ldq = row;
    std::vector<float> qblock(qnr ? rows * d.D : 0);
    if (qnr) {  // this block's queries, normalised and rotated
      for (int64_t r = 0; r < rows; ++r)
        norm_rope_row(*qnr, b * d.Lq + q0 + r, qptr + r * row, d.D, 1.f, qblock.data() + r * d.D);
      qptr = qblock.data();
      ldq = d.D;
    }
    const int32_t* qs = QS + b * d.Lq + q0;
    const float* ktp = kt.data() + bh * d.D * d.Lkp;
    const float* vrp = vr.data() + bh * d.Lk * d.D;
    Scratch s(rows * lds);
    std::vector<float> acc(rows * d.D, 0.f), m(rows, kNegInf), l(rows, 0.f);
    for (int64_t kj = 0; kj < nk; ++kj) {
      if (qb.lo[b * nq + qi] > kb.hi[b * nk + kj] || kb.lo[b * nk + kj] > qb.hi[b * nq + qi]) continue;
      const int64_t k0 = kj * bk, cols = std::min(bk, d.Lkp - k0);
      const int32_t* ks = ksp.data() + b * d.Lkp + k0;
      gemm_panels<false>(rows, cols, d.D, qptr, ldq, ktp + k0 * d.D, s.data(), lds, false);
      // Keys all of one segment: only rows of that segment see them, unmasked.
      const bool uniform = kb.uniform[b * nk + kj];
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s.data() + r * lds;
        const vi qv = vi{} + qs[r];
        const bool unmasked = uniform && ks[0] == qs[r];
        vf mx = splat(kNegInf);
        if (unmasked)
          for (int64_t j = 0; j < cols; j += VL) mx = load(sr + j) > mx ? load(sr + j) : mx;
        else if (qs[r] != 0)
          for (int64_t j = 0; j < cols; j += VL) mx = ((loadi(ks + j) == qv) & (load(sr + j) > mx)) ? load(sr + j) : mx;
        const float row_max = hmax(mx);
        if (row_max == kNegInf) {  // no valid key in this block: contributes nothing
          std::fill(sr, sr + cols, 0.f);
          continue;
        }
        const float m_new = std::max(m[r], row_max);
        const float corr = std::exp(m[r] - m_new);  // 0 on this row's first valid block
        vf sum = vf{};
        const vf mv = splat(m_new);
        if (unmasked) {
          for (int64_t j = 0; j < cols; j += VL) {
            const vf p = vexp(load(sr + j) - mv);
            store(sr + j, p);
            sum += p;
          }
        } else {
          for (int64_t j = 0; j < cols; j += VL) {
            const vf p = loadi(ks + j) == qv ? vexp(load(sr + j) - mv) : vf{};
            store(sr + j, p);
            sum += p;
          }
        }
        l[r] = l[r] * corr + hsum(sum);
        m[r] = m_new;
        if (corr != 1.f)
          for (int64_t c = 0; c < d.D; ++c) acc[r * d.D + c] *= corr;
      }
      // Inner dimension: only the real keys (rows of V past Lk are never read).
      const int64_t kreal = std::max<int64_t>(0, std::min(cols, d.Lk - k0));
      gemm<false>(rows, d.D, kreal, s.data(), lds, vrp + k0 * d.D, d.D, acc.data(), d.D, true);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* o = O + (b * d.Lq + q0 + r) * row + h * d.D;
      const bool valid = l[r] > 0.f;
      const float inv = valid ? 1.f / l[r] : 0.f;
      for (int64_t c = 0; c < d.D; ++c) o[c] = acc[r * d.D + c] * inv;
      LSE[bh * d.Lq + q0 + r] = valid ? m[r] + std::log(l[r]) : 0.f;
    }
  });
}

// The backward pass on plain pointers: from the forward's inputs, its O and LSE and dO [B, Lq, H, D], the
// gradients dQ, dK, dV (each written whole). With qnr and knr (the norm_rope handlers), q and k are normalised and rotated as they are packed, dQ and dK
// are the gradients of the raw q and k, and dqscale and dkscale [D] receive the norm scales' gradients.
void backward(ffi::ThreadPool& pool, const Plan& p, const float* Q, const float* K, const float* V,
              const int32_t* QS, const float* Out, const float* LSE, const float* dO, float* dQ, float* dK,
              float* dV, const NormRope* qnr = nullptr, const NormRope* knr = nullptr, float* dqscale = nullptr,
              float* dkscale = nullptr) {
  const Dims& d = p.d;
  const int64_t bq = p.bq, bk = p.bk, lds = p.lds, nq = p.nq, nk = p.nk, row = p.row;
  const float scale = p.scale;
  const std::vector<int32_t>& ksp = p.ksp;
  const BlockSegments &kb = p.kb, &qb = p.qb;
  // Per (batch, head): the q scale's gradient, then the k scale's.
  std::vector<float> dscale_parts(qnr && knr ? 2 * d.B * d.H * d.D : 0, 0.f);

  parallel_for(pool, d.B * d.H, [&](int64_t bh) {
    const int64_t b = bh / d.H, h = bh % d.H;
    // This head's operands packed: keys (scaled) and values in panels; queries, output gradients and keys
    // as contiguous rows.
    Scratch kt(d.D * d.Lkp), vt(d.D * d.Lkp), qr(d.Lq * d.D), dor(d.Lq * d.D), kr(d.Lk * d.D), delta(d.Lq);
    Scratch p(bq * lds), ds(bq * lds), dka(bk * d.D), dva(bk * d.D);
    std::vector<float> dqa(d.Lq * d.D, 0.f);
    pack_panels(K, d, b, h, scale, kt.data(), knr);
    pack_panels(V, d, b, h, 1.f, vt.data());
    pack_rows(Q, d.Lq, d, b, h, qr.data(), qnr);
    pack_rows(dO, d.Lq, d, b, h, dor.data());
    pack_rows(K, d.Lk, d, b, h, kr.data(), knr);
    std::vector<float> n(d.D), dn(d.D);  // scratch of norm_rope_row_backward
    float* dks = knr ? dscale_parts.data() + (d.B * d.H + bh) * d.D : nullptr;
    const float* qbase = qr.data();
    const float* dobase = dor.data();
    const float* kbase = kr.data();
    const float* lse_bh = LSE + bh * d.Lq;
    const int32_t* qs_b = QS + b * d.Lq;
    for (int64_t i = 0; i < d.Lq; ++i) {  // delta_i = sum_c dO_ic O_ic, the softmax-backward row term
      const float* o = Out + (b * d.Lq + i) * row + h * d.D;
      const float* g = dobase + i * d.D;
      float acc = 0.f;
      for (int64_t c = 0; c < d.D; ++c) acc += o[c] * g[c];
      delta[i] = acc;
    }
    for (int64_t kj = 0; kj < nk; ++kj) {
      const int64_t k0 = kj * bk, cols = std::min(bk, d.Lkp - k0);
      const int64_t kreal = std::max<int64_t>(0, std::min(cols, d.Lk - k0));
      const int32_t* ks = ksp.data() + b * d.Lkp + k0;
      std::fill(dka.data(), dka.data() + bk * d.D, 0.f);
      std::fill(dva.data(), dva.data() + bk * d.D, 0.f);
      for (int64_t qi = 0; qi < nq; ++qi) {
        if (qb.lo[b * nq + qi] > kb.hi[b * nk + kj] || kb.lo[b * nk + kj] > qb.hi[b * nq + qi]) continue;
        const int64_t q0 = qi * bq, rows = std::min(bq, d.Lq - q0);
        // P = exp(scale * q k^T - lse), masked.
        gemm_panels<false>(rows, cols, d.D, qbase + q0 * d.D, d.D, kt.data() + k0 * d.D, p.data(), lds, false);
        const bool uniform = kb.uniform[b * nk + kj];
        for (int64_t r = 0; r < rows; ++r) {
          float* pr = p.data() + r * lds;
          const int32_t qsr = qs_b[q0 + r];
          const vi qv = vi{} + qsr;
          if (qsr == 0) {  // padding query: no probabilities, no gradient
            std::fill(pr, pr + cols, 0.f);
            continue;
          }
          const vf lv = splat(lse_bh[q0 + r]);
          if (uniform && ks[0] == qsr)
            for (int64_t j = 0; j < cols; j += VL) store(pr + j, vexp(load(pr + j) - lv));
          else
            for (int64_t j = 0; j < cols; j += VL)
              store(pr + j, loadi(ks + j) == qv ? vexp(load(pr + j) - lv) : vf{});
        }
        // dV_j += P^T dO_i
        gemm<true>(kreal, d.D, rows, p.data(), lds, dobase + q0 * d.D, d.D, dva.data(), d.D, true);
        // dP = dO_i v_j^T, then dS = P (dP - delta) * scale
        gemm_panels<false>(rows, cols, d.D, dobase + q0 * d.D, d.D, vt.data() + k0 * d.D, ds.data(), lds, false);
        for (int64_t r = 0; r < rows; ++r) {
          float* dsr = ds.data() + r * lds;
          const float* pr = p.data() + r * lds;
          const vf dl = splat(delta[q0 + r]);
          for (int64_t j = 0; j < cols; j += VL) store(dsr + j, load(pr + j) * (load(dsr + j) - dl) * scale);
        }
        // dK_j += dS^T q_i;  dQ_i += dS k_j
        gemm<true>(kreal, d.D, rows, ds.data(), lds, qbase + q0 * d.D, d.D, dka.data(), d.D, true);
        gemm<false>(rows, d.D, kreal, ds.data(), lds, kbase + k0 * d.D, d.D, dqa.data() + q0 * d.D, d.D, true);
      }
      for (int64_t j = 0; j < kreal; ++j) {
        float* dk_row = dK + (b * d.Lk + k0 + j) * row + h * d.D;
        if (knr)
          norm_rope_row_backward(*knr, b * d.Lk + k0 + j, K + (b * d.Lk + k0 + j) * row + h * d.D,
                                 dka.data() + j * d.D, d.D, dk_row, dks, n.data(), dn.data());
        else
          std::memcpy(dk_row, dka.data() + j * d.D, d.D * sizeof(float));
        std::memcpy(dV + (b * d.Lk + k0 + j) * row + h * d.D, dva.data() + j * d.D, d.D * sizeof(float));
      }
    }
    float* dqs = qnr ? dscale_parts.data() + bh * d.D : nullptr;
    for (int64_t i = 0; i < d.Lq; ++i) {
      float* dq_row = dQ + (b * d.Lq + i) * row + h * d.D;
      if (qnr)
        norm_rope_row_backward(*qnr, b * d.Lq + i, Q + (b * d.Lq + i) * row + h * d.D, dqa.data() + i * d.D,
                               d.D, dq_row, dqs, n.data(), dn.data());
      else
        std::memcpy(dq_row, dqa.data() + i * d.D, d.D * sizeof(float));
    }
  });
  // The scale gradients: per-head partial sums added in head order, the same result whichever thread ran which.
  if (qnr && knr) {
    std::fill(dqscale, dqscale + d.D, 0.f);
    std::fill(dkscale, dkscale + d.D, 0.f);
    for (int64_t bh = 0; bh < d.B * d.H; ++bh)
      for (int64_t c = 0; c < d.D; ++c) {
        dqscale[c] += dscale_parts[bh * d.D + c];
        dkscale[c] += dscale_parts[(d.B * d.H + bh) * d.D + c];
      }
  }
}

// The plan of the buffers the handlers receive (make_plan checks their shapes).
ffi::Error plan_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                   const ffi::Buffer<ffi::S32>& qseg, const ffi::Buffer<ffi::S32>& kseg, int64_t block_q,
                   int64_t block_kv, Plan* p) {
  return make_plan(q.dimensions(), k.dimensions(), v.dimensions(), qseg.dimensions(), kseg.dimensions(),
                   qseg.typed_data(), kseg.typed_data(), block_q, block_kv, p);
}

ffi::Error FlashForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg,
                        ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, int64_t block_q,
                        int64_t block_kv) {
  Plan p;
  if (auto err = plan_of(q, k, v, qseg, kseg, block_q, block_kv, &p); err.failure()) return err;
  forward(pool, p, q.typed_data(), k.typed_data(), v.typed_data(), qseg.typed_data(), out->typed_data(),
          lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error FlashBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg,
                         ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                         ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                         ffi::ResultBuffer<ffi::F32> dv, int64_t block_q, int64_t block_kv) {
  Plan p;
  if (auto err = plan_of(q, k, v, qseg, kseg, block_q, block_kv, &p); err.failure()) return err;
  backward(pool, p, q.typed_data(), k.typed_data(), v.typed_data(), qseg.typed_data(), out.typed_data(),
           lse.typed_data(), dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data());
  return ffi::Error::Success();
}

// The norm_rope handlers' extra inputs: norm scales [D] and rotation tables [B, L, D / 2] of q and of k.
struct NormRopeArgs {
  ffi::Buffer<ffi::F32> qscale, kscale, qcos, qsin, kcos, ksin;
};

// The plan, and the q and k prologues after checking the extra inputs' shapes against it.
ffi::Error plan_norm_rope(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                          const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::S32>& qseg,
                          const ffi::Buffer<ffi::S32>& kseg, const NormRopeArgs& a, int64_t block_q,
                          int64_t block_kv, float eps, Plan* p, NormRope* qnr, NormRope* knr) {
  if (auto err = plan_of(q, k, v, qseg, kseg, block_q, block_kv, p); err.failure()) return err;
  const Dims& d = p->d;
  const auto qs = a.qscale.dimensions(), ks = a.kscale.dimensions();
  if (qs.size() != 1 || ks.size() != 1 || qs[0] != d.D || ks[0] != d.D)
    return ffi::Error::InvalidArgument("cpu_flash norm_rope: the norm scales must be [head_dim]");
  for (auto [c, L] : {std::pair(a.qcos.dimensions(), d.Lq), std::pair(a.qsin.dimensions(), d.Lq),
                      std::pair(a.kcos.dimensions(), d.Lk), std::pair(a.ksin.dimensions(), d.Lk)})
    if (c.size() != 3 || c[0] != d.B || c[1] != L || c[2] != d.D / 2)
      return ffi::Error::InvalidArgument("cpu_flash norm_rope: cos and sin must be [B, L, head_dim / 2]");
  *qnr = NormRope{a.qscale.typed_data(), a.qcos.typed_data(), a.qsin.typed_data(), eps};
  *knr = NormRope{a.kscale.typed_data(), a.kcos.typed_data(), a.ksin.typed_data(), eps};
  return ffi::Error::Success();
}

ffi::Error FlashNormRopeForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg,
                                ffi::Buffer<ffi::F32> qscale, ffi::Buffer<ffi::F32> kscale,
                                ffi::Buffer<ffi::F32> qcos, ffi::Buffer<ffi::F32> qsin,
                                ffi::Buffer<ffi::F32> kcos, ffi::Buffer<ffi::F32> ksin,
                                ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, int64_t block_q,
                                int64_t block_kv, float eps) {
  Plan p;
  NormRope qnr, knr;
  if (auto err = plan_norm_rope(q, k, v, qseg, kseg, {qscale, kscale, qcos, qsin, kcos, ksin}, block_q, block_kv,
                                eps, &p, &qnr, &knr);
      err.failure())
    return err;
  forward(pool, p, q.typed_data(), k.typed_data(), v.typed_data(), qseg.typed_data(), out->typed_data(),
          lse->typed_data(), &qnr, &knr);
  return ffi::Error::Success();
}

ffi::Error FlashNormRopeBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                 ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg,
                                 ffi::Buffer<ffi::F32> qscale, ffi::Buffer<ffi::F32> kscale,
                                 ffi::Buffer<ffi::F32> qcos, ffi::Buffer<ffi::F32> qsin,
                                 ffi::Buffer<ffi::F32> kcos, ffi::Buffer<ffi::F32> ksin,
                                 ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                                 ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                                 ffi::ResultBuffer<ffi::F32> dv, ffi::ResultBuffer<ffi::F32> dqscale,
                                 ffi::ResultBuffer<ffi::F32> dkscale, int64_t block_q, int64_t block_kv, float eps) {
  Plan p;
  NormRope qnr, knr;
  if (auto err = plan_norm_rope(q, k, v, qseg, kseg, {qscale, kscale, qcos, qsin, kcos, ksin}, block_q, block_kv,
                                eps, &p, &qnr, &knr);
      err.failure())
    return err;
  backward(pool, p, q.typed_data(), k.typed_data(), v.typed_data(), qseg.typed_data(), out.typed_data(),
           lse.typed_data(), dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(), &qnr, &knr,
           dqscale->typed_data(), dkscale->typed_data());
  return ffi::Error::Success();
}

// FFI bindings, in the handlers' parameter order: the thread pool and the attention inputs (q, k, v, q and kv
// segment ids); the norm_rope inputs (q and k norm scales, q cos and sin, k cos and sin); the tile attributes.
template <typename B>
auto bind_attention_inputs(B binding) {
  return std::move(binding).template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>();
}

template <typename B>
auto bind_norm_rope_inputs(B binding) {
  return std::move(binding).template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>();
}

template <typename B>
auto bind_tiles(B binding) {
  return std::move(binding).template Attr<int64_t>("block_q").template Attr<int64_t>("block_kv");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoraJaxFlashForward, FlashForward,
                              bind_tiles(bind_attention_inputs(ffi::Ffi::Bind())
                                             .Ret<ffi::Buffer<ffi::F32>>()    // out
                                             .Ret<ffi::Buffer<ffi::F32>>()));  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoraJaxFlashBackward, FlashBackward,
                              bind_tiles(bind_attention_inputs(ffi::Ffi::Bind())
                                             .Arg<ffi::Buffer<ffi::F32>>()    // out
                                             .Arg<ffi::Buffer<ffi::F32>>()    // lse
                                             .Arg<ffi::Buffer<ffi::F32>>()    // d out
                                             .Ret<ffi::Buffer<ffi::F32>>()    // dq
                                             .Ret<ffi::Buffer<ffi::F32>>()    // dk
                                             .Ret<ffi::Buffer<ffi::F32>>()));  // dv

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoraJaxFlashNormRopeForward, FlashNormRopeForward,
                              bind_tiles(bind_norm_rope_inputs(bind_attention_inputs(ffi::Ffi::Bind()))
                                             .Ret<ffi::Buffer<ffi::F32>>()    // out
                                             .Ret<ffi::Buffer<ffi::F32>>())   // lse
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoraJaxFlashNormRopeBackward, FlashNormRopeBackward,
                              bind_tiles(bind_norm_rope_inputs(bind_attention_inputs(ffi::Ffi::Bind()))
                                             .Arg<ffi::Buffer<ffi::F32>>()    // out
                                             .Arg<ffi::Buffer<ffi::F32>>()    // lse
                                             .Arg<ffi::Buffer<ffi::F32>>()    // d out
                                             .Ret<ffi::Buffer<ffi::F32>>()    // dq
                                             .Ret<ffi::Buffer<ffi::F32>>()    // dk
                                             .Ret<ffi::Buffer<ffi::F32>>()    // dv
                                             .Ret<ffi::Buffer<ffi::F32>>()    // d q norm scale
                                             .Ret<ffi::Buffer<ffi::F32>>())   // d k norm scale
                                  .Attr<float>("eps"));
