// The C++/Eigen CPU backend of ectfast.fit: one function per equation of DESIGN.md, the same
// conventions as python/ectfast/_reference.py (read its header), batched over faces and
// landmarks with ectfast::parallel_for. Maps are float or double; everything accumulates in
// double. These functions trust their arguments: cpu_bindings.cpp validates shapes, dtypes,
// strides and values before calling them.
#pragma once

#include <cstdint>
#include <vector>

namespace ectfast {

// ------------------------------------------------------------------ per-map / per-landmark

//! Estimation: the first maximum of a map of `count` values in row-major order, and whether
//! every value was finite (checked in the same pass, so fit() reads the maps once).
struct ArgmaxResult {
  int64_t index;
  bool finite;
};
template <class T>
ArgmaxResult argmax_map(const T* values, int64_t count);

//! The part of a landmark's patch that lies inside the map, negatives clamped to 0 (pixels
//! outside the map are zero and contribute nothing to any sum below, so they are not stored).
//! buf is ny x nx row-major; buf(0, 0) is map pixel (x0, y0). cx, cy: the patch's centre pixel.
struct Patch {
  int64_t cx = 0, cy = 0, x0 = 0, y0 = 0, nx = 0, ny = 0;
  std::vector<double> buf;
  std::vector<double> col, row, gx, gy;  // scratch reused across landmarks
};

//! Cuts the (2h+1)^2 patch, h = r / 2, centred on pixel (floor(x + 0.5), floor(y + 0.5)) of an
//! H x W map. (x, y) must already be clamped to the map (clamp_point).
template <class T>
void extract_patch(const T* map, int64_t H, int64_t W, double x, double y, int64_t r, Patch& p);

//! Patch extraction from a map upsampled on the fly: the H x W map is the bilinear x`factor`
//! upsampling (exactly _reference.upsample, rounded to T) of the small (H/f) x (W/f) map.
template <class T>
void extract_patch_upsampled(const T* small, int64_t h_small, int64_t w_small, int factor,
                             double x, double y, int64_t r, Patch& p);

//! Keep a point inside the map: x in [1, W - 2], y in [1, H - 2] (np.clip semantics).
void clamp_point(double& x, double& y, int64_t H, int64_t W);

//! Eq. 15: the confidence (w_x, w_y) of a patch: S = its sum, sigma = standard deviations of
//! its normalised x / y marginals, w = sigmoid(a (S / sigma - b)); S = 0 or sigma = 0 -> 0.
void patch_confidence(Patch& p, double a, double b, double& wx, double& wy);

//! Eq. 9's kernel variance: 2 rho / (w_x + w_y) when weighted, rho otherwise.
double kernel_variance(double wx, double wy, double rho, bool weighted);

//! Eq. 9: the mean-shift vector v = sum_y omega_y y - x, omega_y proportional to
//! pi_y exp(-|x - y|^2 / (2 rho_i)) (separable Gaussian); v = 0 if the kernel mass is 0.
void mean_shift_vector(Patch& p, double x, double y, double rho_i, double& vx, double& vy);

//! Eqs. 14 / 8 in one SPD solve (Eigen LDLT, never an inverse), for one face:
//!   p = (lam diag(prior_inv) + S^T W S + eps E)^-1 (S^T W (t - mean) + eps E x0),
//! E selecting the 4 similarity parameters. basis: (n2, k) row-major; w: n2 weights or
//! nullptr for W = I; target, mean: n2; x0, out: k.
void regularized_projection(const double* basis, const double* mean, const double* prior_inv,
                            int64_t n2, int64_t k, double lam, const double* w,
                            const double* target, const double* x0, double eps, double* out);

//! Bilinear x factor of one H x W map, exactly as the FCN's UpsampleNet / _reference.upsample
//! (computed in double, rounded to T). out: (H f) x (W f).
template <class T>
void upsample_map(const T* in, int64_t H, int64_t W, int factor, T* out);

// ------------------------------------------------------------------ batched (threaded)

//! maps (B, n, H, W) -> peaks (B, n, 2) as (x, y); returns the number of maps holding a
//! non-finite value.
template <class T>
int64_t argmax_batch(const T* maps, int64_t B, int64_t n, int64_t H, int64_t W, double* peaks,
                     int threads);

//! Where the maps live: materialised (factor 1) or upsampled on the fly from (H/f, W/f) maps.
template <class T>
struct MapView {
  const T* data;
  int64_t B, n, H, W;  // the maps as fitted (after upsampling)
  int factor;          // 1: data is (B, n, H, W); f > 1: data is (B, n, H / f, W / f)
};

//! Eq. 15 at shape (B, n, 2) (clamped to the map first) -> w (B, n, 2).
template <class T>
void weights_batch(const MapView<T>& maps, const double* shape, int64_t r, double a, double b,
                   double* w, int threads);

//! Eq. 15 + Eq. 9 at shape (B, n, 2): w (B, n, 2) (ones when unweighted) and targets
//! shape + v (B, n, 2) (v from the clamped shape, added to the shape as given).
template <class T>
void mean_shift_batch(const MapView<T>& maps, const double* shape, int64_t r, double a, double b,
                      double rho, bool weighted, double* w, double* target, int threads);

//! regularized_projection for each of B faces: w (B, n2) or nullptr, target (B, n2),
//! x0 (B, k) -> out (B, k).
void project_batch(const double* basis, const double* mean, const double* prior_inv, int64_t n2,
                   int64_t k, double lam, const double* w, const double* target, const double* x0,
                   double eps, int64_t B, double* out, int threads);

//! maps (B, n, H, W) -> (B, n, H f, W f).
template <class T>
void upsample_batch(const T* maps, int64_t B, int64_t n, int64_t H, int64_t W, int factor, T* out,
                    int threads);

//! Estimation on maps upsampled on the fly (never materialised): small maps (B, n, h, w) ->
//! peaks (B, n, 2) in upsampled pixels; returns the number of maps holding a non-finite value.
template <class T>
int64_t argmax_upsampled_batch(const T* small, int64_t B, int64_t n, int64_t h, int64_t w,
                               int factor, double* peaks, int threads);

}  // namespace ectfast
