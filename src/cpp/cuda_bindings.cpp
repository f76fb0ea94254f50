// The CUDA backend's bindings. Without CUDA only the capability queries exist.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_cuda(py::module_& m) {
#ifdef ECTFAST_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
  m.def("cuda_device_count", []() { return 0; }, "CUDA devices usable now (always 0: built without CUDA)");
#endif
}
