// The CUDA backend's bindings. Without CUDA only the capability queries exist.
//
// With CUDA (ECTFAST_WITH_CUDA) the kernels of src/cuda are exposed through their C API
// (src/cuda/ectfast_cuda.h, no CUDA headers needed here). The extension never links libtorch:
// Python (ectfast/_cuda.py) hands over device arrays as descriptors
//     (data_ptr: int, shape: tuple, strides: tuple (elements), dtype: str, device: int)
// taken from torch tensors, CuPy arrays or any DLPack producer, plus the cudaStream_t as an int.
// Everything is validated here before a kernel may touch memory: dtype, shape, C-contiguity,
// alignment, that the pointer is device memory on the stated device, and that all arrays of a
// call share that device. CUDA errors raise RuntimeError with the CUDA error string.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

#ifdef ECTFAST_WITH_CUDA

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <cstdint>
#include <string>
#include <vector>

#include "ectfast_cuda.h"

namespace {

struct DevArray {
  std::uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  std::string dtype;
  int device = -1;
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

int itemsize(const std::string& dtype) {
  if (dtype == "float32" || dtype == "int32") return 4;
  if (dtype == "float16" || dtype == "bfloat16") return 2;
  if (dtype == "float64" || dtype == "int64") return 8;
  if (dtype == "uint8" || dtype == "bool") return 1;
  return 0;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

void check_cuda(int code, const char* what) {
  if (code != 0)
    throw std::runtime_error(std::string("ectfast cuda: ") + what + " failed: " +
                             ectfast_cuda_error_string(code) + " (CUDA error " + std::to_string(code) + ")");
}

// Parse and validate one descriptor. expected_shape entries < 0 match any size.
DevArray parse(const py::handle& obj, const char* name, const std::vector<std::string>& dtypes,
               const std::vector<int64_t>& expected_shape, int device) {
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 5)
    throw py::type_error(std::string(name) + ": expected a device array descriptor "
                         "(ptr, shape, strides, dtype, device)");
  auto t = py::reinterpret_borrow<py::tuple>(obj);
  DevArray a;
  try {
    a.ptr = t[0].cast<std::uintptr_t>();
    a.shape = t[1].cast<std::vector<int64_t>>();
    a.strides = t[2].cast<std::vector<int64_t>>();
    a.dtype = t[3].cast<std::string>();
    a.device = t[4].cast<int>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string(name) + ": malformed device array descriptor");
  }
  bool dtype_ok = false;
  for (const auto& d : dtypes) dtype_ok = dtype_ok || d == a.dtype;
  if (!dtype_ok) {
    std::string want;
    for (size_t i = 0; i < dtypes.size(); ++i) want += (i ? ", " : "") + dtypes[i];
    throw py::type_error(std::string(name) + ": expected dtype " + want + ", got " + a.dtype);
  }
  if (a.strides.size() != a.shape.size())
    throw py::value_error(std::string(name) + ": shape and strides differ in length");
  if (a.shape.size() != expected_shape.size())
    throw py::value_error(std::string(name) + ": expected " + std::to_string(expected_shape.size()) +
                          " dimensions, got shape " + shape_str(a.shape));
  for (size_t i = 0; i < a.shape.size(); ++i) {
    if (a.shape[i] <= 0)
      throw py::value_error(std::string(name) + ": empty or negative extent in shape " + shape_str(a.shape));
    if (expected_shape[i] >= 0 && a.shape[i] != expected_shape[i])
      throw py::value_error(std::string(name) + ": expected shape " + shape_str(expected_shape) +
                            " (-1 = any), got " + shape_str(a.shape));
  }
  // C-contiguous (extents of 1 may carry any stride)
  int64_t expect = 1;
  for (size_t i = a.shape.size(); i-- > 0;) {
    if (a.shape[i] != 1 && a.strides[i] != expect)
      throw py::value_error(std::string(name) + ": must be C-contiguous (call .contiguous()), got shape " +
                            shape_str(a.shape) + " with strides " + shape_str(a.strides));
    if (a.shape[i] > (int64_t(1) << 40) / expect)
      throw py::value_error(std::string(name) + ": too large");
    expect *= a.shape[i];
  }
  if (a.device != device)
    throw py::value_error(std::string(name) + ": is on cuda:" + std::to_string(a.device) +
                          " but the response maps are on cuda:" + std::to_string(device));
  if (a.ptr == 0) throw py::value_error(std::string(name) + ": null data pointer");
  if (a.ptr % itemsize(a.dtype) != 0)
    throw py::value_error(std::string(name) + ": data pointer not aligned to its element size");
  int where = -1, is_device = 0;
  const int rc = ectfast_cuda_pointer_device(reinterpret_cast<const void*>(a.ptr), &where, &is_device);
  if (rc != 0 || !is_device)
    throw py::value_error(std::string(name) + ": data pointer is not CUDA device memory" +
                          (rc ? std::string(" (") + ectfast_cuda_error_string(rc) + ")" : std::string()));
  if (where != device)
    throw py::value_error(std::string(name) + ": memory lives on cuda:" + std::to_string(where) +
                          ", expected cuda:" + std::to_string(device));
  return a;
}

const std::vector<std::string> kF64{"float64"};
const std::vector<std::string> kI32{"int32"};
const std::vector<std::string> kU8{"uint8", "bool"};
const std::vector<std::string> kMapTypes{"float32", "float16", "bfloat16", "float64"};

int dtype_code(const std::string& d) {
  if (d == "float32") return ECTFAST_F32;
  if (d == "float16") return ECTFAST_F16;
  if (d == "bfloat16") return ECTFAST_BF16;
  return ECTFAST_F64;
}

struct Maps {
  DevArray arr;
  ectfast_maps desc{};
  int64_t height = 0, width = 0;  // fitted
};

Maps parse_maps(const py::handle& obj, int factor, int device) {
  Maps m;
  m.arr = parse(obj, "response_maps", kMapTypes, {-1, -1, -1, -1}, device);
  if (factor < 1 || (factor > 1 && factor % 2) || factor > 16)
    throw py::value_error("upsample: the cuda backend takes 1 or an even integer up to 16, got " +
                          std::to_string(factor));
  m.desc.data = reinterpret_cast<const void*>(m.arr.ptr);
  m.desc.dtype = dtype_code(m.arr.dtype);
  m.desc.batch = m.arr.shape[0];
  m.desc.n = m.arr.shape[1];
  m.desc.src_h = m.arr.shape[2];
  m.desc.src_w = m.arr.shape[3];
  m.desc.factor = factor;
  m.height = m.desc.src_h * factor;
  m.width = m.desc.src_w * factor;
  if (m.height < 3 || m.width < 3)
    throw py::value_error("response_maps: maps must be at least 3x3 (as fitted), got " +
                          std::to_string(m.height) + "x" + std::to_string(m.width));
  if (m.height > (int64_t(1) << 30) || m.width > (int64_t(1) << 30))
    throw py::value_error("response_maps: maps too large (more than 2^30 pixels a side as fitted)");
  if (m.desc.batch * m.desc.n >= (int64_t(1) << 31) - 1)
    throw py::value_error("response_maps: too many maps (B * n must be < 2^31)");
  return m;
}

void* as_stream(std::uintptr_t s) { return reinterpret_cast<void*>(s); }
template <typename T>
T* ptr(const DevArray& a) { return reinterpret_cast<T*>(a.ptr); }

int device_of(const py::handle& maps) {
  if (!py::isinstance<py::tuple>(maps) || py::len(maps) != 5)
    throw py::type_error("response_maps: expected a device array descriptor (ptr, shape, strides, dtype, device)");
  int dev = -1;
  try {
    dev = py::reinterpret_borrow<py::tuple>(maps)[4].cast<int>();
  } catch (const py::cast_error&) {
    throw py::type_error("response_maps: malformed device array descriptor");
  }
  const int count = ectfast_cuda_device_count();
  if (dev < 0 || dev >= count)
    throw py::value_error("response_maps: cuda:" + std::to_string(dev) + " does not exist (" +
                          std::to_string(count) + " CUDA devices usable)");
  return dev;
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.attr("cuda_built") = true;
  m.def("cuda_device_count", []() { return ectfast_cuda_device_count(); },
        "CUDA devices usable now (0 without a driver or device; never raises)");

  m.def("cuda_device_info", [](int device) {
    if (device < 0 || device >= ectfast_cuda_device_count())
      throw py::value_error("device: cuda:" + std::to_string(device) + " does not exist");
    char name[256];
    int major = 0, minor = 0, bus = 0, clock = 0, sms = 0;
    check_cuda(ectfast_cuda_device_info(device, name, sizeof(name), &major, &minor, &bus, &clock, &sms),
               "cudaGetDeviceProperties");
    py::dict d;
    d["name"] = std::string(name);
    d["major"] = major;
    d["minor"] = minor;
    d["bus_width_bits"] = bus;
    d["memory_clock_khz"] = clock;
    d["sm_count"] = sms;
    return d;
  }, py::arg("device"), "Name, compute capability, memory bus width/clock and SM count of a device");

  m.def("cuda_argmax", [](py::object maps, int factor, py::object peaks, py::object flags,
                          std::uintptr_t stream) {
    const int dev = device_of(maps);
    Maps mp = parse_maps(maps, factor, dev);
    DevArray pk = parse(peaks, "peaks", kF64, {mp.desc.batch, mp.desc.n, 2}, dev);
    DevArray fl = parse(flags, "flags", kI32, {ECTFAST_N_FLAGS}, dev);
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = ectfast_cuda_argmax(dev, &mp.desc, ptr<double>(pk), ptr<int>(fl), as_stream(stream));
    }
    check_cuda(rc, "argmax kernel launch");
  }, py::arg("maps"), py::arg("factor"), py::arg("peaks"), py::arg("flags"), py::arg("stream"),
     "Peaks (B, n, 2) float64 of the maps (as fitted); flags[0] = 1 when a map is not finite");

  m.def("cuda_patch", [](py::object maps, int factor, py::object shape, int r, double a, double b,
                         double rho, int mode, py::object w, py::object target, std::uintptr_t stream) {
    const int dev = device_of(maps);
    Maps mp = parse_maps(maps, factor, dev);
    if (r < 2 || r > 4096) throw py::value_error("patch size: expected 2 <= r <= 4096, got " + std::to_string(r));
    if (mode < 0 || mode > 2) throw py::value_error("mode: expected 0, 1 or 2");
    DevArray s = parse(shape, "shape", kF64, {mp.desc.batch, mp.desc.n, 2}, dev);
    DevArray wa = parse(w, "w", kF64, {mp.desc.batch, mp.desc.n, 2}, dev);
    double* tp = nullptr;
    if (mode != ECTFAST_PATCH_CONFIDENCE) {
      DevArray ta = parse(target, "target", kF64, {mp.desc.batch, mp.desc.n, 2}, dev);
      tp = ptr<double>(ta);
    }
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = ectfast_cuda_patch(dev, &mp.desc, ptr<double>(s), r, a, b, rho, mode, ptr<double>(wa), tp,
                              as_stream(stream));
    }
    check_cuda(rc, "patch kernel launch");
  }, py::arg("maps"), py::arg("factor"), py::arg("shape"), py::arg("r"), py::arg("a"), py::arg("b"),
     py::arg("rho"), py::arg("mode"), py::arg("w"), py::arg("target"), py::arg("stream"),
     "Confidence (mode 0) or weighted (1) / unweighted (2) mean shift on r x r patches");

  m.def("cuda_project", [](py::object basis, py::object mean, py::object prior_inv, py::object w,
                           py::object target, py::object x0, double lam, double eps, py::object p,
                           py::object flags, py::object scratch_A, py::object scratch_rhs,
                           std::uintptr_t stream, bool host_solve) {
    const int dev = device_of(basis);
    DevArray S = parse(basis, "basis", kF64, {-1, -1}, dev);
    const int64_t n2 = S.shape[0], k = S.shape[1];
    if (k < 4 || n2 < k || k > 4096) throw py::value_error("basis: expected (2n, 4 + m) with 2n >= 4 + m");
    if (n2 % 2) throw py::value_error("basis: expected an even number of rows (2n)");
    DevArray mu = parse(mean, "mean", kF64, {n2}, dev);
    DevArray pri = parse(prior_inv, "prior_inv", kF64, {k}, dev);
    DevArray t = parse(target, "target", kF64, {-1, n2 / 2, 2}, dev);
    const int64_t B = t.shape[0];
    const double* wp = nullptr;
    if (!w.is_none()) wp = ptr<double>(parse(w, "w", kF64, {B, n2 / 2, 2}, dev));
    DevArray xa = parse(x0, "x0", kF64, {B, k}, dev);
    DevArray pa = parse(p, "p", kF64, {B, k}, dev);
    DevArray fl = parse(flags, "flags", kI32, {ECTFAST_N_FLAGS}, dev);
    if (!host_solve) {
      int rc;
      {
        py::gil_scoped_release nogil;
        rc = ectfast_cuda_project(dev, ptr<double>(S), ptr<double>(mu), ptr<double>(pri), (int)n2, (int)k, B, wp,
                                  ptr<double>(t), ptr<double>(xa), lam, eps, ptr<double>(pa), nullptr,
                                  nullptr, ptr<int>(fl), as_stream(stream));
      }
      check_cuda(rc, "projection kernel launch (device Cholesky)");
      return;
    }
    // host solve: normal equations on the device, Eigen LLT on the host
    DevArray Aa = parse(scratch_A, "scratch_A", kF64, {B, k, k}, dev);
    DevArray ra = parse(scratch_rhs, "scratch_rhs", kF64, {B, k}, dev);
    std::vector<double> hA((size_t)(B * k * k)), hr((size_t)(B * k)), hp((size_t)(B * k));
    bool spd = true;
    int rc = 0;
    const char* what = "";
    {
      py::gil_scoped_release nogil;
      rc = ectfast_cuda_project(dev, ptr<double>(S), ptr<double>(mu), ptr<double>(pri), (int)n2, (int)k, B, wp,
                                ptr<double>(t), ptr<double>(xa), lam, eps, nullptr, ptr<double>(Aa),
                                ptr<double>(ra), ptr<int>(fl), as_stream(stream));
      what = "normal-equation kernel launch";
      if (rc == 0) {
        rc = ectfast_cuda_memcpy_d2h(dev, hA.data(), ptr<double>(Aa), hA.size() * sizeof(double), as_stream(stream));
        what = "device-to-host copy";
      }
      if (rc == 0) {
        rc = ectfast_cuda_memcpy_d2h(dev, hr.data(), ptr<double>(ra), hr.size() * sizeof(double), as_stream(stream));
      }
      if (rc == 0) {
        using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        for (int64_t f = 0; f < B && spd; ++f) {
          Eigen::Map<const Mat> Af(hA.data() + f * k * k, k, k);
          Eigen::Map<const Eigen::VectorXd> rf(hr.data() + f * k, k);
          Eigen::LLT<Mat> llt(Af);
          if (llt.info() != Eigen::Success) {
            spd = false;
            break;
          }
          Eigen::Map<Eigen::VectorXd>(hp.data() + f * k, k) = llt.solve(rf);
        }
        if (spd) {
          rc = ectfast_cuda_memcpy_h2d(dev, ptr<double>(pa), hp.data(), hp.size() * sizeof(double), as_stream(stream));
          what = "host-to-device copy";
        }
      }
    }
    check_cuda(rc, what);
    if (!spd)
      throw py::value_error("the (4+m)x(4+m) system is not positive definite (gamma = 0 with zero "
                            "confidence weights?)");
  }, py::arg("basis"), py::arg("mean"), py::arg("prior_inv"), py::arg("w"), py::arg("target"),
     py::arg("x0"), py::arg("lam"), py::arg("eps"), py::arg("p"), py::arg("flags"),
     py::arg("scratch_A"), py::arg("scratch_rhs"), py::arg("stream"), py::arg("host_solve") = false,
     "Eqs. 14/8: p = (lam Lambda^-1 + S^T W S + eps E)^-1 (S^T W (t - mean) + eps E x0) per face");

  m.def("cuda_shape", [](py::object basis, py::object mean, py::object p, py::object s,
                         std::uintptr_t stream) {
    const int dev = device_of(basis);
    DevArray S = parse(basis, "basis", kF64, {-1, -1}, dev);
    const int64_t n2 = S.shape[0], k = S.shape[1];
    if (n2 % 2) throw py::value_error("basis: expected an even number of rows (2n)");
    DevArray mu = parse(mean, "mean", kF64, {n2}, dev);
    DevArray pa = parse(p, "params", kF64, {-1, k}, dev);
    const int64_t B = pa.shape[0];
    DevArray sa = parse(s, "shape", kF64, {B, n2 / 2, 2}, dev);
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = ectfast_cuda_shape(dev, ptr<double>(S), ptr<double>(mu), (int)n2, (int)k, B, ptr<double>(pa),
                              ptr<double>(sa), as_stream(stream));
    }
    check_cuda(rc, "shape kernel launch");
  }, py::arg("basis"), py::arg("mean"), py::arg("p"), py::arg("s"), py::arg("stream"));

  m.def("cuda_clamp", [](py::object shape, py::object out, int64_t height, int64_t width,
                         std::uintptr_t stream) {
    const int dev = device_of(shape);
    DevArray s = parse(shape, "shape", kF64, {-1, -1, 2}, dev);
    DevArray o = parse(out, "out", kF64, {s.shape[0], s.shape[1], 2}, dev);
    if (height < 3 || width < 3) throw py::value_error("clamp: height and width must be >= 3");
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = ectfast_cuda_clamp(dev, ptr<double>(s), ptr<double>(o), s.shape[0] * s.shape[1], height, width,
                              as_stream(stream));
    }
    check_cuda(rc, "clamp kernel launch");
  }, py::arg("shape"), py::arg("out"), py::arg("height"), py::arg("width"), py::arg("stream"));

  m.def("cuda_freeze", [](py::object p_old, py::object p_new, py::object active, double tol,
                          py::object p_out, py::object active_out, std::uintptr_t stream) {
    const int dev = device_of(p_old);
    DevArray po = parse(p_old, "p_old", kF64, {-1, -1}, dev);
    const int64_t B = po.shape[0], k = po.shape[1];
    DevArray pn = parse(p_new, "p_new", kF64, {B, k}, dev);
    DevArray ac = parse(active, "active", kU8, {B}, dev);
    DevArray pout = parse(p_out, "p_out", kF64, {B, k}, dev);
    DevArray aout = parse(active_out, "active_out", kU8, {B}, dev);
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = ectfast_cuda_freeze(dev, ptr<double>(po), ptr<double>(pn), ptr<uint8_t>(ac), (int)k, B, tol,
                               ptr<double>(pout), ptr<uint8_t>(aout), as_stream(stream));
    }
    check_cuda(rc, "freeze kernel launch");
  }, py::arg("p_old"), py::arg("p_new"), py::arg("active"), py::arg("tol"), py::arg("p_out"),
     py::arg("active_out"), py::arg("stream"));

  m.def("cuda_fit", [](py::object maps, int factor, py::object basis, py::object mean, py::object prior_inv,
                       int method, std::vector<int> sizes, int r0, double a, double b, double gamma, double rho,
                       double rho_tilde, double tol, double eps, py::object x0, py::object peaks,
                       py::object initial, py::object landmarks, py::object params, py::object w_final,
                       py::object flags, std::uintptr_t stream) {
    const int dev = device_of(maps);
    Maps mp = parse_maps(maps, factor, dev);
    const int64_t B = mp.desc.batch, n = mp.desc.n;
    DevArray S = parse(basis, "basis", kF64, {2 * n, -1}, dev);
    const int64_t k = S.shape[1];
    if (k < 4 || k > 2 * n) throw py::value_error("basis: expected (2n, 4 + m) with 2n >= 4 + m");
    if (method < ECTFAST_CRM || method > ECTFAST_ECT) throw py::value_error("method: expected 0..4");
    if (r0 < 2 || r0 > 4096) throw py::value_error("correction patch size: expected 2 <= r <= 4096");
    for (int r : sizes)
      if (r < 2 || r > 4096) throw py::value_error("patch size: expected 2 <= r <= 4096, got " + std::to_string(r));
    DevArray mu = parse(mean, "mean", kF64, {2 * n}, dev);
    DevArray pri = parse(prior_inv, "prior_inv", kF64, {k}, dev);
    DevArray xa = parse(x0, "x0", kF64, {B, k}, dev);
    DevArray pk = parse(peaks, "peaks", kF64, {B, n, 2}, dev);
    DevArray in = parse(initial, "initial", kF64, {B, n, 2}, dev);
    DevArray lm = parse(landmarks, "landmarks", kF64, {B, n, 2}, dev);
    double* pp = nullptr;
    if (!params.is_none()) pp = ptr<double>(parse(params, "params", kF64, {B, k}, dev));
    if (!pp && method != ECTFAST_CRM) throw py::value_error("params: needed for every method but crm");
    DevArray wf = parse(w_final, "w_final", kF64, {B, n, 2}, dev);
    DevArray fl = parse(flags, "flags", kI32, {ECTFAST_N_FLAGS}, dev);
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = ectfast_cuda_fit(dev, &mp.desc, ptr<double>(S), ptr<double>(mu), ptr<double>(pri), (int)(2 * n), (int)k,
                            method, sizes.data(), (int)sizes.size(), r0, a, b, gamma, rho, rho_tilde, tol, eps,
                            ptr<double>(xa), ptr<double>(pk), ptr<double>(in), ptr<double>(lm), pp,
                            ptr<double>(wf), ptr<int>(fl), as_stream(stream));
    }
    check_cuda(rc, "fused fit");
  }, py::arg("maps"), py::arg("factor"), py::arg("basis"), py::arg("mean"), py::arg("prior_inv"),
     py::arg("method"), py::arg("sizes"), py::arg("r0"), py::arg("a"), py::arg("b"), py::arg("gamma"),
     py::arg("rho"), py::arg("rho_tilde"), py::arg("tol"), py::arg("eps"), py::arg("x0"), py::arg("peaks"),
     py::arg("initial"), py::arg("landmarks"), py::arg("params"), py::arg("w_final"), py::arg("flags"),
     py::arg("stream"), "Algorithm 1 in one call (same kernels and order as the per-op path)");
}

#else  // built without CUDA

void bind_cuda(py::module_& m) {
  m.attr("cuda_built") = false;
  m.def("cuda_device_count", []() { return 0; }, "CUDA devices usable now (always 0: built without CUDA)");
}

#endif
