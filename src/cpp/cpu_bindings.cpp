// The C++/Eigen CPU backend's bindings (ectfast._core.cpu_*), used by python/ectfast/_cpu.py.
//
// Every function validates its arguments before touching memory (type, dtype, ndim, shape,
// C-contiguity, alignment, finiteness of coordinates, ranges of scalars) and raises TypeError /
// ValueError naming the argument, so calling them directly with bad input is safe. The GIL is
// released while the threaded kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "fit_cpu.hpp"
#include "parallel.hpp"

namespace py = pybind11;
using ectfast::MapView;

namespace {

constexpr int64_t kMaxPatch = int64_t(1) << 30;
constexpr int kMaxFactor = 64;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(a.shape(d));
  }
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

py::array as_array(const py::handle& h, const char* name) {
  if (!py::isinstance<py::array>(h))
    throw py::type_error(std::string(name) + ": expected a numpy.ndarray, got " +
                         std::string(py::str(py::type::handle_of(h).attr("__name__"))));
  py::array a = py::reinterpret_borrow<py::array>(h);
  const int flags = a.flags();
  if (!(flags & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array (use numpy.ascontiguousarray)");
  if (!(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(std::string(name) + ": expected an aligned array");
  return a;
}

void require_ndim(const py::array& a, const char* name, py::ssize_t ndim, const char* what) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) +
                          " dimensions " + what + ", got shape " + shape_str(a));
}

// 0: float32, 1: float64; TypeError otherwise.
int map_kind(const py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<float>()) || a.dtype().equal(py::dtype::of<float>())) return 0;
  if (a.dtype().is(py::dtype::of<double>()) || a.dtype().equal(py::dtype::of<double>())) return 1;
  throw py::type_error(std::string(name) + ": expected float32 or float64 values, got dtype " +
                       std::string(py::str(a.dtype())));
}

const double* f64_data(const py::array& a, const char* name) {
  if (!a.dtype().equal(py::dtype::of<double>()))
    throw py::type_error(std::string(name) + ": expected float64 values, got dtype " +
                         std::string(py::str(a.dtype())));
  return static_cast<const double*>(a.data());
}

void require_finite(const double* v, py::ssize_t count, const char* name) {
  for (py::ssize_t i = 0; i < count; ++i)
    if (!std::isfinite(v[i])) throw py::value_error(std::string(name) + ": contains NaN or infinite values");
}

int threads_arg(int n) {
  if (n < 0) throw py::value_error("num_threads: expected an integer >= 0 (0 = all cores), got " + std::to_string(n));
  return ectfast::resolve_threads(n);
}

double finite_arg(double v, const char* name) {
  if (!std::isfinite(v)) throw py::value_error(std::string(name) + ": expected a finite number");
  return v;
}

int factor_arg(int f) {
  if (f < 1 || f > kMaxFactor)
    throw py::value_error("factor: expected an integer in [1, " + std::to_string(kMaxFactor) + "], got " + std::to_string(f));
  return f;
}

int64_t patch_arg(int64_t r) {
  if (r < 0 || r > kMaxPatch) throw py::value_error("r: expected a patch size in [0, 2^30], got " + std::to_string(r));
  return r;
}

struct Maps {
  py::array arr;
  int kind;
  int64_t B, n, H, W;  // as fitted (H, W upsampled by factor)
  int factor;
};

Maps maps_arg(const py::handle& h, int factor) {
  Maps m{as_array(h, "maps"), 0, 0, 0, 0, 0, factor};
  m.kind = map_kind(m.arr, "maps");
  require_ndim(m.arr, "maps", 4, "(B, n, H, W)");
  m.B = m.arr.shape(0);
  m.n = m.arr.shape(1);
  m.H = m.arr.shape(2) * factor;
  m.W = m.arr.shape(3) * factor;
  if (m.arr.shape(2) < 1 || m.arr.shape(3) < 1)
    throw py::value_error("maps: expected maps of at least 1x1, got shape " + shape_str(m.arr));
  return m;
}

// A float64 (B, n, 2) array of finite coordinates matching the maps.
const double* points_arg(const py::handle& h, const Maps& m, const char* name) {
  py::array a = as_array(h, name);
  require_ndim(a, name, 3, "(B, n, 2)");
  if (a.shape(0) != m.B || a.shape(1) != m.n || a.shape(2) != 2)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(m.B) + ", " +
                          std::to_string(m.n) + ", 2) to match the maps, got " + shape_str(a));
  const double* p = f64_data(a, name);
  require_finite(p, a.size(), name);
  return p;
}

template <class T>
MapView<T> view(const Maps& m) {
  return MapView<T>{static_cast<const T*>(m.arr.data()), m.B, m.n, m.H, m.W, m.factor};
}

py::array_t<double> new_array(std::vector<py::ssize_t> shape) { return py::array_t<double>(shape); }

// ------------------------------------------------------------------ functions

py::tuple cpu_argmax(const py::handle& maps_h, int factor, int num_threads) {
  factor = factor_arg(factor);
  const Maps m = maps_arg(maps_h, factor);
  const int threads = threads_arg(num_threads);
  auto peaks = new_array({m.B, m.n, 2});
  double* out = peaks.mutable_data();
  const int64_t h = m.arr.shape(2), w = m.arr.shape(3);
  int64_t bad = 0;
  {
    py::gil_scoped_release nogil;
    if (factor == 1) {
      bad = m.kind == 0 ? ectfast::argmax_batch(static_cast<const float*>(m.arr.data()), m.B, m.n, h, w, out, threads)
                        : ectfast::argmax_batch(static_cast<const double*>(m.arr.data()), m.B, m.n, h, w, out, threads);
    } else {
      bad = m.kind == 0
                ? ectfast::argmax_upsampled_batch(static_cast<const float*>(m.arr.data()), m.B, m.n, h, w, factor, out, threads)
                : ectfast::argmax_upsampled_batch(static_cast<const double*>(m.arr.data()), m.B, m.n, h, w, factor, out, threads);
    }
  }
  return py::make_tuple(peaks, bad);
}

py::array_t<double> cpu_weights(const py::handle& maps_h, const py::handle& shape_h, int64_t r,
                                double a, double b, int factor, int num_threads) {
  factor = factor_arg(factor);
  const Maps m = maps_arg(maps_h, factor);
  const double* shape = points_arg(shape_h, m, "shape");
  r = patch_arg(r);
  finite_arg(a, "a");
  finite_arg(b, "b");
  const int threads = threads_arg(num_threads);
  auto w = new_array({m.B, m.n, 2});
  double* wp = w.mutable_data();
  {
    py::gil_scoped_release nogil;
    if (m.kind == 0)
      ectfast::weights_batch(view<float>(m), shape, r, a, b, wp, threads);
    else
      ectfast::weights_batch(view<double>(m), shape, r, a, b, wp, threads);
  }
  return w;
}

py::tuple cpu_mean_shift(const py::handle& maps_h, const py::handle& shape_h, int64_t r, double a,
                         double b, double rho, bool weighted, int factor, int num_threads) {
  factor = factor_arg(factor);
  const Maps m = maps_arg(maps_h, factor);
  const double* shape = points_arg(shape_h, m, "shape");
  r = patch_arg(r);
  finite_arg(a, "a");
  finite_arg(b, "b");
  if (!(std::isfinite(rho) && rho > 0)) throw py::value_error("rho: expected a finite number > 0");
  const int threads = threads_arg(num_threads);
  auto w = new_array({m.B, m.n, 2});
  auto t = new_array({m.B, m.n, 2});
  double* wp = w.mutable_data();
  double* tp = t.mutable_data();
  {
    py::gil_scoped_release nogil;
    if (m.kind == 0)
      ectfast::mean_shift_batch(view<float>(m), shape, r, a, b, rho, weighted, wp, tp, threads);
    else
      ectfast::mean_shift_batch(view<double>(m), shape, r, a, b, rho, weighted, wp, tp, threads);
  }
  return py::make_tuple(w, t);
}

py::array_t<double> cpu_project(const py::handle& basis_h, const py::handle& mean_h,
                                const py::handle& prior_h, double lam, const py::handle& w_h,
                                const py::handle& target_h, const py::handle& x0_h, double eps,
                                int num_threads) {
  py::array basis = as_array(basis_h, "basis");
  require_ndim(basis, "basis", 2, "(2n, k)");
  const int64_t n2 = basis.shape(0), k = basis.shape(1);
  if (n2 < 1 || k < 1) throw py::value_error("basis: expected a non-empty (2n, k) matrix, got " + shape_str(basis));
  const double* S = f64_data(basis, "basis");
  require_finite(S, basis.size(), "basis");

  py::array mean = as_array(mean_h, "mean");
  if (mean.size() != n2) throw py::value_error("mean: expected " + std::to_string(n2) + " values (2n), got shape " + shape_str(mean));
  const double* mu = f64_data(mean, "mean");
  require_finite(mu, mean.size(), "mean");

  py::array prior = as_array(prior_h, "prior_inv");
  require_ndim(prior, "prior_inv", 1, "(k,)");
  if (prior.shape(0) != k) throw py::value_error("prior_inv: expected shape (" + std::to_string(k) + ",), got " + shape_str(prior));
  const double* pinv = f64_data(prior, "prior_inv");
  require_finite(pinv, k, "prior_inv");
  for (int64_t j = 0; j < k; ++j)
    if (pinv[j] < 0) throw py::value_error("prior_inv: expected values >= 0");

  if (!(std::isfinite(lam) && lam >= 0)) throw py::value_error("lam: expected a finite number >= 0");
  if (!(std::isfinite(eps) && eps >= 0)) throw py::value_error("eps: expected a finite number >= 0");

  py::array target = as_array(target_h, "target");
  require_ndim(target, "target", 2, "(B, 2n)");
  const int64_t B = target.shape(0);
  if (target.shape(1) != n2) throw py::value_error("target: expected shape (B, " + std::to_string(n2) + "), got " + shape_str(target));
  const double* t = f64_data(target, "target");
  require_finite(t, target.size(), "target");

  py::array x0 = as_array(x0_h, "x0");
  require_ndim(x0, "x0", 2, "(B, k)");
  if (x0.shape(0) != B || x0.shape(1) != k)
    throw py::value_error("x0: expected shape (" + std::to_string(B) + ", " + std::to_string(k) + "), got " + shape_str(x0));
  const double* p0 = f64_data(x0, "x0");
  require_finite(p0, x0.size(), "x0");

  const double* w = nullptr;
  if (!w_h.is_none()) {
    py::array wa = as_array(w_h, "w");
    require_ndim(wa, "w", 2, "(B, 2n)");
    if (wa.shape(0) != B || wa.shape(1) != n2)
      throw py::value_error("w: expected shape (" + std::to_string(B) + ", " + std::to_string(n2) + "), got " + shape_str(wa));
    w = f64_data(wa, "w");
    require_finite(w, wa.size(), "w");
    for (py::ssize_t j = 0; j < wa.size(); ++j)
      if (w[j] < 0) throw py::value_error("w: expected weights >= 0");
  }
  const int threads = threads_arg(num_threads);
  auto out = new_array({B, k});
  double* op = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    ectfast::project_batch(S, mu, pinv, n2, k, lam, w, t, p0, eps, B, op, threads);
  }
  for (py::ssize_t j = 0; j < out.size(); ++j)
    if (!std::isfinite(op[j]))
      throw py::value_error("project: the regularised system is singular (no weight, prior or eps "
                            "determines some parameter)");
  return out;
}

py::array cpu_upsample(const py::handle& maps_h, int factor, int num_threads) {
  factor = factor_arg(factor);
  const Maps m = maps_arg(maps_h, factor);
  const int threads = threads_arg(num_threads);
  const int64_t h = m.arr.shape(2), w = m.arr.shape(3);
  py::array out = m.kind == 0 ? py::array(py::array_t<float>({m.B, m.n, m.H, m.W}))
                              : py::array(py::array_t<double>({m.B, m.n, m.H, m.W}));
  void* dst = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    if (m.kind == 0)
      ectfast::upsample_batch(static_cast<const float*>(m.arr.data()), m.B, m.n, h, w, factor, static_cast<float*>(dst), threads);
    else
      ectfast::upsample_batch(static_cast<const double*>(m.arr.data()), m.B, m.n, h, w, factor, static_cast<double*>(dst), threads);
  }
  return out;
}

}  // namespace

void bind_cpu(py::module_& m) {
  using namespace pybind11::literals;
  m.def("cpu_default_threads", []() { return ectfast::resolve_threads(0); },
        "Threads the cpu backend uses when num_threads is 0 (std::thread::hardware_concurrency).");
  m.def("cpu_argmax", &cpu_argmax, "maps"_a, "factor"_a = 1, "num_threads"_a = 0,
        "Estimation: (peaks (B, n, 2) float64 (x, y) of each map's first maximum in row-major "
        "order, number of maps holding NaN/inf), in one pass over maps (B, n, H, W) float32/64. "
        "factor > 1: the maps are upsampled on the fly (bilinear, as ectfast's UpsampleNet) and "
        "peaks are in upsampled pixels.");
  m.def("cpu_weights", &cpu_weights, "maps"_a, "shape"_a, "r"_a, "a"_a, "b"_a, "factor"_a = 1,
        "num_threads"_a = 0,
        "Eq. 15: confidence weights (B, n, 2) of the r-patches at shape (B, n, 2) (clamped).");
  m.def("cpu_mean_shift", &cpu_mean_shift, "maps"_a, "shape"_a, "r"_a, "a"_a, "b"_a, "rho"_a,
        "weighted"_a, "factor"_a = 1, "num_threads"_a = 0,
        "Eqs. 15 + 9: (w (B, n, 2), targets shape + v (B, n, 2)).");
  m.def("cpu_project", &cpu_project, "basis"_a, "mean"_a, "prior_inv"_a, "lam"_a, "w"_a,
        "target"_a, "x0"_a, "eps"_a, "num_threads"_a = 0,
        "Eqs. 14/8: p = (lam diag(prior_inv) + S^T W S + eps E)^-1 (S^T W (t - mean) + eps E x0) "
        "per face by Eigen LDLT. basis (2n, k), mean (2n), prior_inv (k,), w (B, 2n) or None, "
        "target (B, 2n), x0 (B, k), all float64 C-contiguous.");
  m.def("cpu_upsample", &cpu_upsample, "maps"_a, "factor"_a, "num_threads"_a = 0,
        "Bilinear x factor of maps (B, n, H, W), exactly as _reference.upsample.");
}
