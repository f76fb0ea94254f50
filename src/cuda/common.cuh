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

// One map of the batch, addressed in fitted pixels (after upsampling). Sizes fit in int32 (the
// bindings limit fitted maps to 2^30 pixels a side).
template <typename T>
struct MapView {
  const T* data;  // this map's first source pixel
  int src_h, src_w;
  int f;          // upsampling factor (1 or even)
  int h, w;       // fitted size = src * f
};

// The upsampling kernel's weights, computed on the host exactly as
// _reference.upsample_matrix does (K[j] = 1 - |j - (2f - 1)/2| / f in float64), so that the
// weights agree bit for bit; passed by value (a __grid_constant__ kernel parameter).
constexpr int kMaxFactor = 16;
struct UpKernel {
  int f;
  double k[2 * kMaxFactor];
};

// Taps of the transposed-convolution upsampling (kernel 2f, stride f, padding f/2) at fitted
// coordinate o: out[o] = K[j] in[hi] + K[j + f] in[hi - 1] with q = o + f/2, hi = floor(q / f),
// j = q - f hi (source indices outside the map are zero taps).
struct Taps {
  int hi;  // source index of the first tap (hi - 1 is the second)
  double w_hi, w_lo;
};

__device__ __forceinline__ int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

__device__ __forceinline__ Taps taps(int o, const UpKernel& u) {
  const int q = o + u.f / 2;
  const int hi = floor_div(q, u.f);
  const int j = q - hi * u.f;
  return Taps{hi, u.k[j], u.k[j + u.f]};
}

// Taps of consecutive coordinates o, o + 1, ... without a division per step.
struct TapIter {
  int hi, j;
  __device__ __forceinline__ TapIter(int o, int f) {
    const int q = o + f / 2;
    hi = floor_div(q, f);
    j = q - hi * f;
  }
  __device__ __forceinline__ Taps get(const UpKernel& u) const { return Taps{hi, u.k[j], u.k[j + u.f]}; }
  __device__ __forceinline__ void next(int f) {
    if (++j == f) {
      j = 0;
      ++hi;
    }
  }
};

// Upsampled value at a fitted pixel inside the fitted map, from its row and column taps.
// Computed in float64 (exact for the 4 products and sums near a peak) and then rounded to the
// fitted type, as _reference.upsample does (einsum in float64, astype(maps.dtype)).
template <typename T>
__device__ __forceinline__ typename Fitted<T>::type upsampled(const MapView<T>& m, const Taps& ty,
                                                              const Taps& tx) {
  const int y0 = ty.hi, y1 = ty.hi - 1, x0 = tx.hi, x1 = tx.hi - 1;
  const bool vx0 = x0 < m.src_w, vx1 = x1 >= 0;
  double r0 = 0.0, r1 = 0.0;
  if (y0 < m.src_h) {
    const T* row = m.data + (int64_t)y0 * m.src_w;
    const double a = vx0 ? (double)load(row + x0) : 0.0;
    const double b = vx1 ? (double)load(row + x1) : 0.0;
    r0 = tx.w_hi * a + tx.w_lo * b;
  }
  if (y1 >= 0) {
    const T* row = m.data + (int64_t)y1 * m.src_w;
    const double a = vx0 ? (double)load(row + x0) : 0.0;
    const double b = vx1 ? (double)load(row + x1) : 0.0;
    r1 = tx.w_hi * a + tx.w_lo * b;
  }
  return (typename Fitted<T>::type)(ty.w_hi * r0 + ty.w_lo * r1);
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ int warp_min_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ int warp_max_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
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
