// The map-reading kernels of the ectfast CUDA backend: the argmax of each map (Estimation) and
// the per-(face, landmark) patch statistics (confidence, Eq. 15; mean shift, Eq. 9).
// Templated on the map dtype and on whether the maps are upsampled on the fly.
#include <climits>
#include <float.h>
#include <limits.h>

#include "common.cuh"

namespace ectfast_cuda {
namespace {

constexpr int kArgmaxThreads = 256;
constexpr int kPatchWarpsPerBlock = 4;
constexpr int kMaxHot = 256;  // upsampled argmax: most source pixels whose footprints are searched

// (value, index) of the first maximum: larger value wins, equal values -> smaller index.
template <typename V>
__device__ __forceinline__ void better(V& v, int64_t& i, V ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

template <typename V>
__device__ __forceinline__ void consider(V val, int64_t idx, V& best, int64_t& bidx, bool& bad) {
  if (!isfinite(val)) {
    bad = true;  // NaN/inf: flagged (fit raises), never selected
  } else if (val > best || (val == best && idx < bidx)) {
    best = val;
    bidx = idx;
  }
}

// The block's (best, index) in every thread (larger value, then smaller index).
template <typename V>
__device__ __forceinline__ void block_best(V& best, int64_t& bidx) {
  __shared__ V sv[kArgmaxThreads / 32];
  __shared__ int64_t si[kArgmaxThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    V ov = __shfl_xor_sync(kFullMask, best, o);
    int64_t oi = __shfl_xor_sync(kFullMask, bidx, o);
    better(best, bidx, ov, oi);
  }
  if (threadIdx.x % 32 == 0) {
    sv[threadIdx.x / 32] = best;
    si[threadIdx.x / 32] = bidx;
  }
  __syncthreads();
  best = sv[0];
  bidx = si[0];
#pragma unroll
  for (int w = 1; w < kArgmaxThreads / 32; ++w) better(best, bidx, sv[w], si[w]);
  __syncthreads();  // sv, si may be reused by the next call
}

// Upsampled argmax over the outputs that source pixel (sy, sx) feeds: rows and columns
// [f s - f/2, f s + 3f/2) inside the fitted map.
template <typename T>
__device__ __forceinline__ void consider_footprint(const MapView<T>& m, const UpKernel& up, int sy,
                                                   int sx, int first, int step,
                                                   typename Fitted<T>::type& best, int64_t& bidx,
                                                   bool& bad) {
  const int f = m.f, side = 2 * f;
  const int o0 = f * sy - f / 2, p0 = f * sx - f / 2;
  for (int e = first; e < side * side; e += step) {
    const int o = o0 + e / side, p = p0 + e % side;
    if (o < 0 || p < 0 || o >= m.h || p >= m.w) continue;
    consider(upsampled(m, taps(o, up), taps(p, up)), (int64_t)o * m.w + p, best, bidx, bad);
  }
}

// One block per map. MODE 0: plain loads; 1: 16-byte vector loads (map size and base 16-byte
// aligned); 2: upsampled on the fly (each thread keeps its column's taps and walks the rows).
template <typename T, int MODE>
__global__ void __launch_bounds__(kArgmaxThreads)
argmax_kernel(const T* __restrict__ data, int src_h, int src_w, const __grid_constant__ UpKernel up,
              double* __restrict__ peaks, int* __restrict__ flags) {
  using V = typename Fitted<T>::type;
  const int64_t map = blockIdx.x;
  const int f = MODE == 2 ? up.f : 1;
  const int64_t src_size = (int64_t)src_h * src_w;
  MapView<T> m{data + map * src_size, src_h, src_w, f, src_h * f, src_w * f};
  V best = -INFINITY;
  int64_t bidx = LLONG_MAX;
  bool bad = false;
  if (MODE == 0) {
    const T* p = m.data;
    const int64_t size = (int64_t)m.h * m.w;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < size; i += kArgmaxThreads) consider<V>(load(p + i), i, best, bidx, bad);
  } else if (MODE == 1) {
    constexpr int N = 16 / (int)sizeof(T);
    const uint4* p = reinterpret_cast<const uint4*>(m.data);
    const int64_t nvec = (int64_t)m.h * m.w / N;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < nvec; i += kArgmaxThreads) {
      const uint4 raw = __ldg(p + i);
      const T* u = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < N; ++e) consider<V>(to_float(u[e]), i * N + e, best, bidx, bad);
    }
  } else {
    // Every upsampled value is a weighted mean of its (up to) 4 source taps, weights >= 0 summing
    // to <= 1 (zero outside), so a value >= u > 0 needs a source tap >= u. With u = the best
    // upsampled value around the source maximum, only the footprints of the source pixels >= u
    // ("hot") can hold the first maximum. 1) source maximum (and the non-finite check); 2) u;
    // 3) the hot footprints -- or a scan of all outputs when u <= 0 or too many are hot.
    const int64_t src_n = (int64_t)m.src_h * m.src_w;
    __shared__ int hot_total;
    __shared__ int64_t hot_list[kMaxHot];
    V sbest = -INFINITY;
    int64_t sidx = LLONG_MAX;
    for (int64_t i = threadIdx.x; i < src_n; i += kArgmaxThreads) consider<V>(load(m.data + i), i, sbest, sidx, bad);
    block_best(sbest, sidx);
    bool full = sidx == LLONG_MAX;
    double thr = 0.0;
    if (!full) {
      V u = -INFINITY;
      int64_t ui = LLONG_MAX;
      bool unused = false;
      consider_footprint(m, up, (int)(sidx / m.src_w), (int)(sidx % m.src_w), threadIdx.x,
                         kArgmaxThreads, u, ui, unused);
      block_best(u, ui);
      // (1 - 1e-12): float64 maps round the weighted mean inexactly; over-including is harmless
      thr = (double)u * (1.0 - 1e-12);
      full = !(u > V(0));
      if (!full) {
        if (threadIdx.x == 0) hot_total = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < src_n; i += kArgmaxThreads) {
          if ((double)load(m.data + i) >= thr) {
            const int slot = atomicAdd(&hot_total, 1);
            if (slot < kMaxHot) hot_list[slot] = i;
          }
        }
        __syncthreads();
        full = hot_total > kMaxHot || (int64_t)hot_total * (4 * f * f) > (int64_t)m.h * m.w;
      }
    }
    if (full) {
      for (int col = threadIdx.x; col < m.w; col += kArgmaxThreads) {
        const Taps tx = taps(col, up);
        TapIter ty(0, f);
        for (int row = 0; row < m.h; ++row, ty.next(f))
          consider<V>(upsampled(m, ty.get(up), tx), (int64_t)row * m.w + col, best, bidx, bad);
      }
    } else {
      // the whole block shares the hot footprints (list order does not matter: ties go by index)
      const int fp = 4 * f * f, side = 2 * f;
      for (int e = threadIdx.x; e < hot_total * fp; e += kArgmaxThreads) {
        const int64_t i = hot_list[e / fp];
        const int r = e % fp;
        const int o = f * (int)(i / m.src_w) - f / 2 + r / side;
        const int p = f * (int)(i % m.src_w) - f / 2 + r % side;
        if (o < 0 || p < 0 || o >= m.h || p >= m.w) continue;
        consider<V>(upsampled(m, taps(o, up), taps(p, up)), (int64_t)o * m.w + p, best, bidx, bad);
      }
    }
  }
  const int any_bad = __syncthreads_or(bad ? 1 : 0);
  block_best(best, bidx);
  if (threadIdx.x == 0) {
    if (bidx == LLONG_MAX) bidx = 0;  // no finite value (flagged): report pixel 0
    peaks[2 * map] = (double)(bidx % m.w);
    peaks[2 * map + 1] = (double)(bidx / m.w);
    if (any_bad) flags[ECTFAST_FLAG_NONFINITE] = 1;
  }
}

// One warp per (face, landmark) patch. Lane l owns the patch columns l, l + 32, ...; the warp
// walks the rows together, so at each step it reads a contiguous piece of one patch row. Loop
// bounds are uniform over the warp (shuffles inside). Sums are float64, taken relative to the
// centre pixel (a one-pixel patch gets exactly zero variance, as in the reference).
template <typename T, bool UPS>
__global__ void __launch_bounds__(kPatchWarpsPerBlock * 32)
patch_kernel(const T* __restrict__ data, int src_h, int src_w, const __grid_constant__ UpKernel up,
             int64_t count, const double* __restrict__ shape, int half, double a, double b,
             double rho, int mode, double* __restrict__ w_out, double* __restrict__ t_out) {
  const int64_t item = (int64_t)blockIdx.x * kPatchWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (item >= count) return;  // uniform per warp
  const int f = UPS ? up.f : 1;
  MapView<T> m{data + item * ((int64_t)src_h * src_w), src_h, src_w, f, src_h * f, src_w * f};
  const double sx = shape[2 * item], sy = shape[2 * item + 1];
  const double x = clamp_coord(sx, 1.0, (double)m.w - 2.0);
  const double y = clamp_coord(sy, 1.0, (double)m.h - 2.0);
  const int cx = (int)floor(x + 0.5), cy = (int)floor(y + 0.5);
  const int P = 2 * half + 1;
  const int row0 = cy - half;

  double wx = 1.0, wy = 1.0;
  if (mode != ECTFAST_PATCH_MEANSHIFT_UNWEIGHTED) {
    // pass 1: S, and the first two moments of the x and y marginals
    double s0 = 0.0, mx1 = 0.0, mx2 = 0.0, my1 = 0.0, my2 = 0.0;
    // support of the marginals (first/last column and row with mass): a marginal with its mass
    // in one column (row) has sigma = 0 exactly, as in the reference (Eq. 15's guard)
    int cmin = INT_MAX, cmax = INT_MIN, rmin = INT_MAX, rmax = INT_MIN;
    for (int cb = 0; cb < P; cb += 32) {
      const int c = cb + lane;
      const int dx = c - half;
      const int col = cx + dx;
      const bool colok = c < P && col >= 0 && col < m.w;
      double colsum = 0.0;
      if (colok) {
        Taps tx{};
        if (UPS) tx = taps(col, up);
        TapIter ty(row0, f);
        for (int r = 0; r < P; ++r, ty.next(f)) {
          const int row = row0 + r;
          if (row < 0 || row >= m.h) continue;
          const int dy = r - half;
          double v;
          if (UPS) v = (double)upsampled(m, ty.get(up), tx);
          else v = (double)load(m.data + (int64_t)row * m.w + col);
          v = v > 0.0 ? v : 0.0;
          if (v > 0.0) {
            rmin = min(rmin, r);
            rmax = max(rmax, r);
          }
          colsum += v;
          my1 += v * dy;
          my2 += v * (double)(dy * dy);
        }
      }
      if (colsum > 0.0) {
        cmin = min(cmin, c);
        cmax = max(cmax, c);
      }
      s0 += colsum;
      mx1 += colsum * dx;
      mx2 += colsum * (double)(dx * dx);
    }
    s0 = warp_sum(s0);
    mx1 = warp_sum(mx1);
    mx2 = warp_sum(mx2);
    my1 = warp_sum(my1);
    my2 = warp_sum(my2);
    cmin = warp_min_int(cmin);
    cmax = warp_max_int(cmax);
    rmin = warp_min_int(rmin);
    rmax = warp_max_int(rmax);
    wx = 0.0;
    wy = 0.0;
    if (s0 > 0.0) {
      const double mux = mx1 / s0, muy = my1 / s0;
      const double sdx = cmax > cmin ? sqrt(fmax(mx2 / s0 - mux * mux, 0.0)) : 0.0;
      const double sdy = rmax > rmin ? sqrt(fmax(my2 / s0 - muy * muy, 0.0)) : 0.0;
      wx = sdx > 0.0 ? sigmoid(a * (s0 / sdx - b)) : 0.0;
      wy = sdy > 0.0 ? sigmoid(a * (s0 / sdy - b)) : 0.0;
    }
    // the xor-butterfly gives every lane the same sums up to rounding; take lane 0's decision
    wx = __shfl_sync(kFullMask, wx, 0);
    wy = __shfl_sync(kFullMask, wy, 0);
  }
  if (lane == 0) {
    w_out[2 * item] = wx;
    w_out[2 * item + 1] = wy;
  }
  if (mode == ECTFAST_PATCH_CONFIDENCE) return;

  double vx = 0.0, vy = 0.0;
  if (wx + wy > 0.0) {  // uniform: every lane holds lane 0's weights
    // pass 2: omega = patch * gx * gy (separable Gaussian); per column, the Gaussian row sums
    const double rho_i = mode == ECTFAST_PATCH_MEANSHIFT_WEIGHTED ? 2.0 * rho / (wx + wy) : rho;
    const double inv = 1.0 / (2.0 * rho_i);
    const double ox = (double)cx - x, oy = (double)cy - y;  // centre pixel - point
    double z = 0.0, zx = 0.0, zy = 0.0;
    for (int cb = 0; cb < P; cb += 32) {
      const int c = cb + lane;
      const int dx = c - half;
      const int col = cx + dx;
      const bool colok = c < P && col >= 0 && col < m.w;
      Taps tx{};
      if (UPS && colok) tx = taps(col, up);
      TapIter ty(row0, f);
      double a0 = 0.0, a1 = 0.0;
      for (int rb = 0; rb < P; rb += 32) {
        // lane k computes the row Gaussian of row rb + k once; the warp shares it by shuffles
        const double ddl = oy + (double)(rb + lane - half);
        const double gl = rb + lane < P ? exp(-(ddl * ddl) * inv) : 0.0;
        const int nr = P - rb < 32 ? P - rb : 32;
        for (int k = 0; k < nr; ++k, ty.next(f)) {
          const double gy = __shfl_sync(kFullMask, gl, k);
          const int dy = rb + k - half;
          const int row = cy + dy;
          if (!colok || row < 0 || row >= m.h) continue;
          double v;
          if (UPS) v = (double)upsampled(m, ty.get(up), tx);
          else v = (double)load(m.data + (int64_t)row * m.w + col);
          if (!(v > 0.0)) continue;
          a0 += v * gy;
          a1 += v * gy * dy;
        }
      }
      if (colok) {
        const double ddx = ox + dx;
        const double gx = exp(-(ddx * ddx) * inv);
        z += gx * a0;
        zx += gx * a0 * dx;
        zy += gx * a1;
      }
    }
    z = warp_sum(z);
    zx = warp_sum(zx);
    zy = warp_sum(zy);
    if (z > 0.0) {
      vx = ox + zx / z;
      vy = oy + zy / z;
    }
  }
  if (lane == 0) {
    t_out[2 * item] = sx + vx;
    t_out[2 * item + 1] = sy + vy;
  }
}

UpKernel make_up(int f) {
  UpKernel u{};
  u.f = f;
  for (int j = 0; j < 2 * f && j < 2 * kMaxFactor; ++j)
    u.k[j] = 1.0 - fabs((double)j - ((double)(2 * f) - 1.0) / 2.0) / (double)f;
  return u;
}

template <typename T>
int launch_argmax(const ectfast_maps& mp, double* peaks, int* flags, cudaStream_t stream) {
  const T* data = static_cast<const T*>(mp.data);
  const int64_t maps = mp.batch * mp.n;
  const int64_t size = mp.src_h * mp.src_w;
  const unsigned grid = (unsigned)maps;
  const UpKernel up = make_up(mp.factor);
  const int h = (int)mp.src_h, w = (int)mp.src_w;
  if (mp.factor > 1) {
    argmax_kernel<T, 2><<<grid, kArgmaxThreads, 0, stream>>>(data, h, w, up, peaks, flags);
  } else if ((reinterpret_cast<uintptr_t>(data) % 16 == 0) && ((size * (int64_t)sizeof(T)) % 16 == 0)) {
    argmax_kernel<T, 1><<<grid, kArgmaxThreads, 0, stream>>>(data, h, w, up, peaks, flags);
  } else {
    argmax_kernel<T, 0><<<grid, kArgmaxThreads, 0, stream>>>(data, h, w, up, peaks, flags);
  }
  return launch_status();
}

template <typename T>
int launch_patch(const ectfast_maps& mp, const double* shape, int r, double a, double b, double rho,
                 int mode, double* w, double* target, cudaStream_t stream) {
  const T* data = static_cast<const T*>(mp.data);
  const int64_t count = mp.batch * mp.n;
  const unsigned grid = grid_for(count, kPatchWarpsPerBlock);
  const int half = r / 2;
  const UpKernel up = make_up(mp.factor);
  const int h = (int)mp.src_h, wd = (int)mp.src_w;
  if (mp.factor > 1)
    patch_kernel<T, true><<<grid, kPatchWarpsPerBlock * 32, 0, stream>>>(
        data, h, wd, up, count, shape, half, a, b, rho, mode, w, target);
  else
    patch_kernel<T, false><<<grid, kPatchWarpsPerBlock * 32, 0, stream>>>(
        data, h, wd, up, count, shape, half, a, b, rho, mode, w, target);
  return launch_status();
}

bool maps_ok(const ectfast_maps* mp) {
  if (!mp || !mp->data) return false;
  if (mp->batch <= 0 || mp->n <= 0 || mp->src_h <= 0 || mp->src_w <= 0 || mp->factor < 1) return false;
  if (mp->factor > 1 && mp->factor % 2) return false;
  if (mp->factor > kMaxFactor) return false;
  // fitted sizes fit in int32 (the kernels index rows and columns with int)
  if (mp->src_h * mp->factor > (int64_t(1) << 30) || mp->src_w * mp->factor > (int64_t(1) << 30)) return false;
  // grid limits: one block per map for argmax (gridDim.x < 2^31)
  if (mp->batch * mp->n >= (int64_t)INT_MAX) return false;
  return true;
}

}  // namespace
}  // namespace ectfast_cuda

using namespace ectfast_cuda;

extern "C" int ectfast_cuda_argmax(int device, const ectfast_maps* maps, double* peaks, int* flags,
                                   void* stream) {
  if (!maps_ok(maps) || !peaks || !flags) return ECTFAST_CUDA_EINVAL;
  DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (maps->dtype) {
    case ECTFAST_F32: return launch_argmax<float>(*maps, peaks, flags, s);
    case ECTFAST_F16: return launch_argmax<__half>(*maps, peaks, flags, s);
    case ECTFAST_BF16: return launch_argmax<__nv_bfloat16>(*maps, peaks, flags, s);
    case ECTFAST_F64: return launch_argmax<double>(*maps, peaks, flags, s);
    default: return ECTFAST_CUDA_EINVAL;
  }
}

extern "C" int ectfast_cuda_patch(int device, const ectfast_maps* maps, const double* shape, int r,
                                  double a, double b, double rho, int mode, double* w,
                                  double* target, void* stream) {
  if (!maps_ok(maps) || !shape || !w || r < 0) return ECTFAST_CUDA_EINVAL;
  if (mode != ECTFAST_PATCH_CONFIDENCE && mode != ECTFAST_PATCH_MEANSHIFT_WEIGHTED &&
      mode != ECTFAST_PATCH_MEANSHIFT_UNWEIGHTED)
    return ECTFAST_CUDA_EINVAL;
  if (mode != ECTFAST_PATCH_CONFIDENCE && !target) return ECTFAST_CUDA_EINVAL;
  if (r / 2 > (1 << 16)) return ECTFAST_CUDA_EINVAL;
  DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (maps->dtype) {
    case ECTFAST_F32: return launch_patch<float>(*maps, shape, r, a, b, rho, mode, w, target, s);
    case ECTFAST_F16: return launch_patch<__half>(*maps, shape, r, a, b, rho, mode, w, target, s);
    case ECTFAST_BF16: return launch_patch<__nv_bfloat16>(*maps, shape, r, a, b, rho, mode, w, target, s);
    case ECTFAST_F64: return launch_patch<double>(*maps, shape, r, a, b, rho, mode, w, target, s);
    default: return ECTFAST_CUDA_EINVAL;
  }
}
