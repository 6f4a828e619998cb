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
      .def_readwrite("act_i8", &QW::act_i8)
      .def_readonly("fmt", &QW::fmt).def_readonly("N", &QW::N).def_readonly("K", &QW::K);
  pybind11::class_<flashport::ExpertSet>(m, "ExpertSet")
      .def(pybind11::init([](std::vector<QW> w1, std::vector<QW> w3, std::vector<QW> w2) {
        TORCH_CHECK(w1.size() == w3.size() && w1.size() == w2.size(), "ExpertSet: w1, w3, w2 of every expert");
        return flashport::ExpertSet{std::move(w1), std::move(w3), std::move(w2)};
      }))
      .def("__len__", [](const flashport::ExpertSet& s) { return s.w1.size(); });
  m.def("dequantize", &flashport::dequantize);
  m.def("linear", &flashport::linear, pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("bf16") = false);
  m.def("grouped_linear", &flashport::grouped_linear);
  m.def("moe", &flashport::moe, pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("idx"), pybind11::arg("ids"),
        pybind11::arg("w1"), pybind11::arg("w3"), pybind11::arg("w2"), pybind11::arg("limit"), pybind11::arg("bf16") = false);
  m.def("hc_head", &flashport::hc_head);
  m.def("hc_pre_norm", &flashport::hc_pre_norm);
  m.def("hc_post_pre_norm", &flashport::hc_post_pre_norm);
  m.def("attn_project", &flashport::attn_project);
  m.def("attn_output", &flashport::attn_output);
  m.def("gated_moe", &flashport::gated_moe);
  m.def("compress_project", &flashport::compress_project);
  m.def("weight_parts", &flashport::weight_parts);
  m.def("linear_parts", &flashport::linear_parts);
  m.def("rms_norm", &flashport::rms_norm);
  m.def("rope", &flashport::rope);
  m.def("hc_pre", &flashport::hc_pre);
  m.def("hc_post", &flashport::hc_post);
  m.def("attention", &flashport::attention, pybind11::arg("q"), pybind11::arg("keys"), pybind11::arg("bias"),
        pybind11::arg("sink"), pybind11::arg("scale"), pybind11::arg("split_heads") = false);
  m.def("flash_attention", &flashport::flash_attention);
  m.def("decode_attention", &flashport::decode_attention, pybind11::arg("q"), pybind11::arg("keys"),
        pybind11::arg("sink"), pybind11::arg("scale"), pybind11::arg("split") = false);
  m.def("indexer_scores", &flashport::indexer_scores);
  m.def("indexer_fp4_scores", &flashport::indexer_fp4_scores);
  m.def("indexer_fp4_topk", &flashport::indexer_fp4_topk);
  m.def("fp4_rotate_quantize", &flashport::fp4_rotate_quantize);
}
