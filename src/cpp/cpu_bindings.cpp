// The C++/Eigen CPU backend's bindings (to be filled in by the CPU backend work).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_cpu(py::module_& m) {}
