// The model kernels of the ectfast CUDA backend (float64): the regularised projection of Eqs.
// 14 / 8 (normal equations per face + batched Cholesky solve), s = mean + S p, clamping, and
// the per-face early stop.
#include <float.h>
#include <math.h>

#include "common.cuh"

namespace ectfast_cuda {
namespace {

constexpr int kProjectThreads = 256;
constexpr int kFacesPerBlock = 8;  // one warp per face in the solve
constexpr int kSimilarity = 4;
static_assert(kProjectThreads == 32 * kFacesPerBlock, "one warp per face");

// (i, j), j <= i, of entry l of a packed lower triangle (row i starts at i (i + 1) / 2)
__device__ __forceinline__ void tri_index(int l, int& i, int& j) {
  i = (int)((sqrt(8.0 * (double)l + 1.0) - 1.0) * 0.5);
  while ((i + 1) * (i + 2) / 2 <= l) ++i;
  while (i * (i + 1) / 2 > l) --i;
  j = l - i * (i + 1) / 2;
}

// kFacesPerBlock faces per block. Shared memory (float64):
//   wsT[n2][F] = w,  wrT[n2][F] = w (t - mean)    (face-minor: one 16-byte broadcast per 2 faces)
//   A[F][k (k + 1) / 2] packed lower triangles,  rhs[F][k]
// Accumulation: each thread takes entries (i, j) of the lower triangle (and entries of the
// right-hand side) and sums them for all F faces at once, so one pair of basis loads feeds F FMAs:
//   A = lam diag(prior_inv) + S^T W S + eps E,  rhs = S^T W (t - mean) + eps E x0.
// Solve (p != null): warp f factors face f's A = L L^T (column by column; lane 0 takes the pivot,
// lanes the rows below it) and solves L y = rhs, L^T p = y. With p == null the full A and rhs
// are written out for a host solve.
__global__ void __launch_bounds__(kProjectThreads)
project_kernel(const double* __restrict__ basis, const double* __restrict__ mean,
               const double* __restrict__ prior_inv, int n2, int k, int64_t batch,
               const double* __restrict__ w, const double* __restrict__ target,
               const double* __restrict__ x0, double lam, double eps, double* __restrict__ p,
               double* __restrict__ A_out, double* __restrict__ rhs_out, int* __restrict__ flags) {
  constexpr int F = kFacesPerBlock;
  extern __shared__ double smem[];
  const int T = k * (k + 1) / 2;
  double* wsT = smem;                    // n2 * F
  double* wrT = wsT + (size_t)n2 * F;    // n2 * F
  double* A = wrT + (size_t)n2 * F;      // F * T
  double* rhs = A + (size_t)F * T;       // F * k
  const int64_t face0 = (int64_t)blockIdx.x * F;
  const int nf = (int)((batch - face0) < F ? (batch - face0) : F);
  const int tid = threadIdx.x;
  for (int e = tid; e < n2 * F; e += kProjectThreads) {
    const int q = e / F, f = e % F;
    double wi = 0.0, ri = 0.0;
    if (f < nf) {
      const int64_t g = (face0 + f) * n2 + q;
      wi = w ? w[g] : 1.0;
      ri = wi * (target[g] - mean[q]);
    }
    wsT[e] = wi;
    wrT[e] = ri;
  }
  __syncthreads();
  for (int l = tid; l < T + k; l += kProjectThreads) {
    double acc[F];
#pragma unroll
    for (int f = 0; f < F; ++f) acc[f] = 0.0;
    if (l < T) {
      int i, j;
      tri_index(l, i, j);
      for (int q = 0; q < n2; ++q) {
        const double sij = __ldg(basis + q * k + i) * __ldg(basis + q * k + j);
        const double2* v = reinterpret_cast<const double2*>(wsT + q * F);
#pragma unroll
        for (int h = 0; h < F / 2; ++h) {
          const double2 u = v[h];
          acc[2 * h] += sij * u.x;
          acc[2 * h + 1] += sij * u.y;
        }
      }
      const double diag = i == j ? lam * prior_inv[i] + (i < kSimilarity ? eps : 0.0) : 0.0;
#pragma unroll
      for (int f = 0; f < F; ++f) A[f * T + l] = acc[f] + diag;
    } else {
      const int i = l - T;
      for (int q = 0; q < n2; ++q) {
        const double si = __ldg(basis + q * k + i);
        const double2* v = reinterpret_cast<const double2*>(wrT + q * F);
#pragma unroll
        for (int h = 0; h < F / 2; ++h) {
          const double2 u = v[h];
          acc[2 * h] += si * u.x;
          acc[2 * h + 1] += si * u.y;
        }
      }
#pragma unroll
      for (int f = 0; f < F; ++f)
        rhs[f * k + i] = acc[f] + ((i < kSimilarity && f < nf) ? eps * x0[(face0 + f) * k + i] : 0.0);
    }
  }
  __syncthreads();
  if (!p) {  // host solve: the full symmetric matrices and the right-hand sides
    for (int f = 0; f < nf; ++f) {
      for (int e = tid; e < k * k; e += kProjectThreads) {
        const int i = e / k, j = e % k;
        const int l = j <= i ? i * (i + 1) / 2 + j : j * (j + 1) / 2 + i;
        A_out[(face0 + f) * k * k + e] = A[f * T + l];
      }
      for (int i = tid; i < k; i += kProjectThreads) rhs_out[(face0 + f) * k + i] = rhs[f * k + i];
    }
    return;
  }
  const int f = tid / 32, lane = tid % 32;
  if (f >= nf) return;  // no block-wide barrier below
  double* L = A + f * T;
  double* y = rhs + f * k;
  int bad = 0;  // meaningful in lane 0
  for (int j = 0; j < k; ++j) {
    const int rj = j * (j + 1) / 2;
    double part = 0.0;
    for (int q = lane; q < j; q += 32) part += L[rj + q] * L[rj + q];
    part = warp_sum(part);
    if (lane == 0) {
      double d = L[rj + j] - part;
      if (!(d > 0.0) || !isfinite(d)) {
        bad = 1;
        d = 1.0;  // keep going without NaN/inf; this face's p is set to NaN below
      }
      L[rj + j] = sqrt(d);
    }
    __syncwarp();
    const double djj = L[rj + j];
    for (int i = j + 1 + lane; i < k; i += 32) {
      const int ri = i * (i + 1) / 2;
      double v = L[ri + j];
      for (int q = 0; q < j; ++q) v -= L[ri + q] * L[rj + q];
      L[ri + j] = v / djj;
    }
    __syncwarp();
  }
  for (int i = 0; i < k; ++i) {  // L y = rhs
    const int ri = i * (i + 1) / 2;
    double part = 0.0;
    for (int q = lane; q < i; q += 32) part += L[ri + q] * y[q];
    part = warp_sum(part);
    if (lane == 0) y[i] = (y[i] - part) / L[ri + i];
    __syncwarp();
  }
  for (int i = k - 1; i >= 0; --i) {  // L^T x = y
    double part = 0.0;
    for (int q = i + 1 + lane; q < k; q += 32) part += L[q * (q + 1) / 2 + i] * y[q];
    part = warp_sum(part);
    if (lane == 0) y[i] = (y[i] - part) / L[i * (i + 1) / 2 + i];
    __syncwarp();
  }
  bad = __shfl_sync(kFullMask, bad, 0);
  for (int i = lane; i < k; i += 32) p[(face0 + f) * k + i] = bad ? (double)NAN : y[i];
  if (bad && lane == 0) flags[ECTFAST_FLAG_NOT_SPD] = 1;
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

// p_out may alias p_old and active_out may alias active (the fused fit does that): no __restrict__
__global__ void freeze_kernel(const double* p_old, const double* __restrict__ p_new,
                              const uint8_t* active, int k, int64_t batch, double tol,
                              double* p_out, uint8_t* active_out) {
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

size_t project_smem(int n2, int k) {
  const size_t T = (size_t)k * (k + 1) / 2;
  return sizeof(double) * ((size_t)2 * n2 * kFacesPerBlock + (size_t)kFacesPerBlock * (T + k));
}

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
  if (smem > (size_t)optin) return ECTFAST_CUDA_EINVAL;  // the PDM is too large for one block
  if (smem > 48 * 1024)
    ECTFAST_CUDA_TRY(cudaFuncSetAttribute(project_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)smem));
  const unsigned grid = (unsigned)((batch + kFacesPerBlock - 1) / kFacesPerBlock);
  project_kernel<<<grid, kProjectThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      basis, mean, prior_inv, n2, k, batch, w, target, x0, lam, eps, p, A, rhs, flags);
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
