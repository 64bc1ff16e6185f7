// The one TORCH_LIBRARY block of attenscribble_ops: every operator schema, no math.
// Device implementations register themselves (csrc/cpu/*.cpp, csrc/cuda/*.cu) with
// TORCH_LIBRARY_IMPL; fake kernels and autograd are registered from Python
// (attenscribble_ops/native/*.py), so torch.library.opcheck and torch.compile see every op.
#include <Python.h>
#include <torch/library.h>

#ifndef AT_PARALLEL_OPENMP
#define ATTENSCRIBBLE_OPENMP 0
#else
#define ATTENSCRIBBLE_OPENMP 1
#endif

#ifdef WITH_CUDA
#define ATTENSCRIBBLE_CUDA 1
#else
#define ATTENSCRIBBLE_CUDA 0
#endif

extern "C" {
// A bare Python module: importing it runs the static registrations below and in every other
// translation unit. It carries only its build configuration; no pybind11 is needed.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "attenscribble_ops compiled operators", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "WITH_CUDA", ATTENSCRIBBLE_CUDA) < 0 ||
      PyModule_AddIntConstant(m, "WITH_OPENMP", ATTENSCRIBBLE_OPENMP) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

TORCH_LIBRARY(attenscribble_ops, m) {
  // Shared helper: a mask at prediction resolution with NaN -> 0 and values < 1 -> 0 (the Gated
  // CRF convention for interpolated mask edges), converted to `dtype`.
  m.def("clean_mask(Tensor mask, ScalarType dtype) -> Tensor");
  // Masked CRF loss (attenscribble_ops/native/masked_crf.py): the un-normalised loss sum, 0-d, in
  // the accumulate dtype (float; double for double probs), and, with with_grad, its gradient
  // w.r.t. probs from the same pass (accumulate dtype, shape of probs; shape (0,) without).
  // image/masks/compat are in the accumulate dtype at the resolution of probs; table is the
  // row-major (K, 2 + F) descriptor table [weight, 1/sigma_xy, 1/sigma_image_f...] (0 = unused);
  // radius and spacing have one value per spatial axis.
  m.def("masked_crf_forward(Tensor probs, Tensor? image, Tensor? mask_dst, Tensor? mask_src, Tensor? compat, "
        "float[] table, int[] radius, float[] spacing, bool zero_padding, bool with_grad) -> (Tensor, Tensor)");

  // Attention of the spatial self-attention block (B, heads, n, D): out = softmax(q k^T / sqrt(D)) v
  // with the row log-sum-exps of the scaled logits (lse_attn, for the backward) and of the
  // similarity logits logit_scale * q k^T (lse_sim). The backward takes the gradients of all three
  // outputs (the LSE gradients optional) and returns (dq, dk, dv). The "lse" pair is the same
  // sweep without values. LSEs are fp32 (fp64 for fp64 inputs).
  m.def("spatial_attention_forward(Tensor q, Tensor k, Tensor v, float logit_scale) -> (Tensor, Tensor, Tensor)");
  m.def("spatial_attention_backward(Tensor dout, Tensor? dlse_attn, Tensor? dlse_sim, Tensor q, Tensor k, "
        "Tensor v, Tensor out, Tensor lse_attn, Tensor lse_sim, float logit_scale) -> (Tensor, Tensor, Tensor)");
  // The backward adding dq, dk into given buffers (the loss's window terms): returns dv.
  m.def("spatial_attention_backward_accumulate(Tensor dout, Tensor? dlse_attn, Tensor? dlse_sim, Tensor q, "
        "Tensor k, Tensor v, Tensor out, Tensor lse_attn, Tensor lse_sim, float logit_scale, Tensor(a!) dq, "
        "Tensor(b!) dk) -> Tensor");
  m.def("spatial_attention_lse(Tensor q, Tensor k, float logit_scale) -> Tensor");
  m.def("spatial_attention_lse_backward(Tensor dlse, Tensor q, Tensor k, Tensor lse, float logit_scale) "
        "-> (Tensor, Tensor)");

  // Local-window part of the attentive similarity loss: per-token sums (B, n) over each token's
  // (2r+1)^2 window, from q, k (B, heads, n, D), the similarity LSEs (B, heads, n), probs on the
  // grid (B, C, h, w), the head mixing (heads,) + (), an optional per-sample gate (B,). The backward
  // takes the per-token upstream gradient (B, n) and returns (dq, dk, dlse, dprobs, dhead_weight,
  // dhead_bias); dq, dk hold the window terms with lse fixed, dlse completes them through the
  // attention backward.
  m.def("attentive_similarity_forward(Tensor q, Tensor k, Tensor lse, Tensor probs, Tensor head_weight, "
        "Tensor head_bias, Tensor? sample_weight, int radius, float sigma, float logit_scale) -> Tensor");
  m.def("attentive_similarity_backward(Tensor grad_rows, Tensor q, Tensor k, Tensor lse, Tensor probs, "
        "Tensor head_weight, Tensor head_bias, Tensor? sample_weight, int radius, float sigma, float logit_scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same loss computing its own LSE (the attention's similarity sweep) when none is handed
  // over: returns (rows, lse); the backward runs the window kernel and then the dense LSE sweep
  // into the same gradient buffers, returning (dq, dk, dprobs, dhead_weight, dhead_bias).
  m.def("attentive_similarity_fused_forward(Tensor q, Tensor k, Tensor probs, Tensor head_weight, "
        "Tensor head_bias, Tensor? sample_weight, int radius, float sigma, float logit_scale) -> (Tensor, Tensor)");
  m.def("attentive_similarity_fused_backward(Tensor grad_rows, Tensor? grad_lse, Tensor q, Tensor k, Tensor lse, "
        "Tensor probs, Tensor head_weight, Tensor head_bias, Tensor? sample_weight, int radius, float sigma, "
        "float logit_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
