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
// runs on the machine that uses it), so every step is branch-free across lanes. Three things
// the tensor version does not do make it faster without changing its answer beyond rounding:
// a face is skipped in every group where bounds prove it holds no local minimum
// (face_may_hold_a_minimum, or the top-N certificate top_n_optimal), the groups of a chunk are
// ordered so that groups needing the same faces share blocks (then a block skips a face that
// none of its lanes needs), and each lane stops its Newton iterations once it can no longer
// lower its objective beyond float rounding (the Newton decrement) or accepted no step; a
// block stops when all its lanes have. A lane's answer depends on its own group only, never on
// the groups that share its block.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace {

// one register of lanes: a vector wider than the machine's registers is split by the compiler
// into several, and then its lane-wise loops (square roots, any/all) stop vectorising
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

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
INLINE bool all(vi mask) {
  int32_t acc = -1;
  for (int l = 0; l < kLanes; ++l) acc &= mask[l];
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

// Guarded Newton iterations on the top-K face from u (entries kept positive) in the active
// lanes; returns the objective of the final u. A lane stops on its own (its Newton decrement
// below float resolution, or no step length accepted), so its path never depends on the other
// lanes of its block.
template <int N, int K>
INLINE vf damped_newton(vf* u, const vf* b, vf tail, vf ell, vi active) {
  vf obj = face_objective<N, K>(u, b, tail, ell);
  vi live = active;
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
    // below float resolution of the objective, no step can still help
    vf decrement = splat(0.0f);
    for (int j = 0; j < K; ++j) decrement += grad[j] * step[j];
    live &= decrement > kDecrementTol * obj;
    if (!any(live)) break;
    // as in the tensor solver, each step length is tried from the point the previous one left
    vi moved = vi{} != 0;
    for (float t : kStepLengths) {
      vf trial[K];
      vi ok = live;
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
    live &= moved;  // nothing changed: further iterations would repeat this one
    if (!any(live)) break;
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

// e_R of x[0..K) without the entries at positions i and j (pass j = i to drop one entry)
template <int K, int R>
INLINE vf esp_without(const vf* x, int i, int j) {
  vf e[R + 1];
  e[0] = splat(1.0f);
  for (int d = 1; d <= R; ++d) e[d] = splat(0.0f);
  for (int p = 0; p < K; ++p) {
    if (p == i || p == j) continue;
    for (int d = R; d > 0; --d) e[d] += x[p] * e[d - 1];
  }
  return e[R];
}

// the best t for the point t * b on the top-K face: a convex scalar equation, Newton from t = 1
template <int N, int K>
INLINE vf ray_scale(const vf* b, vf ell, vf nb2) {
  vf ek = float(N + 1) * ell * esp<K, N + 1>(b);
  vf t = splat(1.0f);
  for (int s = 0; s < kRaySteps; ++s) {
    vf num = (t - 1.0f) * nb2 + ek * power<N>(t);
    vf den = vmax(nb2 + float(N) * ek * power<N - 1>(t), splat(1e-30f));
    t -= num / den;
  }
  return t;
}

constexpr int kBoundRounds = 3;
constexpr float kBoundSlack = 1e-5f;  // relative margins that keep the bounds valid in float

// Lanes where the top-K face (u_1..u_K > 0, the rest 0) may hold a local minimum; false where
// bounds prove it cannot, so that the face's candidate can never beat the faces below it (its
// infimum then lies on its boundary, a smaller support). For sorted b, a local minimum there has
//   (S) u_j = b_j - ell e_N(u without j), so 0 < u_j <= b_j (zero gradient), and
//   (P) c_ij = ell e_{N-1}(u without i, j) <= 1 (the Hessian's 2x2 principal minors);
// subtracting (S) for i and j cancels their shared terms: b_i - b_j = (u_i - u_j)(1 - c_ij),
// so u_i >= u_K + (b_i - b_K) / (1 - c_iK). Starting from 0 <= u <= b, a few rounds tighten
// lower bounds L and upper bounds U on u by these relations (e_N is increasing in each entry);
// the face is excluded once some U_j <= 0, L_j > U_j, or c_iK >= 1 with b_i > b_K. It rules out
// most faces above the one that wins wherever lam is not small.
template <int N, int M, int K>
INLINE vi face_may_hold_a_minimum(const vf* b, vf ell, vf upper) {
  vf lo[K], hi[K];
  for (int j = 0; j < K; ++j) lo[j] = splat(0.0f), hi[j] = b[j];
  vi excluded = vi{} != 0;
  for (int round = 0; round < kBoundRounds; ++round) {
    for (int j = 0; j < K; ++j)
      hi[j] = vmin(hi[j], b[j] - (1.0f - kBoundSlack) * ell * esp_without<K, N>(lo, j, j));
    for (int j = 0; j < K; ++j)
      lo[j] = vmax(lo[j], b[j] - (1.0f + kBoundSlack) * ell * esp_without<K, N>(hi, j, j));
    for (int i = 0; i < K - 1; ++i) {
      vf c = (1.0f - kBoundSlack) * ell * esp_without<K, N - 1>(lo, i, K - 1);
      vf gap = b[i] - b[K - 1];
      excluded |= (c >= 1.0f) & (gap > 0);
      vf rise = gap / vmax(1.0f - c, splat(1e-30f));
      lo[i] = vmax(lo[i], (1.0f - kBoundSlack) * (lo[K - 1] + rise));
    }
    for (int j = 0; j < K; ++j) excluded |= (hi[j] <= 0) | (lo[j] > hi[j] + kBoundSlack);
  }
  // on [lo, hi] the objective is at least this; above an objective reached elsewhere, the
  // face's minimum cannot win
  vf floor = splat(0.0f), pos[K];
  for (int j = 0; j < K; ++j) {
    floor += (b[j] - hi[j]) * (b[j] - hi[j]);
    pos[j] = vmax(lo[j], splat(0.0f));
  }
  for (int j = K; j < M; ++j) floor += b[j] * b[j];
  floor = 0.5f * floor + ell * esp<K, N + 1>(pos);
  excluded |= (1.0f - kBoundSlack) * floor > upper;
  return ~excluded;
}

// An objective reached by some point: the least of the top-N point's and the best point on
// each face's ray t * b (the solver's first start, which its Newton steps only improve).
template <int N, int M, int K = N + 1>
INLINE vf reachable_objective(const vf* b, vf ell, vf upper) {
  if constexpr (K > M) {
    return upper;
  } else {
    vf tail = splat(0.0f), nb2 = splat(0.0f);
    for (int j = K; j < M; ++j) tail += b[j] * b[j];
    for (int j = 0; j < K; ++j) nb2 += b[j] * b[j];
    vf t = ray_scale<N, K>(b, ell, nb2);
    vf ray[K];
    for (int j = 0; j < K; ++j) ray[j] = t * b[j];
    vf obj = face_objective<N, K>(ray, b, 0.5f * tail, ell);
    return reachable_objective<N, M, K + 1>(b, ell, vmin(upper, obj));
  }
}

template <int N, int M>
struct Block {
  vf a[M], b[M], best[M], prev[M];
  vf a1, ell, best_obj;
  vi idx[M];  // the sorted entries' positions in their group
  vi top_n;

  // Loads the groups at gidx[0..count) (empty lanes hold zeros) and sorts each by magnitude.
  INLINE void load(const float* z, const int32_t* gidx, int64_t g0, int count) {
    for (int j = 0; j < M; ++j)
      for (int l = 0; l < kLanes; ++l) {
        a[j][l] = l < count ? std::fabs(z[(g0 + gidx[l]) * M + j]) : 0.0f;
        idx[j][l] = j;
      }
    // odd-even transposition sort, decreasing magnitude, ties by position
    for (int round = 0; round < M; ++round)
      for (int i = round % 2; i + 1 < M; i += 2) {
        vi swap = (a[i + 1] > a[i]) | ((a[i + 1] == a[i]) & (idx[i + 1] < idx[i]));
        vf hi = select(swap, a[i + 1], a[i]), lo = select(swap, a[i], a[i + 1]);
        vi ihi = swap ? idx[i + 1] : idx[i], ilo = swap ? idx[i] : idx[i + 1];
        a[i] = hi, a[i + 1] = lo, idx[i] = ihi, idx[i + 1] = ilo;
      }
    a1 = vmax(a[0], splat(std::numeric_limits<float>::min()));
    vf inv_a1 = 1.0f / a1;
    for (int j = 0; j < M; ++j) b[j] = a[j] * inv_a1;
    ell = lam_ * power<N - 1>(a1);
  }

  // Bit k of a lane's key: face N + 1 + k may hold its minimum (none where top-N is certain).
  template <int K = N + 1>
  INLINE void face_keys(vi certain, vf upper, vi* key) {
    if constexpr (K <= M) {
      vi may = face_may_hold_a_minimum<N, M, K>(b, ell, upper) & ~certain;
      *key |= may & (1 << (K - N - 1));
      face_keys<K + 1>(certain, upper, key);
    }
  }

  template <int K>
  INLINE void face(vi active) {
    if (any(active)) {
      vf tail = splat(0.0f), nb2 = splat(0.0f);
      for (int j = K; j < M; ++j) tail += b[j] * b[j];
      tail *= 0.5f;
      for (int j = 0; j < K; ++j) nb2 += b[j] * b[j];
      vf t = ray_scale<N, K>(b, ell, nb2);  // start 1: the best point on the ray t * b
      vf ray[K], grow[K];
      for (int j = 0; j < K; ++j) ray[j] = t * b[j];
      // start 2: the face below's candidate with a small new entry
      for (int j = 0; j < K - 1; ++j) grow[j] = prev[j];
      grow[K - 1] = 1e-3f * b[K - 1];
      vf obj_ray = damped_newton<N, K>(ray, b, tail, ell, active);
      vf obj_grow = damped_newton<N, K>(grow, b, tail, ell, active);
      vi pick = obj_grow < obj_ray;
      vf obj = select(pick, obj_grow, obj_ray);
      vi better = active & (obj < best_obj);
      for (int j = 0; j < K; ++j) {
        vf cand = select(pick, grow[j], ray[j]);
        best[j] = select(better, cand, best[j]);
        prev[j] = select(active, cand, prev[j]);
      }
      for (int j = K; j < M; ++j) best[j] = select(better, splat(0.0f), best[j]);
      best_obj = select(better, obj, best_obj);
      top_n &= ~better;
    }
    // a lane that skips this face continues from the face below's candidate, as if this face
    // had returned its grow start
    prev[K - 1] = select(active, prev[K - 1], 1e-3f * b[K - 1]);
  }

  // the top-N point as the best so far, and the face below the first one
  INLINE void start() {
    best_obj = splat(0.0f);
    for (int j = 0; j < M; ++j) {
      best[j] = j < N ? b[j] : splat(0.0f);
      prev[j] = best[j];
      if (j >= N) best_obj += 0.5f * b[j] * b[j];
    }
    top_n = vi{} == 0;
  }

  // Writes the lanes [0, n) where `write` holds into their groups (as in load) with z's signs:
  // the identity where lam = 0, the top-N entries exactly while that point stands, else best,
  // clipped to u <= a against rounding (after sort_best).
  INLINE void store(const float* z, float* out, int64_t g0, const int32_t* gidx, int n,
                    vi write) {
    vi identity = ell == 0;
    for (int j = 0; j < M; ++j) {
      vf keep = j < N ? a[j] : splat(0.0f);
      vf clipped = vmin(best[j] * a1, a[j]);
      vf value = select(identity, a[j], select(top_n, keep, clipped));
      for (int l = 0; l < n; ++l) {
        if (!write[l]) continue;
        int64_t at = (g0 + gidx[l]) * M + idx[j][l];
        out[at] = std::copysign(value[l], z[at]);
      }
    }
  }

  // best in decreasing order in every lane (odd-even transposition sort). The exact solution
  // keeps the order of a; sorting never raises the objective (R is symmetric, and sorted u
  // against sorted a maximises u . a), where clipping to a running minimum could: tied entries
  // of a may end unordered, as minimisers do on a flat valley (1:8, ell = 1, equal entries).
  INLINE void sort_best() {
    for (int round = 0; round < M; ++round)
      for (int i = round % 2; i + 1 < M; i += 2) {
        vf hi = vmax(best[i], best[i + 1]), lo = vmin(best[i], best[i + 1]);
        best[i] = hi, best[i + 1] = lo;
      }
  }

  template <int K = N + 1>
  INLINE void faces(vi key) {
    if constexpr (K <= M) {
      face<K>((key & (1 << (K - N - 1))) != 0);
      faces<K + 1>(key);
    }
  }

  float lam_;
};

constexpr int kChunkBlocks = 1024 / kLanes;  // groups ordered by the faces they need, 1024 at a time

// Groups [g0, g0 + count) of z (rows of M values) into out, count <= kChunkBlocks * kLanes:
// the faces each group needs first, then the groups in blocks ordered by those faces.
template <int N, int M>
void solve_chunk(const float* z, float* out, int64_t g0, int count, float lam) {
  constexpr int kKeys = 1 << (M - N);
  int32_t natural[kLanes], order[kChunkBlocks * kLanes], lane_key[kChunkBlocks * kLanes];
  int32_t counts[kKeys + 1] = {};
  for (int l = 0; l < kLanes; ++l) natural[l] = l;
  Block<N, M> blk;
  blk.lam_ = lam;
  for (int s = 0; s < count; s += kLanes) {
    int n = std::min(kLanes, count - s);
    blk.load(z, natural, g0 + s, n);
    vi key = vi{} != 0;
    vi certain = top_n_optimal<N, M>(blk.b, blk.ell) | (blk.ell == 0);
    vf top_n_obj = splat(0.0f);
    for (int j = N; j < M; ++j) top_n_obj += 0.5f * blk.b[j] * blk.b[j];
    if (!all(certain))
      blk.face_keys(certain, reachable_objective<N, M>(blk.b, blk.ell, top_n_obj), &key);
    for (int l = 0; l < n; ++l) lane_key[s + l] = key[l], ++counts[key[l] + 1];
    // a group that needs no face is its top-N point (or the identity) now, and is not loaded
    // again
    blk.start();
    blk.store(z, out, g0 + s, natural, n, key == 0);
  }
  for (int k = 0; k < kKeys; ++k) counts[k + 1] += counts[k];  // counting sort, stable
  const int settled = counts[1];
  for (int g = 0; g < count; ++g) order[counts[lane_key[g]]++] = g;

  for (int s = settled; s < count; s += kLanes) {
    int n = std::min(kLanes, count - s);
    blk.load(z, order + s, g0, n);
    vi key = vi{} != 0;
    for (int l = 0; l < n; ++l) key[l] = lane_key[order[s + l]];
    blk.start();
    blk.faces(key);
    blk.sort_best();
    blk.store(z, out, g0, order + s, n, vi{} == 0);
  }
}

template <int N, int M>
void solve_range(const float* z, float* out, int64_t groups, int64_t c0, int64_t c1, float lam) {
  for (int64_t c = c0; c < c1; ++c) {
    int64_t g0 = c * kChunkBlocks * kLanes;
    int count = static_cast<int>(std::min<int64_t>(kChunkBlocks * kLanes, groups - g0));
    solve_chunk<N, M>(z, out, g0, count, lam);
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
  const int64_t chunks = (groups + kChunkBlocks * kLanes - 1) / (kChunkBlocks * kLanes);
  RangeFn fn = m == 4 ? pick<4>(static_cast<int>(n)) : pick<8>(static_cast<int>(n));
  const float* zp = z.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lam_f = static_cast<float>(lam);
  at::parallel_for(0, chunks, 1,
                   [&](int64_t c0, int64_t c1) { fn(zp, op, groups, c0, c1, lam_f); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("prox", &prox, "exact N:M prox of lam * e_{N+1}(|w|) over groups of M (float32)");
}
