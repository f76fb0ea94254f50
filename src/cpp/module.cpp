// ectfast._core: the compiled backends of ectfast.fit (pybind11 bindings).
// Each backend registers its functions from its own file:
//   bind_cpu  (src/cpp/cpu_bindings.cpp)  — the C++/Eigen backend
//   bind_cuda (src/cpp/cuda_bindings.cpp) — the CUDA backend (a stub when built without CUDA)
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_cpu(py::module_& m);
void bind_cuda(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "ectfast compiled core: C++/Eigen CPU backend (and CUDA kernels when built)";
  bind_cpu(m);
  bind_cuda(m);
}
