// attentive_similarity on the CPU: the local-window part of the attentive similarity loss.
// Formulas, gradients and layout: csrc/attentive_similarity.h (shared with the CUDA kernel).
// Parallel decomposition: at::parallel_for over the B * n tokens; each token gathers its own
// (2r+1)^2 window and writes only its own output rows, so the result does not depend on the
// thread count. Per-token partial sums of dL/dalpha and dL/dbeta are reduced afterwards by a
// fixed-order sum. Inputs (csrc/attentive_similarity_inputs.h) are converted once to the
// accumulation type so the inner loops never convert: O(B heads n D) extra memory, never O(n^2).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attentive_similarity.h"
#include "attentive_similarity_inputs.h"
#include "cpu/rowwise.h"

namespace attenscribble_ops {
namespace {

// Heads whose dq/dk accumulators one pass keeps (all of them up to this many: the window dot
// products of every head are computed once per pair and group).
constexpr int64_t kHeadGroup = 8;

// Token ranges. The fp32 versions are cloned per instruction set (see cpu/rowwise.h) with the
// shared window math inlined into each clone, so its dot products and updates are vectorised.
template <typename acc_t>
ASL_INLINE void forward_range_impl(const window::Args<acc_t>& a, acc_t* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = window::row_loss(a, i / a.n, i % a.n);
}

template <typename acc_t>
ASL_INLINE void backward_range_impl(const window::Args<acc_t>& a, const window::Grads<acc_t>& g, int64_t begin,
                                    int64_t end) {
  const int64_t group = std::min<int64_t>(a.heads, kHeadGroup);
  std::vector<acc_t> scratch(window::backward_scratch_size(group, a.dim));
  for (int64_t i = begin; i < end; ++i) window::row_backward(a, g, i / a.n, i % a.n, group, scratch.data());
}

ASL_CPU_CLONES static void forward_range(const window::Args<float>& a, float* out, int64_t begin, int64_t end) {
  forward_range_impl(a, out, begin, end);
}
static void forward_range(const window::Args<double>& a, double* out, int64_t begin, int64_t end) {
  forward_range_impl(a, out, begin, end);
}
ASL_CPU_CLONES static void backward_range(const window::Args<float>& a, const window::Grads<float>& g, int64_t begin,
                                          int64_t end) {
  backward_range_impl(a, g, begin, end);
}
static void backward_range(const window::Args<double>& a, const window::Grads<double>& g, int64_t begin, int64_t end) {
  backward_range_impl(a, g, begin, end);
}

// Grain: a window costs ~heads * (2r+1)^2 * D multiply-adds; a few hundred tokens per task.
constexpr int64_t kGrain = 256;

struct CpuWindow {
  using Sweeps = CpuSweeps;

  static at::Tensor forward(const Prepared& p, int64_t radius, double sigma, double logit_scale) {
    at::Tensor rows = at::empty({p.batch, p.n}, p.q.options());
    AT_DISPATCH_FLOATING_TYPES(p.acc, "attentive_similarity_forward_cpu", [&] {
      const window::Args<scalar_t> a = make_args<scalar_t>(p, radius, sigma, logit_scale);
      scalar_t* out = rows.data_ptr<scalar_t>();
      at::parallel_for(0, p.batch * p.n, kGrain,
                       [&](int64_t begin, int64_t end) { forward_range(a, out, begin, end); });
    });
    return rows;
  }

  static WindowGrads backward(const Prepared& p, const at::Tensor& gamma, int64_t radius, double sigma,
                              double logit_scale) {
    WindowGrads r{at::empty_like(p.q), at::empty_like(p.k), at::empty_like(p.lse),
                  at::empty_like(p.probs), at::empty_like(p.lse), at::empty({p.batch, p.n}, p.q.options())};
    AT_DISPATCH_FLOATING_TYPES(p.acc, "attentive_similarity_backward_cpu", [&] {
      const window::Args<scalar_t> a = make_args<scalar_t>(p, radius, sigma, logit_scale);
      window::Grads<scalar_t> g;
      g.dq = r.dq.data_ptr<scalar_t>();
      g.dk = r.dk.data_ptr<scalar_t>();
      g.dlse = r.dlse.data_ptr<scalar_t>();
      g.dprobs = r.dprobs.data_ptr<scalar_t>();
      g.dalpha = r.dalpha.data_ptr<scalar_t>();
      g.dbeta = r.dbeta.data_ptr<scalar_t>();
      g.grad_rows = gamma.const_data_ptr<scalar_t>();
      at::parallel_for(0, p.batch * p.n, kGrain,
                       [&](int64_t begin, int64_t end) { backward_range(a, g, begin, end); });
    });
    return r;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(attenscribble_ops, CPU, m) {
  m.impl("attentive_similarity_forward", &window_forward_op<CpuWindow>);
  m.impl("attentive_similarity_backward", &window_backward_op<CpuWindow>);
  m.impl("attentive_similarity_fused_forward", &fused_forward_op<CpuWindow>);
  m.impl("attentive_similarity_fused_backward", &fused_backward_op<CpuWindow>);
}

}  // namespace attenscribble_ops
