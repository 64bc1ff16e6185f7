// Entry points of the spatial_attention ops, shared by the CPU and CUDA translation units (ATen
// core only): argument checks (every bad argument raises a ValueError / TypeError naming it
// before any kernel runs), conversion to the accumulation type (fp32; fp64 for fp64) as
// contiguous (B * heads, n, D) slices, and the results back in the caller's dtype. The device
// part is a policy class (CpuSweeps, CudaSweeps) with two static sweeps:
//   forward(q, k, v, out, lse_attn, lse_sim, c, s)                v undefined: lse_sim only
//   backward(AttentionGrads, dq, dk, dv, c, s, accumulate)        v undefined: the LSE-only backward;
//                                                                 accumulate: dq, dk += instead of =
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace attenscribble_ops {

inline at::ScalarType acc_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// (B, heads, n, D) in the accumulation type, viewed as (B * heads, n, D). Detached: the worker
// threads of at::parallel_for do not inherit the dispatcher's "below autograd" state, and an
// out= product on a tensor that requires grad would be refused there.
inline at::Tensor slices(const at::Tensor& x, at::ScalarType acc) {
  return x.detach().to(acc).contiguous().view({-1, x.size(2), x.size(3)});
}

inline void check_qk(const char* op, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK_VALUE(q.dim() == 4 && q.numel() > 0, op, ": q must be a non-empty (B, heads, n, D) tensor, got ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), op, ": k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()) && k.scalar_type() == q.scalar_type(), op,
                   ": q and k must share one floating dtype, got ", q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": k is on ", k.device(), " but q is on ", q.device());
}

inline void check_rows(const char* op, const char* name, const at::Tensor& x, const at::Tensor& q) {
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == q.size(0) && x.size(1) == q.size(1) && x.size(2) == q.size(2), op,
                    ": ", name, " must be (B, heads, n) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
                    x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating-point, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == q.device(), op, ": ", name, " is on ", x.device(), " but q is on ", q.device());
}

inline void check_v(const char* op, const at::Tensor& v, const at::Tensor& q) {
  TORCH_CHECK_VALUE(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2) &&
                        v.size(3) > 0,
                    op, ": v must be (B, heads, n, Dv) with (B, heads, n) of q, got ", v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), op, ": v must have the dtype of q (", q.scalar_type(),
                   "), got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.device() == q.device(), op, ": v is on ", v.device(), " but q is on ", q.device());
}

// Inputs of a backward sweep, all in the accumulation type; dout, delta, lse_attn and v are
// undefined for the LSE-only backward, dlse_sim when no similarity gradient arrived.
struct AttentionGrads {
  at::Tensor q, k, v, dout, delta, lse_attn, lse_sim, dlse_sim;
};

// The device sweeps, defined in csrc/cpu/spatial_attention.cpp and csrc/cuda/spatial_attention.cu
// (the attentive similarity ops call them too, for their fused LSE).
void attention_forward_sweep_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                 at::Tensor& lse_attn, at::Tensor& lse_sim, double c, double s);
void attention_backward_sweep_cpu(const AttentionGrads& in, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, double c,
                                  double s, bool accumulate);
void attention_forward_sweep_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                  at::Tensor& lse_attn, at::Tensor& lse_sim, double c, double s);
void attention_backward_sweep_cuda(const AttentionGrads& in, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                   double c, double s, bool accumulate);

struct CpuSweeps {
  static void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                      at::Tensor& lse_attn, at::Tensor& lse_sim, double c, double s) {
    attention_forward_sweep_cpu(q, k, v, out, lse_attn, lse_sim, c, s);
  }
  static void backward(const AttentionGrads& in, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, double c, double s,
                       bool accumulate) {
    attention_backward_sweep_cpu(in, dq, dk, dv, c, s, accumulate);
  }
};

struct CudaSweeps {
  static void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                      at::Tensor& lse_attn, at::Tensor& lse_sim, double c, double s) {
    attention_forward_sweep_cuda(q, k, v, out, lse_attn, lse_sim, c, s);
  }
  static void backward(const AttentionGrads& in, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, double c, double s,
                       bool accumulate) {
    attention_backward_sweep_cuda(in, dq, dk, dv, c, s, accumulate);
  }
};

inline at::Tensor rows_acc(const at::Tensor& x, at::ScalarType acc) {
  return x.detach().to(acc).reshape({-1, x.size(2)}).contiguous();
}

inline at::Tensor back_to(const at::Tensor& acc, const at::Tensor& like) {
  return acc.view(like.sizes()).to(like.scalar_type());
}

inline double value_scale(const at::Tensor& q) { return 1.0 / std::sqrt(static_cast<double>(q.size(3))); }

template <class Sweeps>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, double logit_scale) {
  check_qk("spatial_attention_forward", q, k);
  check_v("spatial_attention_forward", v, q);
  const at::ScalarType acc = acc_type(q);
  const at::Tensor qs = slices(q, acc), ks = slices(k, acc), vs = slices(v, acc);
  const int64_t bh = qs.size(0), n = qs.size(1);
  at::Tensor out = at::empty({bh, n, v.size(3)}, qs.options());
  at::Tensor lse_attn = at::empty({bh, n}, qs.options()), lse_sim = at::empty({bh, n}, qs.options());
  Sweeps::forward(qs, ks, vs, out, lse_attn, lse_sim, value_scale(q), logit_scale);
  const auto rows = q.sizes().slice(0, 3);
  return {out.view(v.sizes()).to(q.scalar_type()), lse_attn.view(rows), lse_sim.view(rows)};
}

// Checked inputs of the value-path backward, in the accumulation type.
inline AttentionGrads backward_inputs(const char* op, const at::Tensor& dout,
                                      const std::optional<at::Tensor>& dlse_attn,
                                      const std::optional<at::Tensor>& dlse_sim, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                      const at::Tensor& lse_attn, const at::Tensor& lse_sim) {
  check_qk(op, q, k);
  check_v(op, v, q);
  TORCH_CHECK_VALUE(dout.sizes() == v.sizes() && out.sizes() == v.sizes(), op, ": dout and out must be shaped like v ",
                    v.sizes(), ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK_VALUE(dout.device() == q.device() && out.device() == q.device(), op,
                    ": dout and out must be on q's device ", q.device());
  TORCH_CHECK_TYPE(at::isFloatingType(dout.scalar_type()) && at::isFloatingType(out.scalar_type()), op,
                   ": dout and out must be floating-point");
  check_rows(op, "lse_attn", lse_attn, q);
  check_rows(op, "lse_sim", lse_sim, q);
  const at::ScalarType acc = acc_type(q);
  AttentionGrads in;
  in.q = slices(q, acc), in.k = slices(k, acc), in.v = slices(v, acc), in.dout = slices(dout, acc);
  // delta_i = dout_i . out_i - dlse_attn_i: the softmax backward's row term, O(n D)
  in.delta = in.dout.mul(slices(out, acc)).sum(-1).contiguous();
  if (dlse_attn.has_value()) {
    check_rows(op, "dlse_attn", *dlse_attn, q);
    in.delta.sub_(rows_acc(*dlse_attn, acc));
  }
  if (dlse_sim.has_value()) {
    check_rows(op, "dlse_sim", *dlse_sim, q);
    in.dlse_sim = rows_acc(*dlse_sim, acc);
  }
  in.lse_attn = rows_acc(lse_attn, acc);
  in.lse_sim = rows_acc(lse_sim, acc);
  return in;
}

template <class Sweeps>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse_attn, const std::optional<at::Tensor>& dlse_sim,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse_attn,
    const at::Tensor& lse_sim, double logit_scale) {
  const AttentionGrads in = backward_inputs("spatial_attention_backward", dout, dlse_attn, dlse_sim, q, k, v, out,
                                            lse_attn, lse_sim);
  at::Tensor dq = at::empty_like(in.q), dk = at::zeros_like(in.k), dv = at::zeros_like(in.v);
  Sweeps::backward(in, dq, dk, dv, value_scale(q), logit_scale, false);
  return {back_to(dq, q), back_to(dk, k), back_to(dv, v)};
}

// The same backward adding dq, dk into caller buffers (contiguous, q's shape, accumulation type):
// the window terms the attentive similarity loss already put there, so q and k hold one gradient
// buffer each instead of two. Returns dv.
template <class Sweeps>
at::Tensor attention_backward_accumulate(const at::Tensor& dout, const std::optional<at::Tensor>& dlse_attn,
                                         const std::optional<at::Tensor>& dlse_sim, const at::Tensor& q,
                                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                         const at::Tensor& lse_attn, const at::Tensor& lse_sim, double logit_scale,
                                         at::Tensor& dq, at::Tensor& dk) {
  const char* op = "spatial_attention_backward_accumulate";
  const AttentionGrads in = backward_inputs(op, dout, dlse_attn, dlse_sim, q, k, v, out, lse_attn, lse_sim);
  for (const at::Tensor* g : {&dq, &dk})
    TORCH_CHECK_VALUE(g->sizes() == q.sizes() && g->scalar_type() == in.q.scalar_type() && g->is_contiguous() &&
                          g->device() == q.device(),
                      op, ": dq and dk must be contiguous ", in.q.scalar_type(), " tensors shaped like q ",
                      q.sizes(), " on ", q.device(), ", got ", g->sizes(), " ", g->scalar_type());
  at::Tensor dqs = dq.view(in.q.sizes()), dks = dk.view(in.k.sizes()), dv = at::zeros_like(in.v);
  Sweeps::backward(in, dqs, dks, dv, value_scale(q), logit_scale, true);
  return back_to(dv, v);
}

template <class Sweeps>
at::Tensor attention_lse(const at::Tensor& q, const at::Tensor& k, double logit_scale) {
  check_qk("spatial_attention_lse", q, k);
  const at::ScalarType acc = acc_type(q);
  const at::Tensor qs = slices(q, acc), ks = slices(k, acc);
  at::Tensor lse = at::empty({qs.size(0), qs.size(1)}, qs.options()), unused;
  Sweeps::forward(qs, ks, at::Tensor(), unused, unused, lse, 1.0, logit_scale);
  return lse.view(q.sizes().slice(0, 3));
}

template <class Sweeps>
std::tuple<at::Tensor, at::Tensor> attention_lse_backward(const at::Tensor& dlse, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& lse,
                                                          double logit_scale) {
  const char* op = "spatial_attention_lse_backward";
  check_qk(op, q, k);
  check_rows(op, "dlse", dlse, q);
  check_rows(op, "lse", lse, q);
  const at::ScalarType acc = acc_type(q);
  AttentionGrads in;
  in.q = slices(q, acc), in.k = slices(k, acc);
  in.dlse_sim = rows_acc(dlse, acc);
  in.lse_sim = rows_acc(lse, acc);
  at::Tensor dq = at::empty_like(in.q), dk = at::zeros_like(in.k), none;
  Sweeps::backward(in, dq, dk, none, 1.0, logit_scale, false);
  return {back_to(dq, q), back_to(dk, k)};
}

}  // namespace attenscribble_ops
