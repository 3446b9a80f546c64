// The ops bound to Python directly, for eager calls (kernels/cpu_native.py): pybind11 hands the tensors straight to
// the C++ functions, about 1.7 us less per call than going through torch.ops, whose Python path matches the schema and
// boxes every argument (BENCHMARKS.md, "Call overhead"). A decode step of SmolLM2 makes 121 such calls. torch.compile
// keeps using the torch.ops registration, which has a fake implementation to trace with.
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs (as torch.ops does): the server's event loop keeps serving meanwhile.
  m.def("int4_mm", &TS_NAMESPACE::int4_mm, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("int8_mm", &TS_NAMESPACE::int8_mm, pybind11::call_guard<pybind11::gil_scoped_release>());
}
