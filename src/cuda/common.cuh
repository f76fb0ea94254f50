// Device helpers shared by the ectfast kernels: loading a map value of any dtype, the on-the-fly
// bilinear upsampling of the FCN's UpsampleNet, warp reductions, and a device guard for the host.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "ectfast_cuda.h"

namespace ectfast_cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// The value type a map is fitted in: what _reference.py sees after fit.check_maps (float16 and
// bfloat16 become float32; float64 stays float64).
template <typename T> struct Fitted { using type = float; };
template <> struct Fitted<double> { using type = double; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_float(double v) { return v; }

template <typename T>
__device__ __forceinline__ typename Fitted<T>::type load(const T* p) {
  return to_float(__ldg(p));
}
template <>
__device__ __forceinline__ float load<__half>(const __half* p) {
  return __half2float(__ldg(p));
}
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}

// One map of the batch, addressed in fitted pixels (after upsampling).
template <typename T>
struct MapView {
  const T* data;      // this map's first source pixel
  int64_t src_h, src_w;
  int f;              // upsampling factor (1 or even)
  int64_t h, w;       // fitted size = src * f
};

// Taps of the transposed-convolution upsampling (kernel 2f, stride f, padding f/2) for fitted
// coordinate o >= 0: out[o] = K[j] in[i_hi] + K[j + f] in[i_hi - 1], j = o + f/2 - f i_hi,
// K[j] = 1 - |j - (2f - 1)/2| / f, computed the way _reference.upsample_matrix computes it so
// that the float64 weights agree bit for bit.
struct Taps {
  int64_t hi;        // source index of the first tap (hi - 1 is the second)
  double w_hi, w_lo;
};

__device__ __forceinline__ double kernel_weight(int j, int f) {
  return 1.0 - fabs((double)j - ((double)(2 * f) - 1.0) / 2.0) / (double)f;
}

__device__ __forceinline__ Taps taps(int64_t o, int f) {
  Taps t;
  const int64_t q = o + f / 2;
  t.hi = q / f;
  const int j = (int)(q - t.hi * f);
  t.w_hi = kernel_weight(j, f);
  t.w_lo = kernel_weight(j + f, f);
  return t;
}

// Upsampled value at fitted (row, col) inside the fitted map, from the row and column taps.
// Computed in float64 (exact for the 4 products and sums near a peak) and then rounded to the
// fitted type, as _reference.upsample does (einsum in float64, astype(maps.dtype)).
template <typename T>
__device__ __forceinline__ typename Fitted<T>::type upsampled(const MapView<T>& m, const Taps& ty,
                                                              const Taps& tx) {
  const int64_t y0 = ty.hi, y1 = ty.hi - 1, x0 = tx.hi, x1 = tx.hi - 1;
  const bool vy0 = y0 < m.src_h, vy1 = y1 >= 0, vx0 = x0 < m.src_w, vx1 = x1 >= 0;
  double r0 = 0.0, r1 = 0.0;
  if (vy0) {
    const T* row = m.data + y0 * m.src_w;
    const double a = vx0 ? (double)load(row + x0) : 0.0;
    const double b = vx1 ? (double)load(row + x1) : 0.0;
    r0 = tx.w_hi * a + tx.w_lo * b;
  }
  if (vy1) {
    const T* row = m.data + y1 * m.src_w;
    const double a = vx0 ? (double)load(row + x0) : 0.0;
    const double b = vx1 ? (double)load(row + x1) : 0.0;
    r1 = tx.w_hi * a + tx.w_lo * b;
  }
  return (typename Fitted<T>::type)(ty.w_hi * r0 + ty.w_lo * r1);
}

// Value at fitted (row, col); zero outside the map.
template <typename T, bool UPS>
__device__ __forceinline__ typename Fitted<T>::type sample(const MapView<T>& m, int64_t row,
                                                           int64_t col) {
  using V = typename Fitted<T>::type;
  if (row < 0 || col < 0 || row >= m.h || col >= m.w) return V(0);
  if (!UPS) return load(m.data + row * m.w + col);
  return upsampled(m, taps(row, m.f), taps(col, m.f));
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ double clamp_coord(double v, double lo, double hi) {
  // fmax/fmin return the number when one operand is NaN: a NaN coordinate becomes `lo`.
  return fmin(fmax(v, lo), hi);
}

__device__ __forceinline__ double sigmoid(double z) {
  return z >= 0.0 ? 1.0 / (1.0 + exp(-z)) : exp(z) / (1.0 + exp(z));
}

}  // namespace ectfast_cuda

// ---- host side ----
#define ECTFAST_CUDA_TRY(expr)                   \
  do {                                           \
    cudaError_t ectfast_err_ = (expr);           \
    if (ectfast_err_ != cudaSuccess) return (int)ectfast_err_; \
  } while (0)

namespace ectfast_cuda {

// Makes `device` current for the scope and restores the caller's device afterwards (torch and
// CuPy keep their own notion of the current device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) {
      status_ = cudaSetDevice(device);
      switched_ = status_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  bool switched_ = false;
  cudaError_t status_ = cudaSuccess;
};

inline int launch_status() {
  cudaError_t e = cudaGetLastError();
  return (int)e;
}

inline unsigned grid_for(int64_t work, int per_block) {
  int64_t g = (work + per_block - 1) / per_block;
  return (unsigned)(g < 1 ? 1 : g);
}

}  // namespace ectfast_cuda
