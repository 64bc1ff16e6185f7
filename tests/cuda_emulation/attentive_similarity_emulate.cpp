// Host emulation of the CUDA attentive similarity window kernels: the row functions of
// csrc/attentive_similarity.h as csrc/cuda/attentive_similarity.cu calls them, with q, k (and dq,
// dk) dim-major, (B, heads, D, n), and the backward one head at a time, for every token in turn
// (the kernels' grid-stride loop, one token per thread; no thread shares anything). Built by
// tests/test_attentive_similarity_ops.py with the GPU's lane and run counts,
//   c++ -std=c++20 -O1 -shared -fPIC -DASL_DOT_LANES=4 -DASL_CHUNK=4 -I csrc
// and called through ctypes in float64 (the device code runs the same templates in float32). The
// test transposes q, k in Python, as csrc/cuda/attentive_similarity.cu does in ATen.
#include <cstdint>
#include <vector>

#include "attentive_similarity.h"

namespace w = attenscribble_ops::window;

namespace {

// ints: batch, heads, n, dim, classes, h, w, ry, rx; reals: logit_scale, -1 / (2 sigma^2);
// ptrs: q, k (dim-major), lse, probs (token-major), head_weight, head_bias, sample_weight or null.
w::Args<double> args(const int64_t* ints, const double* reals, void* const* ptrs) {
  w::Args<double> a;
  a.q = static_cast<const double*>(ptrs[0]);
  a.k = static_cast<const double*>(ptrs[1]);
  a.lse = static_cast<const double*>(ptrs[2]);
  a.probs = static_cast<const double*>(ptrs[3]);
  a.head_weight = static_cast<const double*>(ptrs[4]);
  a.head_bias = static_cast<const double*>(ptrs[5]);
  a.sample_weight = static_cast<const double*>(ptrs[6]);
  a.scale = reals[0];
  a.neg_half_inv_sigma2 = reals[1];
  a.heads = ints[1], a.n = ints[2], a.dim = ints[3], a.classes = ints[4], a.h = ints[5], a.w = ints[6];
  a.ry = ints[7], a.rx = ints[8];
  return a;
}

}  // namespace

// rows (B, n): the forward kernel's output.
extern "C" int asl_emulate_forward(const int64_t* ints, const double* reals, void* const* ptrs, double* rows) {
  const w::Args<double> a = args(ints, reals, ptrs);
  const int64_t total = ints[0] * a.n;
  for (int64_t i = 0; i < total; ++i) rows[i] = w::row_loss<true>(a, i / a.n, i % a.n);
  return 0;
}

// grads: grad_rows (B, n) in; dq, dk (dim-major), dlse (B, heads, n), dprobs (B, n, C) or null,
// dalpha (B, heads, n), dbeta (B, n) out.
extern "C" int asl_emulate_backward(const int64_t* ints, const double* reals, void* const* ptrs,
                                    void* const* grads) {
  const w::Args<double> a = args(ints, reals, ptrs);
  w::Grads<double> g;
  g.grad_rows = static_cast<const double*>(grads[0]);
  g.dq = static_cast<double*>(grads[1]);
  g.dk = static_cast<double*>(grads[2]);
  g.dlse = static_cast<double*>(grads[3]);
  g.dprobs = static_cast<double*>(grads[4]);
  g.dalpha = static_cast<double*>(grads[5]);
  g.dbeta = static_cast<double*>(grads[6]);
  std::vector<double> scratch(w::backward_scratch_size(1, a.dim));  // one head at a time, as on the GPU
  const int64_t total = ints[0] * a.n;
  for (int64_t i = 0; i < total; ++i) w::row_backward<true>(a, g, i / a.n, i % a.n, int64_t(1), scratch.data());
  return 0;
}
