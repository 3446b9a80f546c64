// The ops bound to Python directly, for eager calls (tinyserve_kernels/cpu_native.py), and the fused decode step (cpu_decode.cpp):
// pybind11 hands the tensors straight to the C++ functions, about 1.7 us less per call than going through torch.ops,
// whose Python path matches the schema and boxes every argument (BENCHMARKS.md, "Call overhead"). torch.compile keeps
// using the torch.ops registrations, which have fake implementations to trace with.
#include <ATen/record_function.h>
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

#define TS_STR2(x) #x
#define TS_STR(x) TS_STR2(x)

namespace {

// What torch.ops would have recorded: torch.profiler shows each call under the op's name (free when not profiling).
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N, int64_t G) {
  RECORD_FUNCTION(TS_STR(TS_NAMESPACE) "::int4_mm", std::vector<c10::IValue>());
  return TS_NAMESPACE::int4_mm(x, packed, bias, N, G);
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                   int64_t N) {
  RECORD_FUNCTION(TS_STR(TS_NAMESPACE) "::int8_mm", std::vector<c10::IValue>());
  return TS_NAMESPACE::int8_mm(x, packed, scales, bias, N);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths, double scale) {
  RECORD_FUNCTION(TS_STR(TS_NAMESPACE) "::decode_attention", std::vector<c10::IValue>());
  return TS_NAMESPACE::decode_attention(q, k, v, lengths, scale);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs (as torch.ops does): the server's event loop keeps serving meanwhile.
  m.def("int4_mm", &int4_mm, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("int8_mm", &int8_mm, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("decode_attention", &decode_attention, pybind11::call_guard<pybind11::gil_scoped_release>());
  using TS_NAMESPACE::Decoder;
  using Lists = std::vector<std::vector<std::optional<at::Tensor>>>;
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<at::Tensor, std::vector<std::vector<at::Tensor>>, Lists, Lists, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, int64_t, int64_t, int64_t, int64_t, int64_t, double>())
      .def("decode", [](const Decoder& d, const at::Tensor& tokens, const at::Tensor& slots, const at::Tensor& positions) {
             RECORD_FUNCTION(TS_STR(TS_NAMESPACE) "::decoder_decode", std::vector<c10::IValue>());
             return d.decode(tokens, slots, positions);
           },
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("prefill", [](const Decoder& d, const at::Tensor& tokens, int64_t slot, int64_t start) {
             RECORD_FUNCTION(TS_STR(TS_NAMESPACE) "::decoder_prefill", std::vector<c10::IValue>());
             return d.prefill(tokens, slot, start);
           },
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
