// The Python module: flashport.backends.cpu_quant loads it (ext()) and wraps every function with a torch fallback.
#include <torch/python.h>  // pybind11 with the Tensor casters (torch/extension.h minus torch/all.h)

#include "common.h"

using flashport::QW;
using at::Tensor;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<QW>(m, "QW")
      .def(pybind11::init<>())
      .def(pybind11::init([](int64_t fmt, int64_t N, int64_t K, int64_t group, Tensor w, c10::optional<Tensor> scale,
                             c10::optional<Tensor> zp) {
        QW q{fmt, N, K, group, w, scale.value_or(Tensor()), zp.value_or(Tensor())};
        return q;
      }))
      .def_readonly("fmt", &QW::fmt).def_readonly("N", &QW::N).def_readonly("K", &QW::K);
  m.def("dequantize", &flashport::dequantize);
  m.def("linear", &flashport::linear);
  m.def("grouped_linear", &flashport::grouped_linear);
  m.def("moe", &flashport::moe);
  m.def("rms_norm", &flashport::rms_norm);
  m.def("rope", &flashport::rope);
  m.def("hc_pre", &flashport::hc_pre);
  m.def("hc_post", &flashport::hc_post);
  m.def("attention", &flashport::attention);
  m.def("flash_attention", &flashport::flash_attention);
  m.def("indexer_fp4_scores", &flashport::indexer_fp4_scores);
  m.def("indexer_fp4_topk", &flashport::indexer_fp4_topk);
  m.def("fp4_rotate_quantize", &flashport::fp4_rotate_quantize);
}
