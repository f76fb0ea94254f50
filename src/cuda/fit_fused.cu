// Algorithm 1 of ECT in one host call (see ectfast_cuda_fit in ectfast_cuda.h): the per-op
// kernels queued back to back on the caller's stream, scratch from the stream-ordered allocator.
// Mirrors python/ectfast/fit.py step by step; keep the two in sync.
#include <utility>

#include "common.cuh"

namespace {

// Stream-ordered scratch, freed (stream-ordered, after the queued work) when the scope ends.
class Scratch {
 public:
  explicit Scratch(cudaStream_t s) : stream_(s) {}
  ~Scratch() {
    for (int i = 0; i < n_; ++i) cudaFreeAsync(ptrs_[i], stream_);
  }
  template <typename T>
  cudaError_t get(T** out, size_t count) {
    if (n_ == kMax) return cudaErrorInvalidValue;
    void* p = nullptr;
    const cudaError_t e = cudaMallocAsync(&p, count > 0 ? count * sizeof(T) : 1, stream_);
    if (e != cudaSuccess) return e;
    ptrs_[n_++] = p;
    *out = static_cast<T*>(p);
    return cudaSuccess;
  }

 private:
  static constexpr int kMax = 8;
  cudaStream_t stream_;
  void* ptrs_[kMax] = {};
  int n_ = 0;
};

}  // namespace

#define FIT_TRY(expr)              \
  do {                             \
    int rc_ = (expr);              \
    if (rc_ != 0) return rc_;      \
  } while (0)

extern "C" int ectfast_cuda_fit(int device, const ectfast_maps* maps, const double* basis,
                                const double* mean, const double* prior_inv, int n2, int k,
                                int method, const int* sizes, int n_sizes, int r0, double a,
                                double b, double gamma, double rho, double rho_tilde, double tol,
                                double eps, const double* x0, double* peaks, double* initial,
                                double* landmarks, double* params, double* w_final, int* flags,
                                void* stream) {
  if (!maps || !basis || !mean || !prior_inv || !x0 || !peaks || !initial || !landmarks ||
      !w_final || !flags || n2 <= 0 || k < 4 || method < ECTFAST_CRM || method > ECTFAST_ECT ||
      n_sizes < 0 || (n_sizes > 0 && !sizes) || r0 < 2)
    return ECTFAST_CUDA_EINVAL;
  if (method != ECTFAST_CRM && !params) return ECTFAST_CUDA_EINVAL;
  for (int i = 0; i < n_sizes; ++i)
    if (sizes[i] < 2) return ECTFAST_CUDA_EINVAL;
  ectfast_cuda::DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t B = maps->batch, n = maps->n;
  const int64_t H = maps->src_h * maps->factor, W = maps->src_w * maps->factor;
  const size_t pts = (size_t)(B * n * 2), pb = (size_t)(B * k);
  const size_t bytes_pts = pts * sizeof(double);

  FIT_TRY(ectfast_cuda_argmax(device, maps, peaks, flags, stream));
  if (method == ECTFAST_CRM) {
    ECTFAST_CUDA_TRY(cudaMemcpyAsync(initial, peaks, bytes_pts, cudaMemcpyDeviceToDevice, s));
    ECTFAST_CUDA_TRY(cudaMemcpyAsync(landmarks, peaks, bytes_pts, cudaMemcpyDeviceToDevice, s));
    return ectfast_cuda_patch(device, maps, landmarks, r0, a, b, 1.0, ECTFAST_PATCH_CONFIDENCE,
                              w_final, nullptr, stream);
  }
  Scratch scratch(s);
  double *w = nullptr, *target = nullptr, *shape = nullptr, *p = nullptr, *p_new = nullptr;
  uint8_t* active = nullptr;
  ECTFAST_CUDA_TRY(scratch.get(&w, pts));
  ECTFAST_CUDA_TRY(scratch.get(&target, pts));
  ECTFAST_CUDA_TRY(scratch.get(&shape, pts));
  ECTFAST_CUDA_TRY(scratch.get(&p, pb));
  ECTFAST_CUDA_TRY(scratch.get(&p_new, pb));
  ECTFAST_CUDA_TRY(scratch.get(&active, (size_t)B));

  // Correction (Eq. 14): weights from the confidence of the peaks (W = I for CRM-PDM/CLM)
  const bool corrected = method == ECTFAST_CRM_CLM_C || method == ECTFAST_ECT;
  if (corrected)
    FIT_TRY(ectfast_cuda_patch(device, maps, peaks, r0, a, b, 1.0, ECTFAST_PATCH_CONFIDENCE, w,
                               nullptr, stream));
  FIT_TRY(ectfast_cuda_project(device, basis, mean, prior_inv, n2, k, B, corrected ? w : nullptr,
                               peaks, x0, gamma, eps, p, nullptr, nullptr, flags, stream));
  FIT_TRY(ectfast_cuda_shape(device, basis, mean, n2, k, B, p, shape, stream));
  FIT_TRY(ectfast_cuda_clamp(device, shape, initial, B * n, H, W, stream));
  // Tuning (Eqs. 8, 9)
  if (method != ECTFAST_CRM_PDM) {
    const bool weighted = method == ECTFAST_ECT;
    if (tol > 0.0) ECTFAST_CUDA_TRY(cudaMemsetAsync(active, 1, (size_t)B, s));
    for (int it = 0; it < n_sizes; ++it) {
      FIT_TRY(ectfast_cuda_shape(device, basis, mean, n2, k, B, p, shape, stream));
      FIT_TRY(ectfast_cuda_patch(device, maps, shape, sizes[it], a, b, rho,
                                 weighted ? ECTFAST_PATCH_MEANSHIFT_WEIGHTED : ECTFAST_PATCH_MEANSHIFT_UNWEIGHTED,
                                 w, target, stream));
      FIT_TRY(ectfast_cuda_project(device, basis, mean, prior_inv, n2, k, B, weighted ? w : nullptr,
                                   target, p, rho_tilde, eps, p_new, nullptr, nullptr, flags, stream));
      if (tol > 0.0)
        FIT_TRY(ectfast_cuda_freeze(device, p, p_new, active, k, B, tol, p, active, stream));
      else
        std::swap(p, p_new);
    }
  }
  FIT_TRY(ectfast_cuda_shape(device, basis, mean, n2, k, B, p, shape, stream));
  FIT_TRY(ectfast_cuda_clamp(device, shape, landmarks, B * n, H, W, stream));
  ECTFAST_CUDA_TRY(cudaMemcpyAsync(params, p, pb * sizeof(double), cudaMemcpyDeviceToDevice, s));
  const int r_final = (n_sizes > 0 && method != ECTFAST_CRM_PDM) ? sizes[n_sizes - 1] : r0;
  return ectfast_cuda_patch(device, maps, landmarks, r_final, a, b, 1.0, ECTFAST_PATCH_CONFIDENCE,
                            w_final, nullptr, stream);
}
