// The exact N:M proximal operator of ProxSparse on the CPU, for M = 4 and 8 and any N < M.
//
// The same algorithm as proxsparse/prox.py's _prox_general (read its comments for the maths):
// each group is sorted by magnitude; for every face k = N+1..M (the top-k entries positive) a
// damped Newton method runs from two starts (the best point on the ray t * a, and the face
// below's candidate with a small new entry), every step guarded so that the objective never
// increases; the candidate with the smallest objective, top-N included, wins.
//
// Groups are processed 16 at a time, one group per vector lane (GCC vector extensions: the
// same source compiles to AVX-512, AVX2 or SSE registers; the build uses -march=native, as it
// runs on the machine that uses it), so every step is branch-free across lanes. Two things
// the tensor version does not do make it faster without changing its answer beyond rounding:
// a block skips every face where a certificate proves the top-N point optimal in all its lanes
// (top_n_optimal), and it stops its Newton iterations once no lane can still lower its
// objective beyond float rounding (the Newton decrement) or no lane accepted a step.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

#define INLINE inline __attribute__((always_inline))

constexpr int kNewtonIters = 8;  // as prox.py's _NEWTON_ITERS ...
constexpr float kStepLengths[3] = {1.0f, 0.5f, 0.125f};  // ... _STEP_LENGTHS
constexpr int kRaySteps = 8;  // ... _RAY_STEPS
constexpr float kDecrementTol = 1e-8f;  // relative to the objective

INLINE vf splat(float x) { return vf{} + x; }
INLINE vf select(vi mask, vf a, vf b) { return mask ? a : b; }
INLINE vf vmin(vf a, vf b) { return a < b ? a : b; }
INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
INLINE vf vabs(vf x) { return x < 0 ? -x : x; }
INLINE vf vsqrt(vf x) {
  vf r;
  for (int l = 0; l < kLanes; ++l) r[l] = __builtin_sqrtf(x[l]);
  return r;
}
INLINE bool any(vi mask) {
  int32_t acc = 0;
  for (int l = 0; l < kLanes; ++l) acc |= mask[l];
  return acc != 0;
}
INLINE vi finite(vf x) { return (x - x) == 0; }  // inf - inf and NaN - NaN are NaN

template <int N>
INLINE vf power(vf x) {
  vf r = splat(1.0f);
  for (int i = 0; i < N; ++i) r *= x;
  return r;
}

// e_R of the first K entries of x
template <int K, int R>
INLINE vf esp(const vf* x) {
  vf e[R + 1];
  e[0] = splat(1.0f);
  for (int d = 1; d <= R; ++d) e[d] = splat(0.0f);
  for (int j = 0; j < K; ++j)
    for (int d = R; d > 0; --d) e[d] += x[j] * e[d - 1];
  return e[R];
}

// objective on the top-K face (in units of a1^2): tail = 1/2 sum of b^2 beyond the face
template <int N, int K>
INLINE vf face_objective(const vf* u, const vf* b, vf tail, vf ell) {
  vf sq = splat(0.0f);
  for (int j = 0; j < K; ++j) sq += (u[j] - b[j]) * (u[j] - b[j]);
  return 0.5f * sq + tail + ell * esp<K, N + 1>(u);
}

// Cholesky solve of h x = g for a symmetric h with unit diagonal (lower part in h[i][j], j < i);
// a pivot that is not safely positive is replaced by its magnitude (at least 1e-3), so x is a
// descent direction even where h is indefinite (prox.py's _solve_descent).
template <int K>
INLINE void solve_descent(vf (&h)[K][K], const vf* g, vf* x) {
  vf low[K][K], inv_diag[K];
  for (int j = 0; j < K; ++j) {
    vf d = splat(1.0f);
    for (int p = 0; p < j; ++p) d -= low[j][p] * low[j][p];
    vf pivot = select(d > 1e-6f, d, vmax(vabs(d), splat(1e-3f)));
    vf diag = vsqrt(pivot);
    low[j][j] = diag;
    inv_diag[j] = 1.0f / diag;
    for (int i = j + 1; i < K; ++i) {
      vf acc = h[i][j];
      for (int p = 0; p < j; ++p) acc -= low[i][p] * low[j][p];
      low[i][j] = acc * inv_diag[j];
    }
  }
  vf y[K];
  for (int i = 0; i < K; ++i) {
    vf acc = g[i];
    for (int p = 0; p < i; ++p) acc -= low[i][p] * y[p];
    y[i] = acc * inv_diag[i];
  }
  for (int i = K - 1; i >= 0; --i) {
    vf acc = y[i];
    for (int p = i + 1; p < K; ++p) acc -= low[p][i] * x[p];
    x[i] = acc * inv_diag[i];
  }
}

// Guarded Newton iterations on the top-K face from u (entries kept positive); returns the
// objective of the final u.
template <int N, int K>
INLINE vf damped_newton(vf* u, const vf* b, vf tail, vf ell) {
  vf obj = face_objective<N, K>(u, b, tail, ell);
  for (int it = 0; it < kNewtonIters; ++it) {
    // e_r(u without u_i), r = 0..N, from prefix and suffix polynomials (no cancellation)
    vf pre[K + 1][N + 1], suf[K + 1][N + 1];
    for (int r = 0; r <= N; ++r) pre[0][r] = suf[K][r] = splat(r == 0 ? 1.0f : 0.0f);
    for (int i = 0; i < K; ++i) {
      pre[i + 1][0] = splat(1.0f);
      for (int r = 1; r <= N; ++r) pre[i + 1][r] = pre[i][r] + u[i] * pre[i][r - 1];
    }
    for (int i = K - 1; i >= 0; --i) {
      suf[i][0] = splat(1.0f);
      for (int r = 1; r <= N; ++r) suf[i][r] = suf[i + 1][r] + u[i] * suf[i + 1][r - 1];
    }
    vf loo[K][N + 1], grad[K];
    for (int i = 0; i < K; ++i) {
      for (int r = 0; r <= N; ++r) {
        vf acc = splat(0.0f);
        for (int s = 0; s <= r; ++s) acc += pre[i][s] * suf[i + 1][r - s];
        loo[i][r] = acc;
      }
      grad[i] = u[i] - b[i] + ell * loo[i][N];
    }
    // Hessian: unit diagonal, off-diagonal ell * e_{N-1}(u without u_i, u_j), deflated from the
    // larger entry's leave-one-out polynomial (i < j: u_i >= u_j)
    vf h[K][K];
    for (int i = 0; i < K; ++i)
      for (int j = i + 1; j < K; ++j) {
        vf acc = loo[i][0];
        for (int r = 1; r < N; ++r) acc = loo[i][r] - u[j] * acc;
        h[j][i] = ell * acc;
      }
    vf step[K];
    solve_descent<K>(h, grad, step);
    // the Newton decrement grad . step is twice the decrease a full step predicts: once it is
    // below float resolution of the objective in every lane, no step can still help
    vf decrement = splat(0.0f);
    for (int j = 0; j < K; ++j) decrement += grad[j] * step[j];
    if (!any(decrement > kDecrementTol * obj)) break;
    // as in the tensor solver, each step length is tried from the point the previous one left
    vi moved = vi{} != 0;
    for (float t : kStepLengths) {
      vf trial[K];
      vi ok = vi{} == 0;
      for (int j = 0; j < K; ++j) {
        trial[j] = u[j] - t * step[j];
        ok &= (trial[j] > 0) & finite(trial[j]);
      }
      vf trial_obj = face_objective<N, K>(trial, b, tail, ell);
      ok &= trial_obj < obj;
      for (int j = 0; j < K; ++j) u[j] = select(ok, trial[j], u[j]);
      obj = select(ok, trial_obj, obj);
      moved |= ok;
    }
    if (!any(moved)) break;  // nothing changed: every further iteration would repeat this one
  }
  return obj;
}

// A certificate that the top-N point is a global minimum, for sorted b (b_1 = 1):
//   (1) ell * b_1 ... b_N >= b_{N+1}, and
//   (2) (b_{N+1}^2 + ... + b_M^2) * (1/b_1^2 + ... + 1/b_N^2) <= 1.
// Proof sketch: the minimiser lies in [0, b]; write u_i = b_i - d_i on the top N and P for their
// product. e_{N+1}(u) >= P * (sum of the tail of u), and minimising the tail terms alone gives
// f(u) - f(top-N) >= |d|^2 / 2 - sum_tail (b_j - ell P)_+^2 / 2. With
// P >= b_1...b_N (1 - sum d_i / b_i) >= b_1...b_N (1 - c |d|), c^2 = sum 1/b_i^2, the square
// root of the subtracted sum is convex in |d|, so it stays below |d| on [0, 1/c] once it does at
// both ends: at 0 that is (1), at 1/c it is (2); beyond 1/c the sum is at most |b_tail|^2 <=
// 1/c^2 by (2). Groups that already hold N non-zeros after a small perturbation (a learning
// step near its end) meet it; margins of 1e-5 absorb float rounding.
template <int N, int M>
INLINE vi top_n_optimal(const vf* b, vf ell) {
  vf prod = splat(1.0f), inv_sq = splat(0.0f), tail_sq = splat(0.0f);
  for (int i = 0; i < N; ++i) {
    prod *= b[i];
    inv_sq += 1.0f / (b[i] * b[i]);
  }
  for (int j = N; j < M; ++j) tail_sq += b[j] * b[j];
  vi local = ell * prod >= b[N] * (1.0f + 1e-5f);
  vi small_tail = tail_sq * inv_sq <= 1.0f - 1e-5f;
  return (b[N] == 0) | (local & small_tail);
}

template <int N, int M>
struct Block {
  vf a[M], b[M], best[M], prev[M];
  vf a1, ell, best_obj;
  vi top_n;

  template <int K>
  INLINE void face() {
    vf tail = splat(0.0f), nb2 = splat(0.0f);
    for (int j = K; j < M; ++j) tail += b[j] * b[j];
    tail *= 0.5f;
    for (int j = 0; j < K; ++j) nb2 += b[j] * b[j];
    // start 1: the best point on the ray t * b (convex scalar equation, Newton from t = 1)
    vf ek = float(N + 1) * ell * esp<K, N + 1>(b);
    vf t = splat(1.0f);
    for (int s = 0; s < kRaySteps; ++s) {
      vf num = (t - 1.0f) * nb2 + ek * power<N>(t);
      vf den = vmax(nb2 + float(N) * ek * power<N - 1>(t), splat(1e-30f));
      t -= num / den;
    }
    vf ray[K], grow[K];
    for (int j = 0; j < K; ++j) ray[j] = t * b[j];
    // start 2: the face below's candidate with a small new entry
    for (int j = 0; j < K - 1; ++j) grow[j] = prev[j];
    grow[K - 1] = 1e-3f * b[K - 1];
    vf obj_ray = damped_newton<N, K>(ray, b, tail, ell);
    vf obj_grow = damped_newton<N, K>(grow, b, tail, ell);
    vi pick = obj_grow < obj_ray;
    vf obj = select(pick, obj_grow, obj_ray);
    vi better = obj < best_obj;
    for (int j = 0; j < K; ++j) {
      vf cand = select(pick, grow[j], ray[j]);
      best[j] = select(better, cand, best[j]);
      prev[j] = cand;
    }
    for (int j = K; j < M; ++j) best[j] = select(better, splat(0.0f), best[j]);
    best_obj = select(better, obj, best_obj);
    top_n &= ~better;
  }

  template <int K>
  INLINE void faces() {
    if constexpr (K <= M) {
      face<K>();
      faces<K + 1>();
    }
  }
};

// Groups [g0, g0 + count) of z (rows of M values) into out, count <= kLanes.
template <int N, int M>
INLINE void solve_block(const float* z, float* out, int64_t g0, int count, float lam) {
  Block<N, M> blk;
  vi idx[M];
  for (int j = 0; j < M; ++j) {
    for (int l = 0; l < kLanes; ++l) {
      blk.a[j][l] = l < count ? std::fabs(z[(g0 + l) * M + j]) : 0.0f;
      idx[j][l] = j;
    }
  }
  // odd-even transposition sort, decreasing magnitude, ties by position
  for (int round = 0; round < M; ++round)
    for (int i = round % 2; i + 1 < M; i += 2) {
      vi swap = (blk.a[i + 1] > blk.a[i]) | ((blk.a[i + 1] == blk.a[i]) & (idx[i + 1] < idx[i]));
      vf hi = select(swap, blk.a[i + 1], blk.a[i]), lo = select(swap, blk.a[i], blk.a[i + 1]);
      vi ihi = swap ? idx[i + 1] : idx[i], ilo = swap ? idx[i] : idx[i + 1];
      blk.a[i] = hi, blk.a[i + 1] = lo, idx[i] = ihi, idx[i + 1] = ilo;
    }
  vf& a1 = blk.a1;
  a1 = vmax(blk.a[0], splat(std::numeric_limits<float>::min()));
  vf inv_a1 = 1.0f / a1;
  for (int j = 0; j < M; ++j) blk.b[j] = blk.a[j] * inv_a1;
  blk.ell = lam * power<N - 1>(a1);
  blk.best_obj = splat(0.0f);
  for (int j = 0; j < M; ++j) {
    blk.best[j] = j < N ? blk.b[j] : splat(0.0f);
    blk.prev[j] = blk.best[j];
    if (j >= N) blk.best_obj += 0.5f * blk.b[j] * blk.b[j];
  }
  blk.top_n = vi{} == 0;
  // Skip the faces where the top-N point is certainly optimal in every lane (see top_n_optimal)
  if (any(~top_n_optimal<N, M>(blk.b, blk.ell))) blk.template faces<N + 1>();
  // top-N and lam = 0 (the identity) exactly; otherwise u <= a and the order of a, which the
  // exact solution has, enforced against rounding
  vi identity = blk.ell == 0;
  vf run = splat(std::numeric_limits<float>::infinity());
  for (int j = 0; j < M; ++j) {
    run = vmin(run, vmin(blk.best[j] * a1, blk.a[j]));
    vf keep = j < N ? blk.a[j] : splat(0.0f);
    vf value = select(identity, blk.a[j], select(blk.top_n, keep, run));
    for (int l = 0; l < count; ++l) {
      int64_t at = (g0 + l) * M + idx[j][l];
      out[at] = std::copysign(value[l], z[at]);
    }
  }
}

template <int N, int M>
void solve_range(const float* z, float* out, int64_t groups, int64_t b0, int64_t b1, float lam) {
  for (int64_t blk = b0; blk < b1; ++blk) {
    int64_t g0 = blk * kLanes;
    int count = static_cast<int>(std::min<int64_t>(kLanes, groups - g0));
    solve_block<N, M>(z, out, g0, count, lam);
  }
}

using RangeFn = void (*)(const float*, float*, int64_t, int64_t, int64_t, float);

template <int M, int N = 1>
RangeFn pick(int n) {
  if constexpr (N >= M) {
    return nullptr;
  } else {
    return n == N ? &solve_range<N, M> : pick<M, N + 1>(n);
  }
}

torch::Tensor prox(const torch::Tensor& weight, double lam, int64_t n, int64_t m) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32,
              "prox_nm_cpu takes a float32 CPU tensor");
  TORCH_CHECK(m == 4 || m == 8, "prox_nm_cpu supports m = 4 and 8, got ", m);
  TORCH_CHECK(1 <= n && n < m, "prox_nm_cpu needs 1 <= n < m");
  TORCH_CHECK(weight.numel() % m == 0, "the weight's size must be a multiple of m");
  auto z = weight.contiguous();
  auto out = torch::empty_like(z);
  const int64_t groups = z.numel() / m;
  const int64_t blocks = (groups + kLanes - 1) / kLanes;
  RangeFn fn = m == 4 ? pick<4>(static_cast<int>(n)) : pick<8>(static_cast<int>(n));
  const float* zp = z.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lam_f = static_cast<float>(lam);
  at::parallel_for(0, blocks, 64,
                   [&](int64_t b0, int64_t b1) { fn(zp, op, groups, b0, b1, lam_f); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("prox", &prox, "exact N:M prox of lam * e_{N+1}(|w|) over groups of M (float32)");
}
