// ectfast CUDA backend: the C-style host API of the kernels in src/cuda/*.cu.
//
// This header needs no CUDA headers, so plain C++ (src/cpp/cuda_bindings.cpp) can include it.
// Every function returns 0 on success or a cudaError_t code (ectfast_cuda_error_string gives its
// text); arguments are checked for the obvious (null pointers, non-positive sizes) and give
// ECTFAST_CUDA_EINVAL, but the Python bindings validate shapes, dtypes, devices and contiguity
// before calling. Work is queued on `stream` (a cudaStream_t; 0 = the legacy default stream) on
// device `device`; no function synchronises the host unless its name says so.
//
// Conventions (shared with python/ectfast/_reference.py): shapes are (x, y) float64, 0-based
// pixel centres of the maps *as fitted* (after upsampling); a patch of size r is the
// (2h+1)x(2h+1) block, h = r/2, centred on pixel floor(p + 0.5) of the shape clamped to
// [1, W-2] x [1, H-2]; pixels outside the map are zero; negatives are clamped to zero; the peak
// of a map is its first maximum in row-major order.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ECTFAST_CUDA_API __declspec(dllexport)
#else
#define ECTFAST_CUDA_API __attribute__((visibility("default")))
#endif

/* cudaErrorInvalidValue: what the API returns for a bad argument it catches itself. */
#define ECTFAST_CUDA_EINVAL 1

/* dtype codes of the maps */
enum { ECTFAST_F32 = 0, ECTFAST_F16 = 1, ECTFAST_BF16 = 2, ECTFAST_F64 = 3 };

/* flags[0] != 0: a map held a NaN/inf (set by ectfast_cuda_argmax);
   flags[1] != 0: a normal-equation matrix was not positive definite (ectfast_cuda_project). */
enum { ECTFAST_FLAG_NONFINITE = 0, ECTFAST_FLAG_NOT_SPD = 1, ECTFAST_N_FLAGS = 2 };

/* patch modes of ectfast_cuda_patch */
enum { ECTFAST_PATCH_CONFIDENCE = 0, ECTFAST_PATCH_MEANSHIFT_WEIGHTED = 1,
       ECTFAST_PATCH_MEANSHIFT_UNWEIGHTED = 2 };

/* Response maps as stored on the device: C-contiguous (B, n, Hs, Ws) of `dtype`, fitted at
   (Hs*factor) x (Ws*factor) (< 2^30 a side): factor 1 = as stored; an even factor <= 16 upsamples on the fly exactly
   like the FCN's UpsampleNet (transposed convolution, kernel 2f, stride f, padding f/2). */
typedef struct {
  const void* data;
  int dtype;
  int64_t batch, n, src_h, src_w;
  int factor;
} ectfast_maps;

/* Devices usable now; 0 (never an error) when there is no driver or no device. */
ECTFAST_CUDA_API int ectfast_cuda_device_count(void);
ECTFAST_CUDA_API const char* ectfast_cuda_error_string(int code);
/* Name and compute capability of a device, memory bus width (bits) and memory clock (kHz). */
ECTFAST_CUDA_API int ectfast_cuda_device_info(int device, char* name, size_t name_len, int* major,
                                              int* minor, int* bus_width_bits, int* mem_clock_khz,
                                              int* sm_count);
/* Where a pointer lives: *device = its device, *is_device = 1 for device or managed memory. */
ECTFAST_CUDA_API int ectfast_cuda_pointer_device(const void* ptr, int* device, int* is_device);
ECTFAST_CUDA_API int ectfast_cuda_stream_synchronize(int device, void* stream);
ECTFAST_CUDA_API int ectfast_cuda_memcpy_d2h(int device, void* dst, const void* src, size_t bytes,
                                             void* stream);
ECTFAST_CUDA_API int ectfast_cuda_memcpy_h2d(int device, void* dst, const void* src, size_t bytes,
                                             void* stream);

/* Estimation: peaks (B*n*2 float64, (x, y)) of each map; sets flags[0] when a value is not finite. */
ECTFAST_CUDA_API int ectfast_cuda_argmax(int device, const ectfast_maps* maps, double* peaks,
                                         int* flags, void* stream);

/* Eq. 15 and Eq. 9 on the r x r patch of each (face, landmark) around `shape` (B*n*2):
   mode CONFIDENCE: weights -> w (B*n*2); target unused (may be null).
   mode MEANSHIFT_WEIGHTED: w = confidence, target = shape + v with kernel variance
     2 rho / (w_x + w_y) (v = 0 where w_x + w_y = 0).
   mode MEANSHIFT_UNWEIGHTED: w = 1, target = shape + v with kernel variance rho. */
ECTFAST_CUDA_API int ectfast_cuda_patch(int device, const ectfast_maps* maps, const double* shape,
                                        int r, double a, double b, double rho, int mode, double* w,
                                        double* target, void* stream);

/* Eqs. 14 / 8 for each face f (basis S: n2 x k row-major, orthonormal; n2 = 2n):
     A = lam diag(prior_inv) + S^T W S + eps E,  rhs = S^T W (t - mean) + eps E x0
   (W = diag(w[f]) or I when w is null; E selects the first 4 parameters).
   With p != null: solves A p = rhs on the device (Cholesky, float64); a non-SPD system sets
   flags[1] and gives p = NaN for that face. With p == null: writes A (B*k*k) and rhs (B*k)
   for a host solve. */
ECTFAST_CUDA_API int ectfast_cuda_project(int device, const double* basis, const double* mean,
                                          const double* prior_inv, int n2, int k, int64_t batch,
                                          const double* w, const double* target, const double* x0,
                                          double lam, double eps, double* p, double* A,
                                          double* rhs, int* flags, void* stream);

/* s = mean + S p for each face: p (B*k) -> s (B*n2). */
ECTFAST_CUDA_API int ectfast_cuda_shape(int device, const double* basis, const double* mean,
                                        int n2, int k, int64_t batch, const double* p, double* s,
                                        void* stream);

/* out = shape clamped to [1, width-2] x [1, height-2]; count = number of points (B*n). */
ECTFAST_CUDA_API int ectfast_cuda_clamp(int device, const double* shape, double* out,
                                        int64_t count, int64_t height, int64_t width, void* stream);

/* Early stop per face: p_out = active ? p_new : p_old;
   active_out = active && |p_new - p_old| >= tol.  active: one byte per face (0/1). */
ECTFAST_CUDA_API int ectfast_cuda_freeze(int device, const double* p_old, const double* p_new,
                                         const uint8_t* active, int k, int64_t batch, double tol,
                                         double* p_out, uint8_t* active_out, void* stream);

/* The whole of Algorithm 1 (python/ectfast/fit.py) in one call, with the same kernels in the
   same order as the per-op path (so the results are identical), scratch from the stream-ordered
   allocator (cudaMallocAsync/cudaFreeAsync) and no host synchronisation.
   method: 0 crm, 1 crm-pdm, 2 crm-clm, 3 crm-clm-c, 4 ect. sizes: n_sizes tuning patch sizes (host
   array). tol <= 0: no early stop. x0: (B, k) prior placement (fit's prior_params).
   Outputs: peaks, initial, landmarks (B*n*2), params (B*k; untouched for crm), w_final (B*n*2,
   the confidence weights at the result); flags as for argmax/project. */
enum { ECTFAST_CRM = 0, ECTFAST_CRM_PDM = 1, ECTFAST_CRM_CLM = 2, ECTFAST_CRM_CLM_C = 3, ECTFAST_ECT = 4 };
ECTFAST_CUDA_API int ectfast_cuda_fit(int device, const ectfast_maps* maps, const double* basis,
                                      const double* mean, const double* prior_inv, int n2, int k,
                                      int method, const int* sizes, int n_sizes, int r0, double a,
                                      double b, double gamma, double rho, double rho_tilde,
                                      double tol, double eps, const double* x0, double* peaks,
                                      double* initial, double* landmarks, double* params,
                                      double* w_final, int* flags, void* stream);

#ifdef __cplusplus
}
#endif
