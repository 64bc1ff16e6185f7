// attentive_similarity on the CPU: the local-window part of the attentive similarity loss.
// Formulas, gradients and layout: csrc/attentive_similarity.h (shared with the CUDA kernel).
// Parallel decomposition: at::parallel_for over the B * n tokens; each token gathers its own
// (2r+1)^2 window and writes only its own output rows, so the result does not depend on the
// thread count. Per-token partial sums of dL/dalpha and dL/dbeta are reduced afterwards by a
// fixed-order sum. Inputs are converted once to the accumulation type (fp32, fp64 for fp64) so
// the inner loops never convert: O(B * heads * n * D) extra memory, never O(n^2).
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
#include "cpu/rowwise.h"

namespace attenscribble_ops {
namespace {

struct Prepared {
  at::Tensor q, k, lse, probs, head_weight, head_bias, sample_weight;
  int64_t batch, heads, n, dim, classes, h, w;
  at::ScalarType acc;
};

// Checks every argument (ValueError/TypeError naming it) and converts to the accumulation type.
Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& probs,
                 const at::Tensor& head_weight, const at::Tensor& head_bias,
                 const std::optional<at::Tensor>& sample_weight, int64_t radius, double sigma) {
  TORCH_CHECK_VALUE(q.dim() == 4, "attentive_similarity: q must be (B, heads, n, D), got ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "attentive_similarity: k must have the shape of q ", q.sizes(),
                    ", got ", k.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()) && k.scalar_type() == q.scalar_type(),
                   "attentive_similarity: q and k must share one floating dtype, got ", q.scalar_type(), " and ",
                   k.scalar_type());
  Prepared p;
  p.batch = q.size(0), p.heads = q.size(1), p.n = q.size(2), p.dim = q.size(3);
  TORCH_CHECK_VALUE(p.n > 0 && p.dim > 0 && p.batch > 0 && p.heads > 0,
                    "attentive_similarity: q must not be empty, got ", q.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == p.batch && lse.size(1) == p.heads && lse.size(2) == p.n,
                    "attentive_similarity: lse must be (B, heads, n) = (", p.batch, ", ", p.heads, ", ", p.n,
                    "), got ", lse.sizes());
  TORCH_CHECK_VALUE(probs.dim() == 4 && probs.size(0) == p.batch && probs.size(2) * probs.size(3) == p.n &&
                        probs.size(1) > 0,
                    "attentive_similarity: probs must be (B, C, h, w) with B = ", p.batch, " and h * w = n = ", p.n,
                    ", got ", probs.sizes());
  TORCH_CHECK_VALUE(head_weight.numel() == p.heads, "attentive_similarity: head_weight must have ", p.heads,
                    " entries (one per head), got ", head_weight.sizes());
  TORCH_CHECK_VALUE(head_bias.numel() == 1, "attentive_similarity: head_bias must be a scalar, got ",
                    head_bias.sizes());
  TORCH_CHECK_VALUE(radius >= 1, "attentive_similarity: radius must be >= 1, got ", radius);
  TORCH_CHECK_VALUE(sigma > 0, "attentive_similarity: sigma must be > 0, got ", sigma);
  for (const at::Tensor* t : {&lse, &probs, &head_weight, &head_bias})
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "attentive_similarity: lse, probs, head_weight and "
                     "head_bias must be floating-point, got ", t->scalar_type());
  p.classes = probs.size(1), p.h = probs.size(2), p.w = probs.size(3);
  p.acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.q = q.to(p.acc).contiguous();
  p.k = k.to(p.acc).contiguous();
  p.lse = lse.to(p.acc).contiguous();
  p.probs = probs.to(p.acc).permute({0, 2, 3, 1}).contiguous();  // token-major (B, n, C)
  p.head_weight = head_weight.to(p.acc).reshape({p.heads}).contiguous();
  p.head_bias = head_bias.to(p.acc).reshape({1}).contiguous();
  if (sample_weight.has_value()) {
    TORCH_CHECK_VALUE(sample_weight->numel() == p.batch, "attentive_similarity: sample_weight must be (B,) = (",
                      p.batch, ",), got ", sample_weight->sizes());
    p.sample_weight = sample_weight->to(p.acc).reshape({p.batch}).contiguous();
  }
  return p;
}

template <typename acc_t>
window::Args<acc_t> make_args(const Prepared& p, int64_t radius, double sigma,
                              double logit_scale) {
  window::Args<acc_t> a;
  a.q = p.q.const_data_ptr<acc_t>();
  a.k = p.k.const_data_ptr<acc_t>();
  a.lse = p.lse.const_data_ptr<acc_t>();
  a.probs = p.probs.const_data_ptr<acc_t>();
  a.head_weight = p.head_weight.const_data_ptr<acc_t>();
  a.sample_weight = p.sample_weight.defined() ? p.sample_weight.const_data_ptr<acc_t>() : nullptr;
  a.head_bias = p.head_bias.const_data_ptr<acc_t>();
  a.scale = static_cast<acc_t>(logit_scale);
  a.neg_half_inv_sigma2 = static_cast<acc_t>(-0.5 / (sigma * sigma));
  a.heads = p.heads, a.n = p.n, a.dim = p.dim, a.classes = p.classes, a.h = p.h, a.w = p.w;
  a.ry = std::min(radius, p.h - 1);
  a.rx = std::min(radius, p.w - 1);
  return a;
}

// Token ranges. The fp32 versions are cloned per instruction set (see cpu/rowwise.h) with the
// shared window math inlined into each clone, so its dot products and updates are vectorised.
template <typename acc_t>
ASL_INLINE void forward_range_impl(const window::Args<acc_t>& a, acc_t* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = window::row_loss(a, i / a.n, i % a.n);
}

template <typename acc_t>
ASL_INLINE void backward_range_impl(const window::Args<acc_t>& a, const window::Grads<acc_t>& g, int64_t begin,
                                    int64_t end) {
  std::vector<acc_t> scratch(2 * a.dim);
  for (int64_t i = begin; i < end; ++i) window::row_backward(a, g, i / a.n, i % a.n, scratch.data(), scratch.data() + a.dim);
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

}  // namespace

at::Tensor attentive_similarity_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                            const at::Tensor& probs, const at::Tensor& head_weight,
                                            const at::Tensor& head_bias,
                                            const std::optional<at::Tensor>& sample_weight, int64_t radius,
                                            double sigma, double logit_scale) {
  const Prepared p = prepare(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma);
  at::Tensor rows = at::empty({p.batch, p.n}, p.q.options());
  AT_DISPATCH_FLOATING_TYPES(p.acc, "attentive_similarity_forward_cpu", [&] {
    const window::Args<scalar_t> a = make_args<scalar_t>(p, radius, sigma, logit_scale);
    scalar_t* out = rows.data_ptr<scalar_t>();
    at::parallel_for(0, p.batch * p.n, kGrain, [&](int64_t begin, int64_t end) { forward_range(a, out, begin, end); });
  });
  return rows;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attentive_similarity_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
    const at::Tensor& probs, const at::Tensor& head_weight, const at::Tensor& head_bias,
    const std::optional<at::Tensor>& sample_weight, int64_t radius, double sigma, double logit_scale) {
  const Prepared p = prepare(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma);
  TORCH_CHECK_VALUE(grad_rows.dim() == 2 && grad_rows.size(0) == p.batch && grad_rows.size(1) == p.n,
                    "attentive_similarity_backward: grad_rows must be (B, n) = (", p.batch, ", ", p.n, "), got ",
                    grad_rows.sizes());
  const at::Tensor gamma = grad_rows.to(p.acc).contiguous();
  at::Tensor dq = at::empty_like(p.q), dk = at::empty_like(p.k), dlse = at::empty_like(p.lse);
  at::Tensor dprobs = at::empty_like(p.probs), dalpha = at::empty_like(p.lse);
  at::Tensor dbeta = at::empty({p.batch, p.n}, p.q.options());
  AT_DISPATCH_FLOATING_TYPES(p.acc, "attentive_similarity_backward_cpu", [&] {
    const window::Args<scalar_t> a = make_args<scalar_t>(p, radius, sigma, logit_scale);
    window::Grads<scalar_t> g;
    g.dq = dq.data_ptr<scalar_t>();
    g.dk = dk.data_ptr<scalar_t>();
    g.dlse = dlse.data_ptr<scalar_t>();
    g.dprobs = dprobs.data_ptr<scalar_t>();
    g.dalpha = dalpha.data_ptr<scalar_t>();
    g.dbeta = dbeta.data_ptr<scalar_t>();
    g.grad_rows = gamma.const_data_ptr<scalar_t>();
    at::parallel_for(0, p.batch * p.n, kGrain, [&](int64_t begin, int64_t end) { backward_range(a, g, begin, end); });
  });
  return {dq.to(q.scalar_type()),
          dk.to(k.scalar_type()),
          dlse.to(lse.scalar_type()),
          dprobs.view({p.batch, p.h, p.w, p.classes}).permute({0, 3, 1, 2}).to(probs.scalar_type()).contiguous(),
          dalpha.sum({0, 2}).to(head_weight.scalar_type()).reshape(head_weight.sizes()),
          dbeta.sum().to(head_bias.scalar_type()).reshape(head_bias.sizes())};
}

TORCH_LIBRARY_IMPL(attenscribble_ops, CPU, m) {
  m.impl("attentive_similarity_forward", &attentive_similarity_forward_cpu);
  m.impl("attentive_similarity_backward", &attentive_similarity_backward_cpu);
}

}  // namespace attenscribble_ops
