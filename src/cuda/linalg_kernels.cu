// The model kernels of the ectfast CUDA backend (float64): the regularised projection of Eqs.
// 14 / 8 (normal equations per face + batched Cholesky solve), s = mean + S p, clamping, and
// the per-face early stop.
#include <float.h>
#include <math.h>

#include "common.cuh"

namespace ectfast_cuda {
namespace {

constexpr int kProjectThreads = 256;
constexpr int kSimilarity = 4;

// One block per face. Shared memory: wr[2][n2] (w, w * (t - mean)), A[k*k], rhs[k].
//   A = lam diag(prior_inv) + S^T W S + eps E,  rhs = S^T W (t - mean) + eps E x0
// then (when p != null) A = L L^T in place (left-looking, one column per step, rows in
// parallel) and two triangular solves by one warp.
__global__ void __launch_bounds__(kProjectThreads)
project_kernel(const double* __restrict__ basis, const double* __restrict__ mean,
               const double* __restrict__ prior_inv, int n2, int k,
               const double* __restrict__ w, const double* __restrict__ target,
               const double* __restrict__ x0, double lam, double eps, double* __restrict__ p,
               double* __restrict__ A_out, double* __restrict__ rhs_out, int* __restrict__ flags) {
  extern __shared__ double smem[];
  double* ws = smem;            // n2
  double* wr = ws + n2;         // n2
  double* A = wr + n2;          // k * k, row-major, lower triangle used
  double* rhs = A + k * k;      // k
  __shared__ int not_spd;
  const int64_t face = blockIdx.x;
  const int tid = threadIdx.x;
  if (tid == 0) not_spd = 0;
  for (int i = tid; i < n2; i += kProjectThreads) {
    const double wi = w ? w[face * n2 + i] : 1.0;
    ws[i] = wi;
    wr[i] = wi * (target[face * n2 + i] - mean[i]);
  }
  __syncthreads();
  // lower triangle (i >= j) of S^T W S, and S^T W (t - mean)
  for (int e = tid; e < k * k; e += kProjectThreads) {
    const int i = e / k, j = e % k;
    if (j > i) continue;
    double acc = 0.0;
    for (int q = 0; q < n2; ++q) acc += __ldg(basis + q * k + i) * ws[q] * __ldg(basis + q * k + j);
    if (i == j) acc += lam * prior_inv[i] + (i < kSimilarity ? eps : 0.0);
    A[i * k + j] = acc;
  }
  for (int i = tid; i < k; i += kProjectThreads) {
    double acc = 0.0;
    for (int q = 0; q < n2; ++q) acc += __ldg(basis + q * k + i) * wr[q];
    if (i < kSimilarity) acc += eps * x0[face * k + i];
    rhs[i] = acc;
  }
  __syncthreads();
  if (!p) {  // host solve: hand back the full symmetric matrix and the right-hand side
    for (int e = tid; e < k * k; e += kProjectThreads) {
      const int i = e / k, j = e % k;
      A_out[face * k * k + e] = j <= i ? A[i * k + j] : A[j * k + i];
    }
    for (int i = tid; i < k; i += kProjectThreads) rhs_out[face * k + i] = rhs[i];
    return;
  }
  // Cholesky, column by column
  for (int j = 0; j < k; ++j) {
    if (tid == 0) {
      double d = A[j * k + j];
      for (int q = 0; q < j; ++q) d -= A[j * k + q] * A[j * k + q];
      if (!(d > 0.0) || !isfinite(d)) {
        not_spd = 1;
        d = 1.0;  // keep going without NaN/inf; the face's p is set to NaN below
      }
      A[j * k + j] = sqrt(d);
    }
    __syncthreads();
    const double djj = A[j * k + j];
    for (int i = j + 1 + tid; i < k; i += kProjectThreads) {
      double v = A[i * k + j];
      for (int q = 0; q < j; ++q) v -= A[i * k + q] * A[j * k + q];
      A[i * k + j] = v / djj;
    }
    __syncthreads();
  }
  // L y = rhs, L^T x = y: one warp; lane-parallel dot products
  if (tid < 32) {
    for (int i = 0; i < k; ++i) {
      double acc = 0.0;
      for (int q = tid; q < i; q += 32) acc -= A[i * k + q] * rhs[q];
      acc = warp_sum(acc);
      if (tid == 0) rhs[i] = (rhs[i] + acc) / A[i * k + i];
      __syncwarp();
    }
    for (int i = k - 1; i >= 0; --i) {
      double acc = 0.0;
      for (int q = i + 1 + tid; q < k; q += 32) acc -= A[q * k + i] * rhs[q];
      acc = warp_sum(acc);
      if (tid == 0) rhs[i] = (rhs[i] + acc) / A[i * k + i];
      __syncwarp();
    }
  }
  __syncthreads();
  const bool bad = not_spd != 0;
  for (int i = tid; i < k; i += kProjectThreads) p[face * k + i] = bad ? (double)NAN : rhs[i];
  if (bad && tid == 0) flags[ECTFAST_FLAG_NOT_SPD] = 1;
}

// s[f, c] = mean[c] + sum_j S[c, j] p[f, j]; one thread per (face, coordinate)
__global__ void shape_kernel(const double* __restrict__ basis, const double* __restrict__ mean,
                             int n2, int k, int64_t batch, const double* __restrict__ p,
                             double* __restrict__ s) {
  const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= batch * n2) return;
  const int64_t face = e / n2;
  const int c = (int)(e % n2);
  double acc = mean[c];
  for (int j = 0; j < k; ++j) acc += __ldg(basis + (int64_t)c * k + j) * p[face * k + j];
  s[e] = acc;
}

__global__ void clamp_kernel(const double* __restrict__ in, double* __restrict__ out, int64_t count,
                             double xmax, double ymax) {
  const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= count) return;
  // np.clip for finite values (a NaN becomes 1 here; finite maps never produce one)
  out[2 * e] = fmin(fmax(in[2 * e], 1.0), xmax);
  out[2 * e + 1] = fmin(fmax(in[2 * e + 1], 1.0), ymax);
}

__global__ void freeze_kernel(const double* __restrict__ p_old, const double* __restrict__ p_new,
                              const uint8_t* __restrict__ active, int k, int64_t batch, double tol,
                              double* __restrict__ p_out, uint8_t* __restrict__ active_out) {
  const int64_t face = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (face >= batch) return;
  const bool on = active[face] != 0;
  double step2 = 0.0;
  for (int j = 0; j < k; ++j) {
    const double d = p_new[face * k + j] - p_old[face * k + j];
    step2 += d * d;
  }
  // write p_out after reading everything (p_out may alias p_old)
  for (int j = 0; j < k; ++j) {
    const double v = on ? p_new[face * k + j] : p_old[face * k + j];
    p_out[face * k + j] = v;
  }
  active_out[face] = (on && sqrt(step2) >= tol) ? 1 : 0;
}

size_t project_smem(int n2, int k) { return sizeof(double) * ((size_t)2 * n2 + (size_t)k * k + k); }

}  // namespace
}  // namespace ectfast_cuda

using namespace ectfast_cuda;

extern "C" int ectfast_cuda_project(int device, const double* basis, const double* mean,
                                    const double* prior_inv, int n2, int k, int64_t batch,
                                    const double* w, const double* target, const double* x0,
                                    double lam, double eps, double* p, double* A, double* rhs,
                                    int* flags, void* stream) {
  if (!basis || !mean || !prior_inv || !target || !x0 || n2 <= 0 || k < kSimilarity || batch <= 0)
    return ECTFAST_CUDA_EINVAL;
  if (batch >= (int64_t)INT32_MAX) return ECTFAST_CUDA_EINVAL;
  if (p ? !flags : (!A || !rhs)) return ECTFAST_CUDA_EINVAL;
  DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  const size_t smem = project_smem(n2, k);
  int optin = 0;
  int current = 0;
  ECTFAST_CUDA_TRY(cudaGetDevice(&current));
  ECTFAST_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, current));
  if (smem + 64 > (size_t)optin) return ECTFAST_CUDA_EINVAL;  // the PDM is too large for one block
  if (smem > 48 * 1024)
    ECTFAST_CUDA_TRY(cudaFuncSetAttribute(project_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)smem));
  project_kernel<<<(unsigned)batch, kProjectThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      basis, mean, prior_inv, n2, k, w, target, x0, lam, eps, p, A, rhs, flags);
  return launch_status();
}

extern "C" int ectfast_cuda_shape(int device, const double* basis, const double* mean, int n2, int k,
                                  int64_t batch, const double* p, double* s, void* stream) {
  if (!basis || !mean || !p || !s || n2 <= 0 || k <= 0 || batch <= 0) return ECTFAST_CUDA_EINVAL;
  DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  const int threads = 256;
  shape_kernel<<<grid_for(batch * n2, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      basis, mean, n2, k, batch, p, s);
  return launch_status();
}

extern "C" int ectfast_cuda_clamp(int device, const double* shape, double* out, int64_t count,
                                  int64_t height, int64_t width, void* stream) {
  if (!shape || !out || count <= 0 || height < 3 || width < 3) return ECTFAST_CUDA_EINVAL;
  DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  const int threads = 256;
  clamp_kernel<<<grid_for(count, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      shape, out, count, (double)width - 2.0, (double)height - 2.0);
  return launch_status();
}

extern "C" int ectfast_cuda_freeze(int device, const double* p_old, const double* p_new,
                                   const uint8_t* active, int k, int64_t batch, double tol,
                                   double* p_out, uint8_t* active_out, void* stream) {
  if (!p_old || !p_new || !active || !p_out || !active_out || k <= 0 || batch <= 0)
    return ECTFAST_CUDA_EINVAL;
  DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  const int threads = 128;
  freeze_kernel<<<grid_for(batch, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      p_old, p_new, active, k, batch, tol, p_out, active_out);
  return launch_status();
}
