// Entry points of the attentive similarity ops, shared by the CPU and CUDA translation units
// (ATen core only, so nvcc compiles it without a CUDA torch): argument checks (every bad argument
// raises a ValueError / TypeError naming it; nothing reaches a kernel unless shapes, dtypes and
// devices agree), conversion to the accumulation type (fp32; fp64 for fp64 q) in the layout of
// csrc/attentive_similarity.h, and the gradients back in the caller's dtypes.
//
// Two op pairs:
//   window:  (q, k, lse, ...) -> per-token rows; backward -> dq, dk (window terms), dlse, ...
//            for an LSE handed over by the attention, whose backward completes dq, dk.
//   fused:   (q, k, ...) -> (rows, lse); backward runs the window kernel, then the dense LSE sweep
//            accumulating into the same dq, dk buffers (one pair of gradient buffers, not two).
// The device part is a policy class (CpuWindow / CudaWindow) with
//   forward(Prepared, radius, sigma, s) -> rows,   backward(Prepared, gamma, radius, sigma, s) -> WindowGrads,
//   and Sweeps, the attention sweeps of csrc/spatial_attention_inputs.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "attentive_similarity.h"
#include "spatial_attention_inputs.h"

namespace attenscribble_ops {

struct Prepared {
  at::Tensor q, k, lse, probs, head_weight, head_bias, sample_weight;
  int64_t batch, heads, n, dim, classes, h, w;
  at::ScalarType acc;
};

// Checks every argument (ValueError/TypeError naming it) and converts to the accumulation type.
inline Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& probs,
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
  for (const at::Tensor* t : {&lse, &probs, &head_weight, &head_bias}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "attentive_similarity: lse, probs, head_weight and "
                     "head_bias must be floating-point, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), "attentive_similarity: every tensor must be on q's device ",
                      q.device(), ", got one on ", t->device());
  }
  TORCH_CHECK_VALUE(k.device() == q.device(), "attentive_similarity: k is on ", k.device(), " but q is on ",
                    q.device());
  p.classes = probs.size(1), p.h = probs.size(2), p.w = probs.size(3);
  p.acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // detached: plain buffers for the kernels (and for out= products on worker threads)
  p.q = q.detach().to(p.acc).contiguous();
  p.k = k.detach().to(p.acc).contiguous();
  p.lse = lse.detach().to(p.acc).contiguous();
  p.probs = probs.detach().to(p.acc).permute({0, 2, 3, 1}).contiguous();  // token-major (B, n, C)
  p.head_weight = head_weight.detach().to(p.acc).reshape({p.heads}).contiguous();
  p.head_bias = head_bias.detach().to(p.acc).reshape({1}).contiguous();
  if (sample_weight.has_value()) {
    TORCH_CHECK_VALUE(sample_weight->device() == q.device(), "attentive_similarity: sample_weight is on ",
                      sample_weight->device(), " but q is on ", q.device());
    TORCH_CHECK_VALUE(sample_weight->numel() == p.batch, "attentive_similarity: sample_weight must be (B,) = (",
                      p.batch, ",), got ", sample_weight->sizes());
    p.sample_weight = sample_weight->detach().to(p.acc).reshape({p.batch}).contiguous();
  }
  return p;
}

template <typename acc_t>
inline window::Args<acc_t> make_args(const Prepared& p, int64_t radius, double sigma,
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

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Gradients back to the caller's dtypes and layouts; the per-token partial sums of dL/dalpha and
// dL/dbeta reduced by ATen's fixed-order sum (deterministic).
inline BackwardResult finish_backward(const Prepared& p, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& lse, const at::Tensor& probs, const at::Tensor& head_weight,
                                      const at::Tensor& head_bias, const at::Tensor& dq, const at::Tensor& dk,
                                      const at::Tensor& dlse, const at::Tensor& dprobs, const at::Tensor& dalpha,
                                      const at::Tensor& dbeta) {
  return {dq.to(q.scalar_type()),
          dk.to(k.scalar_type()),
          dlse.to(lse.scalar_type()),
          dprobs.view({p.batch, p.h, p.w, p.classes}).permute({0, 3, 1, 2}).to(probs.scalar_type()).contiguous(),
          dalpha.sum(at::IntArrayRef{0, 2}).to(head_weight.scalar_type()).reshape(head_weight.sizes()),
          dbeta.sum().to(head_bias.scalar_type()).reshape(head_bias.sizes())};
}

// Window-kernel gradients in the accumulation type: dq, dk (B, heads, n, D), dlse, dalpha
// (B, heads, n), dprobs (B, n, C), dbeta (B, n).
struct WindowGrads {
  at::Tensor dq, dk, dlse, dprobs, dalpha, dbeta;
};

inline at::Tensor checked_gamma(const at::Tensor& grad_rows, const Prepared& p, const at::Tensor& q) {
  TORCH_CHECK_VALUE(grad_rows.dim() == 2 && grad_rows.size(0) == p.batch && grad_rows.size(1) == p.n,
                    "attentive_similarity_backward: grad_rows must be (B, n) = (", p.batch, ", ", p.n, "), got ",
                    grad_rows.sizes());
  TORCH_CHECK_VALUE(grad_rows.device() == q.device(), "attentive_similarity_backward: grad_rows is on ",
                    grad_rows.device(), " but q is on ", q.device());
  return grad_rows.detach().to(p.acc).contiguous();
}

template <class Window>
at::Tensor window_forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& probs,
                             const at::Tensor& head_weight, const at::Tensor& head_bias,
                             const std::optional<at::Tensor>& sample_weight, int64_t radius, double sigma,
                             double logit_scale) {
  const Prepared p = prepare(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma);
  return Window::forward(p, radius, sigma, logit_scale);
}

template <class Window>
BackwardResult window_backward_op(const at::Tensor& grad_rows, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& lse, const at::Tensor& probs, const at::Tensor& head_weight,
                                  const at::Tensor& head_bias, const std::optional<at::Tensor>& sample_weight,
                                  int64_t radius, double sigma, double logit_scale) {
  const Prepared p = prepare(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma);
  const WindowGrads g = Window::backward(p, checked_gamma(grad_rows, p, q), radius, sigma, logit_scale);
  return finish_backward(p, q, k, lse, probs, head_weight, head_bias, g.dq, g.dk, g.dlse, g.dprobs, g.dalpha,
                         g.dbeta);
}

template <class Window>
std::tuple<at::Tensor, at::Tensor> fused_forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& probs,
                                                    const at::Tensor& head_weight, const at::Tensor& head_bias,
                                                    const std::optional<at::Tensor>& sample_weight, int64_t radius,
                                                    double sigma, double logit_scale) {
  const at::Tensor lse = attention_lse<typename Window::Sweeps>(q, k, logit_scale);
  return {window_forward_op<Window>(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma,
                                    logit_scale),
          lse};
}

using FusedBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <class Window>
FusedBackwardResult fused_backward_op(const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_lse,
                                      const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                      const at::Tensor& probs, const at::Tensor& head_weight,
                                      const at::Tensor& head_bias, const std::optional<at::Tensor>& sample_weight,
                                      int64_t radius, double sigma, double logit_scale) {
  const Prepared p = prepare(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma);
  WindowGrads g = Window::backward(p, checked_gamma(grad_rows, p, q), radius, sigma, logit_scale);
  if (grad_lse.has_value()) {
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse.sizes() && grad_lse->device() == q.device(),
                      "attentive_similarity_fused_backward: grad_lse must be shaped like lse ", lse.sizes());
    g.dlse.add_(grad_lse->detach().to(p.acc));
  }
  AttentionGrads in;
  in.q = p.q.view({-1, p.n, p.dim});
  in.k = p.k.view({-1, p.n, p.dim});
  in.dlse_sim = g.dlse.view({-1, p.n});
  in.lse_sim = p.lse.view({-1, p.n});
  at::Tensor dq = g.dq.view({-1, p.n, p.dim}), dk = g.dk.view({-1, p.n, p.dim}), none;
  // the dense part, d lse / d q and d lse / d k, added into the window terms' buffers
  Window::Sweeps::backward(in, dq, dk, none, 1.0, logit_scale, true);
  BackwardResult r = finish_backward(p, q, k, lse, probs, head_weight, head_bias, g.dq, g.dk, g.dlse, g.dprobs,
                                     g.dalpha, g.dbeta);
  return {std::get<0>(r), std::get<1>(r), std::get<3>(r), std::get<4>(r), std::get<5>(r)};
}

}  // namespace attenscribble_ops
