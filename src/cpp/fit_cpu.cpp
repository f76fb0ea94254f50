// The C++/Eigen CPU backend of ectfast.fit (see fit_cpu.hpp and python/ectfast/_reference.py).
#include "fit_cpu.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <limits>
#if defined(__SSE2__) && !defined(ECTFAST_NO_SIMD)
#include <emmintrin.h>
#endif

#include "parallel.hpp"

namespace ectfast {

namespace {

using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Items (maps or landmarks) per thread below which threading does not pay.
constexpr int64_t kMapsPerThread = 4;
constexpr int64_t kPatchesPerThread = 64;
constexpr int64_t kFacesPerThread = 4;
// Landmarks ahead whose patches are prefetched.
constexpr int64_t kPrefetchAhead = 2;

double sigmoid(double z) {  // the reference's numerically safe form
  if (z >= 0) return 1.0 / (1.0 + std::exp(-z));
  const double e = std::exp(z);
  return e / (1.0 + e);
}

// One axis of the FCN's bilinear upsampling (a transposed convolution, kernel 2f, stride f,
// padding f/2, weights K[j] = 1 - |j - (2f - 1)/2| / f): output o reads input `hi` with weight
// w_hi and input hi - 1 with weight w_lo (index -1: absent).
struct Taps {
  int64_t hi, lo;
  double w_hi, w_lo;
};

double kernel_weight(int64_t j, int f) {  // K[j], computed as _reference.upsample_matrix does
  return 1.0 - std::abs(static_cast<double>(j) - (2.0 * f - 1.0) / 2.0) / f;
}

Taps taps(int64_t o, int64_t size, int f) {
  const int64_t hi = (o + f / 2) / f;
  const int64_t j = o + f / 2 - f * hi;  // in [0, f)
  Taps t{-1, -1, 0.0, 0.0};
  if (hi < size) {
    t.hi = hi;
    t.w_hi = kernel_weight(j, f);
  }
  if (hi - 1 >= 0 && hi - 1 < size) {
    t.lo = hi - 1;
    t.w_lo = kernel_weight(j + f, f);
  }
  return t;
}

template <class T>
inline double interp_x(const T* row, const Taps& tx) {
  double v = 0.0;
  if (tx.hi >= 0) v += tx.w_hi * static_cast<double>(row[tx.hi]);
  if (tx.lo >= 0) v += tx.w_lo * static_cast<double>(row[tx.lo]);
  return v;
}

// The upsampled value at output (ty, tx) of a small map with row stride w: contract x first,
// then y, in double, rounded to T (what _reference.upsample stores).
template <class T>
inline T upsampled_value(const T* small, int64_t w, const Taps& ty, const Taps& tx) {
  double v = 0.0;
  if (ty.hi >= 0) v += ty.w_hi * interp_x(small + ty.hi * w, tx);
  if (ty.lo >= 0) v += ty.w_lo * interp_x(small + ty.lo * w, tx);
  return static_cast<T>(v);
}

// Sum / dot product with four partial sums: a single running sum is a chain of dependent adds
// (4 cycles each) that the compiler may not reorder without -ffast-math.
inline double sum4(const double* a, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += a[j];
    s1 += a[j + 1];
    s2 += a[j + 2];
    s3 += a[j + 3];
  }
  for (; j < n; ++j) s0 += a[j];
  return (s0 + s1) + (s2 + s3);
}

inline double dot4(const double* a, const double* b, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += a[j] * b[j];
    s1 += a[j + 1] * b[j + 1];
    s2 += a[j + 2] * b[j + 2];
    s3 += a[j + 3] * b[j + 3];
  }
  for (; j < n; ++j) s0 += a[j] * b[j];
  return (s0 + s1) + (s2 + s3);
}

void patch_bounds(int64_t H, int64_t W, double x, double y, int64_t r, Patch& p) {
  const int64_t h = r / 2;
  p.cx = static_cast<int64_t>(std::floor(x + 0.5));
  p.cy = static_cast<int64_t>(std::floor(y + 0.5));
  p.x0 = std::max<int64_t>(p.cx - h, 0);
  p.y0 = std::max<int64_t>(p.cy - h, 0);
  const int64_t x1 = std::min<int64_t>(p.cx + h + 1, W);
  const int64_t y1 = std::min<int64_t>(p.cy + h + 1, H);
  p.nx = std::max<int64_t>(x1 - p.x0, 0);
  p.ny = std::max<int64_t>(y1 - p.y0, 0);
  if (p.nx == 0 || p.ny == 0) p.nx = p.ny = 0;
  p.buf.resize(static_cast<size_t>(p.nx * p.ny));
}

}  // namespace

// ------------------------------------------------------------------ Estimation

namespace {

// The maximum of v[0..n) (n >= 1), and `zero` accumulates x - x (0 for finite x, NaN for
// NaN/inf) so that the caller learns about non-finite values from the same pass.
// Lane maxima use `x > m ? x : m` (= maxps/maxpd; a NaN x leaves m, which is fine: the map is
// rejected anyway). SSE2 (x86-64 baseline) when available, a portable loop otherwise.
#if defined(__SSE2__) && !defined(ECTFAST_NO_SIMD)
inline float block_max(const float* v, int64_t n, __m128& zero) {
  __m128 m0 = _mm_set1_ps(v[0]), m1 = m0, m2 = m0, m3 = m0;
  __m128 z0 = zero, z1 = _mm_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m128 a = _mm_loadu_ps(v + j), b = _mm_loadu_ps(v + j + 4);
    const __m128 c = _mm_loadu_ps(v + j + 8), d = _mm_loadu_ps(v + j + 12);
    m0 = _mm_max_ps(a, m0);
    m1 = _mm_max_ps(b, m1);
    m2 = _mm_max_ps(c, m2);
    m3 = _mm_max_ps(d, m3);
    z0 = _mm_add_ps(z0, _mm_add_ps(_mm_sub_ps(a, a), _mm_sub_ps(b, b)));
    z1 = _mm_add_ps(z1, _mm_add_ps(_mm_sub_ps(c, c), _mm_sub_ps(d, d)));
  }
  m0 = _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3));
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, m0);
  float best = lanes[0];
  for (int l = 1; l < 4; ++l) best = lanes[l] > best ? lanes[l] : best;
  float tail = 0.0f;
  for (; j < n; ++j) {
    best = v[j] > best ? v[j] : best;
    tail += v[j] - v[j];
  }
  zero = _mm_add_ps(_mm_add_ps(z0, z1), _mm_set_ss(tail));
  return best;
}

inline double block_max(const double* v, int64_t n, __m128d& zero) {
  __m128d m0 = _mm_set1_pd(v[0]), m1 = m0, m2 = m0, m3 = m0;
  __m128d z0 = zero, z1 = _mm_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128d a = _mm_loadu_pd(v + j), b = _mm_loadu_pd(v + j + 2);
    const __m128d c = _mm_loadu_pd(v + j + 4), d = _mm_loadu_pd(v + j + 6);
    m0 = _mm_max_pd(a, m0);
    m1 = _mm_max_pd(b, m1);
    m2 = _mm_max_pd(c, m2);
    m3 = _mm_max_pd(d, m3);
    z0 = _mm_add_pd(z0, _mm_add_pd(_mm_sub_pd(a, a), _mm_sub_pd(b, b)));
    z1 = _mm_add_pd(z1, _mm_add_pd(_mm_sub_pd(c, c), _mm_sub_pd(d, d)));
  }
  m0 = _mm_max_pd(_mm_max_pd(m0, m1), _mm_max_pd(m2, m3));
  alignas(16) double lanes[2];
  _mm_store_pd(lanes, m0);
  double best = lanes[1] > lanes[0] ? lanes[1] : lanes[0];
  double tail = 0.0;
  for (; j < n; ++j) {
    best = v[j] > best ? v[j] : best;
    tail += v[j] - v[j];
  }
  zero = _mm_add_pd(_mm_add_pd(z0, z1), _mm_set_sd(tail));
  return best;
}

template <class T> struct ZeroAcc;
template <> struct ZeroAcc<float> {
  __m128 z = _mm_setzero_ps();
  bool finite() const { return _mm_movemask_ps(_mm_cmpneq_ps(z, _mm_setzero_ps())) == 0; }
};
template <> struct ZeroAcc<double> {
  __m128d z = _mm_setzero_pd();
  bool finite() const { return _mm_movemask_pd(_mm_cmpneq_pd(z, _mm_setzero_pd())) == 0; }
};
template <class T>
inline T block_max(const T* v, int64_t n, ZeroAcc<T>& acc) { return block_max(v, n, acc.z); }
#else
template <class T>
struct ZeroAcc {
  T z[8] = {};
  bool finite() const {
    for (T x : z)
      if (!(x == T(0))) return false;
    return true;
  }
};
template <class T>
inline T block_max(const T* v, int64_t n, ZeroAcc<T>& acc) {
  T m[8];
  for (int l = 0; l < 8; ++l) m[l] = v[0];
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) {
      const T x = v[j + l];
      m[l] = x > m[l] ? x : m[l];
      acc.z[l] += x - x;
    }
  for (; j < n; ++j) {
    m[0] = v[j] > m[0] ? v[j] : m[0];
    acc.z[0] += v[j] - v[j];
  }
  T best = m[0];
  for (int l = 1; l < 8; ++l) best = m[l] > best ? m[l] : best;
  return best;
}
#endif

}  // namespace

template <class T>
ArgmaxResult argmax_map(const T* v, int64_t count) {
  // Blocks of kBlock values (in L1): block maxima and the finiteness sum in one vector pass,
  // then a scan of the first block that reached the overall maximum for its first occurrence.
  constexpr int64_t kBlock = 2048;
  if (count <= 0) return {0, true};
  ZeroAcc<T> acc;
  T best = v[0];
  int64_t best_block = 0;
  for (int64_t s = 0; s < count; s += kBlock) {
    const T bm = block_max(v + s, std::min(count - s, kBlock), acc);
    if (bm > best) {
      best = bm;
      best_block = s;
    }
  }
  const bool finite = acc.finite();
  const int64_t e = std::min(count, best_block + kBlock);
  for (int64_t j = best_block; j < e; ++j)
    if (v[j] == best) return {j, finite};
  return {best_block, finite};  // only reached when best is NaN (finite is then false)
}

template <class T>
int64_t argmax_batch(const T* maps, int64_t B, int64_t n, int64_t H, int64_t W, double* peaks,
                     int threads) {
  const int64_t items = B * n, hw = H * W;
  std::vector<char> bad(static_cast<size_t>(items), 0);
  parallel_for(items, threads, kMapsPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const ArgmaxResult r = argmax_map(maps + m * hw, hw);
      peaks[2 * m] = static_cast<double>(r.index % W);
      peaks[2 * m + 1] = static_cast<double>(r.index / W);
      bad[static_cast<size_t>(m)] = !r.finite;
    }
  });
  int64_t count = 0;
  for (char c : bad) count += c;
  return count;
}

template <class T>
int64_t argmax_upsampled_batch(const T* small, int64_t B, int64_t n, int64_t h, int64_t w,
                               int f, double* peaks, int threads) {
  // The upsampled map is tiled by the f x f output blocks that read the same 2 x 2 inputs:
  // tile (i, k) covers output rows [f i - f/2, f i - f/2 + f) and columns likewise, and reads
  // small rows i - 1, i and columns k - 1, k. Its values are convex combinations (weights >= 0,
  // summing to <= 1) of those inputs, so none exceeds max(0, their maximum). The tiles around
  // the small map's maximum give an achieved value V > 0; a tile whose four inputs are all
  // clearly below V (a margin covers rounding) cannot hold the maximum or a tie, so only the
  // tiles around small pixels >= V are evaluated, exactly as upsample_map would compute them,
  // keeping the first maximum in row-major order of the upsampled map.
  const int64_t H = h * f, W = w * f, items = B * n;
  std::vector<Taps> ty(static_cast<size_t>(H)), tx(static_cast<size_t>(W));
  for (int64_t o = 0; o < H; ++o) ty[static_cast<size_t>(o)] = taps(o, h, f);
  for (int64_t o = 0; o < W; ++o) tx[static_cast<size_t>(o)] = taps(o, w, f);
  std::vector<char> bad(static_cast<size_t>(items), 0);
  parallel_for(items, threads, kMapsPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* map = small + m * h * w;
      const ArgmaxResult sm = argmax_map(map, h * w);
      bad[static_cast<size_t>(m)] = !sm.finite;
      T best = T(0);
      int64_t best_idx = -1;
      auto eval_tile = [&](int64_t i, int64_t k) {
        const int64_t o0 = std::max<int64_t>(f * i - f / 2, 0), o1 = std::min<int64_t>(f * i - f / 2 + f, H);
        const int64_t p0 = std::max<int64_t>(f * k - f / 2, 0), p1 = std::min<int64_t>(f * k - f / 2 + f, W);
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t p = p0; p < p1; ++p) {
            const T v = upsampled_value(map, w, ty[static_cast<size_t>(o)], tx[static_cast<size_t>(p)]);
            const int64_t idx = o * W + p;
            if (best_idx < 0 || v > best || (v == best && idx < best_idx)) {
              best = v;
              best_idx = idx;
            }
          }
      };
      if (!sm.finite) {
        peaks[2 * m] = peaks[2 * m + 1] = 0.0;
        continue;
      }
      if (map[sm.index] == T(0)) {  // max 0: an all-zero map upsamples to all zeros
        bool all_zero = true;
        for (int64_t j = 0; j < h * w && all_zero; ++j) all_zero = map[j] == T(0);
        if (all_zero) {  // the first maximum is the first pixel
          peaks[2 * m] = peaks[2 * m + 1] = 0.0;
          continue;
        }
      }
      const int64_t si = sm.index / w, sk = sm.index % w;
      for (int64_t i = si; i <= si + 1; ++i)
        for (int64_t k = sk; k <= sk + 1; ++k) eval_tile(i, k);
      const double V = static_cast<double>(best);
      if (V > 0.0) {
        // Only tiles reading a small pixel with value >= V (less a rounding margin) can reach
        // V: visit the four tiles around each such pixel (evaluating a tile twice is harmless).
        const double cut = V / (1.0 + 1e-6);
        constexpr int64_t kRun = 64;  // vector max over runs, element scan only of runs that hit
        ZeroAcc<T> unused;
        for (int64_t j = 0; j < h * w; ++j) {
          if (j % kRun == 0 && static_cast<double>(block_max(map + j, std::min(kRun, h * w - j), unused)) < cut) {
            j += kRun - 1;
            continue;
          }
          if (static_cast<double>(map[j]) < cut) continue;
          const int64_t a = j / w, c = j % w;
          for (int64_t i = a; i <= a + 1; ++i)
            for (int64_t k = c; k <= c + 1; ++k)
              if (!((i == si || i == si + 1) && (k == sk || k == sk + 1))) eval_tile(i, k);
        }
      } else {  // no positive value to prune with (all-negative maps): evaluate every tile
        for (int64_t i = 0; i <= h; ++i)
          for (int64_t k = 0; k <= w; ++k) eval_tile(i, k);
      }
      peaks[2 * m] = static_cast<double>(best_idx % W);
      peaks[2 * m + 1] = static_cast<double>(best_idx / W);
    }
  });
  int64_t count = 0;
  for (char c : bad) count += c;
  return count;
}

// ------------------------------------------------------------------ patches

void clamp_point(double& x, double& y, int64_t H, int64_t W) {
  x = std::min(std::max(x, 1.0), static_cast<double>(W) - 2.0);
  y = std::min(std::max(y, 1.0), static_cast<double>(H) - 2.0);
}

template <class T>
void extract_patch(const T* map, int64_t H, int64_t W, double x, double y, int64_t r, Patch& p) {
  patch_bounds(H, W, x, y, r, p);
  for (int64_t i = 0; i < p.ny; ++i) {
    const T* src = map + (p.y0 + i) * W + p.x0;
    double* dst = p.buf.data() + i * p.nx;
    // vectorised and branch-free (responses are noisy around 0, a branch would mispredict)
    Eigen::Map<Eigen::ArrayXd>(dst, p.nx) =
        Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(src, p.nx).template cast<double>().max(0.0);
  }
}

namespace {

// The taps of every row and column of the upsampled frame, computed once per thread and map
// size instead of 2 r + 2 per patch (each taps() costs two integer and two floating-point
// divisions); measured up to ~10 % of ECT's time (bench/fit_real.py).
struct TapTable {
  int64_t h = -1, w = -1;
  int f = 0;
  std::vector<Taps> y, x;
  void ensure(int64_t h_small, int64_t w_small, int factor) {
    if (h_small == h && w_small == w && factor == f) return;
    h = h_small, w = w_small, f = factor;
    y.resize(static_cast<size_t>(h * f));
    x.resize(static_cast<size_t>(w * f));
    for (int64_t o = 0; o < h * f; ++o) y[static_cast<size_t>(o)] = taps(o, h, f);
    for (int64_t o = 0; o < w * f; ++o) x[static_cast<size_t>(o)] = taps(o, w, f);
  }
};

}  // namespace

template <class T>
void extract_patch_upsampled(const T* small, int64_t h_small, int64_t w_small, int f, double x,
                             double y, int64_t r, Patch& p) {
  // Separable, in upsampled_value's order: the small rows the patch reads are interpolated
  // along x once (row_x), then each patch row combines two of them along y; the same
  // operations as upsample_map, so the same (rounded-to-T) values.
  patch_bounds(h_small * f, w_small * f, x, y, r, p);
  if (p.nx == 0) return;
  thread_local TapTable table;
  table.ensure(h_small, w_small, f);
  const Taps* tx = table.x.data() + p.x0;
  thread_local std::vector<double> row_x;
  // output row o reads small rows (o + f/2) / f - 1 and (o + f/2) / f (where inside the map)
  const int64_t first = std::max<int64_t>((p.y0 + f / 2) / f - 1, 0);
  const int64_t last = std::min<int64_t>((p.y0 + p.ny - 1 + f / 2) / f, h_small - 1);
  row_x.resize(static_cast<size_t>((last - first + 1) * p.nx));
  for (int64_t a = first; a <= last; ++a) {
    const T* src = small + a * w_small;
    double* dst = row_x.data() + (a - first) * p.nx;
    for (int64_t j = 0; j < p.nx; ++j) dst[j] = interp_x(src, tx[j]);
  }
  // An absent tap reads a zero row with weight 0: (0 + 0) + w b == 0 + w b, the same value.
  thread_local std::vector<double> zeros;
  zeros.assign(static_cast<size_t>(p.nx), 0.0);
  using Row = Eigen::Map<const Eigen::ArrayXd>;
  for (int64_t i = 0; i < p.ny; ++i) {
    const Taps& ty = table.y[static_cast<size_t>(p.y0 + i)];
    const Row hi(ty.hi >= 0 ? row_x.data() + (ty.hi - first) * p.nx : zeros.data(), p.nx);
    const Row lo(ty.lo >= 0 ? row_x.data() + (ty.lo - first) * p.nx : zeros.data(), p.nx);
    // vectorised, branch-free: value rounded to T as stored by upsample_map, negatives to 0
    Eigen::Map<Eigen::ArrayXd>(p.buf.data() + i * p.nx, p.nx) =
        (ty.w_hi * hi + ty.w_lo * lo).template cast<T>().template cast<double>().max(0.0);
  }
}

// ------------------------------------------------------------------ Eq. 15

void patch_confidence(Patch& p, double a, double b, double& wx, double& wy) {
  wx = wy = 0.0;
  if (p.nx == 0) return;
  p.col.assign(static_cast<size_t>(p.nx), 0.0);
  p.row.assign(static_cast<size_t>(p.ny), 0.0);
  double* col = p.col.data();
  for (int64_t i = 0; i < p.ny; ++i) {
    const double* src = p.buf.data() + i * p.nx;
    for (int64_t j = 0; j < p.nx; ++j) col[j] += src[j];
    p.row[static_cast<size_t>(i)] = sum4(src, p.nx);
  }
  double S = 0.0;
  for (int64_t j = 0; j < p.nx; ++j) S += col[j];
  if (!(S > 0.0)) return;
  // Standard deviation of a marginal (coordinates relative to the patch centre; the variance
  // does not depend on the origin), two-pass like the reference.
  // A marginal with its mass in a single column (row) has sigma = 0 exactly (weight 0, as
  // Eq. 15's guard says); computed through mu it could come out as ~1e-15 and flip to 1.
  auto sd = [S](const double* mass, int64_t len, int64_t first) {
    int64_t support = 0;
    for (int64_t j = 0; j < len; ++j) support += mass[j] > 0.0;
    if (support < 2) return 0.0;
    double mu = 0.0;
    for (int64_t j = 0; j < len; ++j) mu += mass[j] * static_cast<double>(first + j);
    mu /= S;
    double var = 0.0;
    for (int64_t j = 0; j < len; ++j) {
      const double d = static_cast<double>(first + j) - mu;
      var += mass[j] * d * d;
    }
    return std::sqrt(std::max(var / S, 0.0));
  };
  const double sx = sd(col, p.nx, p.x0 - p.cx);
  const double sy = sd(p.row.data(), p.ny, p.y0 - p.cy);
  wx = sx > 0.0 ? sigmoid(a * (S / sx - b)) : 0.0;
  wy = sy > 0.0 ? sigmoid(a * (S / sy - b)) : 0.0;
}

double kernel_variance(double wx, double wy, double rho, bool weighted) {
  return weighted ? 2.0 * rho / (wx + wy) : rho;
}

// ------------------------------------------------------------------ Eq. 9

namespace {

// g[j] = exp(-(first + j - c)^2 / (2 rho)) for j in [0, n), with 5 exp calls instead of n:
// from the patch's centre pixel `centre` (within 0.5 of c, inside [first, first + n)) outwards,
// g(d +- 1) = g(d) exp(-(+-2d + 1) / (2 rho)) and those factors follow f <- f exp(-1 / rho).
// Values only shrink going outwards, so underflow is benign; the relative error after k steps
// is ~k^2/2 ulp (< 1e-13 for k <= 30).
void gaussian_profile(double* g, int64_t n, int64_t first, int64_t centre, double c, double rho) {
  const double inv = 1.0 / (2.0 * rho);
  const int64_t j0 = std::min<int64_t>(std::max<int64_t>(centre - first, 0), n - 1);
  const double d0 = static_cast<double>(first + j0) - c;
  g[j0] = std::exp(-(d0 * d0) * inv);
  const double q = std::exp(-2.0 * inv);
  double f = std::exp(-(2.0 * d0 + 1.0) * inv);
  for (int64_t j = j0 + 1; j < n; ++j, f *= q) g[j] = g[j - 1] * f;
  f = std::exp((2.0 * d0 - 1.0) * inv);
  for (int64_t j = j0 - 1; j >= 0; --j, f *= q) g[j] = g[j + 1] * f;
}

}  // namespace

void mean_shift_vector(Patch& p, double x, double y, double rho_i, double& vx, double& vy) {
  vx = vy = 0.0;
  if (p.nx == 0) return;
  p.gx.resize(static_cast<size_t>(p.nx));
  p.gy.resize(static_cast<size_t>(p.ny));
  gaussian_profile(p.gx.data(), p.nx, p.x0, p.cx, x, rho_i);
  gaussian_profile(p.gy.data(), p.ny, p.y0, p.cy, y, rho_i);
  // omega = patch * gy gx^T; its column sums gx_j sum_i gy_i patch_ij and row sums
  // gy_i sum_j gx_j patch_ij give the two weighted means.
  p.col.assign(static_cast<size_t>(p.nx), 0.0);
  double* col = p.col.data();
  const double* gx = p.gx.data();
  double my = 0.0;
  for (int64_t i = 0; i < p.ny; ++i) {
    const double* src = p.buf.data() + i * p.nx;
    const double g = p.gy[static_cast<size_t>(i)];
    for (int64_t j = 0; j < p.nx; ++j) col[j] += g * src[j];
    my += g * dot4(gx, src, p.nx) * (static_cast<double>(p.y0 + i) - y);
  }
  double Z = 0.0, mx = 0.0;
  for (int64_t j = 0; j < p.nx; ++j) {
    const double wcol = gx[j] * col[j];
    Z += wcol;
    mx += wcol * (static_cast<double>(p.x0 + j) - x);
  }
  if (!(Z > 0.0)) return;  // empty patch, or the kernel underflowed
  vx = mx / Z;
  vy = my / Z;
}

// ------------------------------------------------------------------ batched patch ops

namespace {

// Asks the memory system for the rows of a landmark's patch ahead of use: the patches of
// 256x256 maps are 31 rows in 31 different cache-line pairs, each a likely cache miss, and
// fetching the next landmark's while this one is computed hides most of that latency.
template <class T>
void prefetch_patch(const MapView<T>& mv, int64_t item, const double* shape, int64_t r) {
#if defined(__GNUC__)
  if (mv.factor != 1) return;  // small maps: a few KB, cached
  double x = shape[2 * item], y = shape[2 * item + 1];
  clamp_point(x, y, mv.H, mv.W);
  const int64_t h = r / 2, cx = static_cast<int64_t>(std::floor(x + 0.5)),
                cy = static_cast<int64_t>(std::floor(y + 0.5));
  const int64_t x0 = std::max<int64_t>(cx - h, 0), x1 = std::min<int64_t>(cx + h + 1, mv.W);
  const int64_t y0 = std::max<int64_t>(cy - h, 0), y1 = std::min<int64_t>(cy + h + 1, mv.H);
  if (x0 >= x1 || y0 >= y1) return;
  const T* map = mv.data + item * mv.H * mv.W;
  for (int64_t i = y0; i < y1; ++i) {
    const char* a = reinterpret_cast<const char*>(map + i * mv.W + x0);
    const char* b = reinterpret_cast<const char*>(map + i * mv.W + x1 - 1);
    for (; a <= b; a += 64) __builtin_prefetch(a);
    __builtin_prefetch(b);
  }
#endif
}

template <class T>
void patch_at(const MapView<T>& mv, int64_t item, double x, double y, int64_t r, Patch& p) {
  if (mv.factor == 1) {
    extract_patch(mv.data + item * mv.H * mv.W, mv.H, mv.W, x, y, r, p);
  } else {
    const int64_t h = mv.H / mv.factor, w = mv.W / mv.factor;
    extract_patch_upsampled(mv.data + item * h * w, h, w, mv.factor, x, y, r, p);
  }
}

}  // namespace

template <class T>
void weights_batch(const MapView<T>& mv, const double* shape, int64_t r, double a, double b,
                   double* w, int threads) {
  parallel_for(mv.B * mv.n, threads, kPatchesPerThread, [&](int64_t begin, int64_t end) {
    Patch p;
    for (int64_t q = begin; q < std::min(end, begin + kPrefetchAhead); ++q) prefetch_patch(mv, q, shape, r);
    for (int64_t m = begin; m < end; ++m) {
      if (m + kPrefetchAhead < end) prefetch_patch(mv, m + kPrefetchAhead, shape, r);
      double x = shape[2 * m], y = shape[2 * m + 1];
      clamp_point(x, y, mv.H, mv.W);
      patch_at(mv, m, x, y, r, p);
      patch_confidence(p, a, b, w[2 * m], w[2 * m + 1]);
    }
  });
}

template <class T>
void mean_shift_batch(const MapView<T>& mv, const double* shape, int64_t r, double a, double b,
                      double rho, bool weighted, double* w, double* target, int threads) {
  parallel_for(mv.B * mv.n, threads, kPatchesPerThread, [&](int64_t begin, int64_t end) {
    Patch p;
    for (int64_t q = begin; q < std::min(end, begin + kPrefetchAhead); ++q) prefetch_patch(mv, q, shape, r);
    for (int64_t m = begin; m < end; ++m) {
      if (m + kPrefetchAhead < end) prefetch_patch(mv, m + kPrefetchAhead, shape, r);
      double x = shape[2 * m], y = shape[2 * m + 1];
      clamp_point(x, y, mv.H, mv.W);
      patch_at(mv, m, x, y, r, p);
      double wx = 1.0, wy = 1.0, vx = 0.0, vy = 0.0;
      bool informative = true;
      if (weighted) {
        patch_confidence(p, a, b, wx, wy);
        informative = wx + wy > 0.0;  // else no information: v = 0 (and W = 0 here)
      }
      if (informative) mean_shift_vector(p, x, y, kernel_variance(wx, wy, rho, weighted), vx, vy);
      w[2 * m] = wx;
      w[2 * m + 1] = wy;
      target[2 * m] = shape[2 * m] + vx;
      target[2 * m + 1] = shape[2 * m + 1] + vy;
    }
  });
}

// ------------------------------------------------------------------ Eqs. 14 / 8

namespace {

// The system matrix lam diag(prior_inv) + S^T W S + eps E of Eqs. 14 / 8 (lower triangle only,
// which is what LDLT reads): S^T W S = (W^1/2 S)^T (W^1/2 S) as a symmetric rank update.
Eigen::MatrixXd system_matrix(const Eigen::Map<const RowMat>& S, const double* prior_inv,
                              double lam, const double* w, double eps) {
  const int64_t n2 = S.rows(), k = S.cols();
  Eigen::MatrixXd A = Eigen::MatrixXd::Zero(k, k);
  if (w == nullptr) {
    A.selfadjointView<Eigen::Lower>().rankUpdate(S.transpose());
  } else {
    const RowMat WS = Eigen::Map<const Eigen::VectorXd>(w, n2).cwiseSqrt().asDiagonal() * S;
    A.selfadjointView<Eigen::Lower>().rankUpdate(WS.transpose());
  }
  A.diagonal() += lam * Eigen::Map<const Eigen::VectorXd>(prior_inv, k);
  A.diagonal().head(std::min<int64_t>(4, k)).array() += eps;
  return A;
}

// The right-hand side S^T W (t - mean) + eps E x0.
Eigen::VectorXd system_rhs(const Eigen::Map<const RowMat>& S, const double* mean, const double* w,
                           const double* target, const double* x0, double eps) {
  const int64_t n2 = S.rows(), k = S.cols();
  Eigen::VectorXd d = Eigen::Map<const Eigen::VectorXd>(target, n2) - Eigen::Map<const Eigen::VectorXd>(mean, n2);
  if (w != nullptr) d.array() *= Eigen::Map<const Eigen::ArrayXd>(w, n2);
  Eigen::VectorXd rhs = S.transpose() * d;
  const int64_t ks = std::min<int64_t>(4, k);
  rhs.head(ks) += eps * Eigen::Map<const Eigen::VectorXd>(x0, ks);
  return rhs;
}

}  // namespace

void regularized_projection(const double* basis, const double* mean, const double* prior_inv,
                            int64_t n2, int64_t k, double lam, const double* w,
                            const double* target, const double* x0, double eps, double* out) {
  const Eigen::Map<const RowMat> S(basis, n2, k);
  const Eigen::LDLT<Eigen::MatrixXd, Eigen::Lower> ldlt(system_matrix(S, prior_inv, lam, w, eps));
  Eigen::Map<Eigen::VectorXd>(out, k) = ldlt.solve(system_rhs(S, mean, w, target, x0, eps));
}

void project_batch(const double* basis, const double* mean, const double* prior_inv, int64_t n2,
                   int64_t k, double lam, const double* w, const double* target, const double* x0,
                   double eps, int64_t B, double* out, int threads) {
  const Eigen::Map<const RowMat> S(basis, n2, k);
  if (w == nullptr) {  // W = I: one system for the whole batch, factored once
    const Eigen::LDLT<Eigen::MatrixXd, Eigen::Lower> ldlt(system_matrix(S, prior_inv, lam, nullptr, eps));
    parallel_for(B, threads, 64, [&](int64_t begin, int64_t end) {
      for (int64_t f = begin; f < end; ++f)
        Eigen::Map<Eigen::VectorXd>(out + f * k, k) =
            ldlt.solve(system_rhs(S, mean, nullptr, target + f * n2, x0 + f * k, eps));
    });
    return;
  }
  parallel_for(B, threads, kFacesPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f)
      regularized_projection(basis, mean, prior_inv, n2, k, lam, w + f * n2, target + f * n2,
                             x0 + f * k, eps, out + f * k);
  });
}

// ------------------------------------------------------------------ upsampling

template <class T>
void upsample_map(const T* in, int64_t H, int64_t W, int f, T* out) {
  const int64_t Ho = H * f, Wo = W * f;
  std::vector<Taps> tx(static_cast<size_t>(Wo));
  for (int64_t p = 0; p < Wo; ++p) tx[static_cast<size_t>(p)] = taps(p, W, f);
  for (int64_t o = 0; o < Ho; ++o) {
    const Taps ty = taps(o, H, f);
    T* dst = out + o * Wo;
    for (int64_t p = 0; p < Wo; ++p) dst[p] = upsampled_value(in, W, ty, tx[static_cast<size_t>(p)]);
  }
}

template <class T>
void upsample_batch(const T* maps, int64_t B, int64_t n, int64_t H, int64_t W, int f, T* out,
                    int threads) {
  const int64_t in_size = H * W, out_size = in_size * f * f;
  parallel_for(B * n, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) upsample_map(maps + m * in_size, H, W, f, out + m * out_size);
  });
}

// ------------------------------------------------------------------ instantiations

#define ECTFAST_INSTANTIATE(T)                                                                     \
  template ArgmaxResult argmax_map<T>(const T*, int64_t);                                          \
  template void extract_patch<T>(const T*, int64_t, int64_t, double, double, int64_t, Patch&);     \
  template void extract_patch_upsampled<T>(const T*, int64_t, int64_t, int, double, double,        \
                                           int64_t, Patch&);                                       \
  template void upsample_map<T>(const T*, int64_t, int64_t, int, T*);                              \
  template int64_t argmax_batch<T>(const T*, int64_t, int64_t, int64_t, int64_t, double*, int);    \
  template int64_t argmax_upsampled_batch<T>(const T*, int64_t, int64_t, int64_t, int64_t, int,    \
                                             double*, int);                                        \
  template void weights_batch<T>(const MapView<T>&, const double*, int64_t, double, double,        \
                                 double*, int);                                                    \
  template void mean_shift_batch<T>(const MapView<T>&, const double*, int64_t, double, double,     \
                                    double, bool, double*, double*, int);                          \
  template void upsample_batch<T>(const T*, int64_t, int64_t, int64_t, int64_t, int, T*, int);

ECTFAST_INSTANTIATE(float)
ECTFAST_INSTANTIATE(double)

}  // namespace ectfast
