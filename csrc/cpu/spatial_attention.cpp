// spatial_attention on the CPU: blocked attention that keeps only a tile of logits at a time.
//
// Forward, per (b, head), c = D^-1/2, s = logit_scale, Lambda = q k^T (unscaled):
//   lse_sim_i  = logsumexp_j(s Lambda_ij)                      (similarity normaliser)
//   lse_attn_i = logsumexp_j(c Lambda_ij),  P = exp(c Lambda - lse_attn),  out = P v
// Backward, given dout, dlse_attn, dlse_sim (each optional except dout for the value path):
//   delta_i = dout_i . out_i - dlse_attn_i,   dv = P^T dout
//   dLambda = c P o (dout v^T - delta) + s dlse_sim o exp(s Lambda - lse_sim)
//   dq = dLambda k,   dk = dLambda^T q
// (dlse_sim is the gradient the window kernel of the attentive similarity loss hands back:
//  d lse_i / d q_i = s sum_j A_ij k_j, d lse_i / d k_j = s A_ij q_i.)
// The "lse" variant is the same sweep without values: lse_sim and its backward only.
//
// Layout: (B, heads, n, D) made contiguous in the accumulation type (fp32; fp64 for fp64) once.
// Decomposition: one at::parallel_for over the B * heads slices (one parallel region per call: many
// short regions stall whenever another process holds a core); each task walks its slice's
// queries in row tiles of ~2^18 logits (1 MiB in fp32, so the element-wise passes run from L2).
// A tile's logits exist only inside the tile loop: memory O(threads * tile + B heads n D), never
// O(n^2). Per tile, the matrix products go to BLAS (ATen's mm; single-threaded inside the
// region) and the element-wise work is one or two fused passes per row (csrc/cpu/rowwise.h).
// With a single slice the region is skipped and the products and row passes parallelise instead.
// dk and dv accumulate over a slice's tiles in a fixed order: deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/rowwise.h"
#include "spatial_attention_inputs.h"

namespace attenscribble_ops {
namespace {

// ~2^18 logits per tile (1 MiB in fp32): the tile's element-wise passes run from the L2 cache.
int64_t tile_rows(int64_t n) { return std::min<int64_t>(n, std::clamp<int64_t>((int64_t(1) << 18) / n, 16, 1024)); }
constexpr int64_t kRowGrain = 8;

// One sweep over the keys for every query tile. v undefined: similarity LSE only.
template <typename T>
void forward_sweep(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                   at::Tensor& lse_attn, at::Tensor& lse_sim, T c, T s) {
  const int64_t n = q.size(1), rows = tile_rows(n);
  const bool values = v.defined();
  at::parallel_for(0, q.size(0), 1, [&](int64_t bh_begin, int64_t bh_end) {
    at::Tensor logits = at::empty({rows, n}, q.options());
    at::Tensor prob = values ? at::empty({rows, n}, q.options()) : at::Tensor();
    at::Tensor totals = at::empty({rows, 1}, q.options());
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      const at::Tensor kt = k[bh].t();
      for (int64_t r0 = 0; r0 < n; r0 += rows) {
        const int64_t m = std::min(rows, n - r0);
        at::Tensor lg = logits.narrow(0, 0, m);
        at::mm_out(lg, q[bh].narrow(0, r0, m), kt);
        const T* x = lg.const_data_ptr<T>();
        T* ls = lse_sim.data_ptr<T>() + bh * n + r0;
        T* la = values ? lse_attn.data_ptr<T>() + bh * n + r0 : nullptr;
        T* p = values ? prob.data_ptr<T>() : nullptr;
        T* tot = totals.data_ptr<T>();
        at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const T* row = x + i * n;
            T mx, mn;
            rowwise::max_min(row, n, &mx, &mn);
            // shifting by the row maximum of the scaled logits keeps every exponent <= 0
            const T shift_s = s >= T(0) ? s * mx : s * mn;
            ls[i] = shift_s + std::log(rowwise::exp_sum(static_cast<T*>(nullptr), row, n, s, shift_s));
            if (p) {
              tot[i] = rowwise::exp_sum(p + i * n, row, n, c, c * mx);
              la[i] = c * mx + std::log(tot[i]);
            }
          }
        });
        if (!values) continue;
        at::Tensor o = out[bh].narrow(0, r0, m);
        at::mm_out(o, prob.narrow(0, 0, m), v[bh]);
        o.div_(totals.narrow(0, 0, m));
      }
    }
  });
}

// The backward sweep. v undefined: the LSE-only backward (dq, dk from dlse_sim).
template <typename T>
void backward_sweep(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                    const at::Tensor& delta, const at::Tensor& lse_attn, const at::Tensor& dlse_sim,
                    const at::Tensor& lse_sim, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, T c, T s,
                    bool accumulate) {
  const int64_t n = q.size(1), rows = tile_rows(n);
  const bool values = v.defined(), sim = dlse_sim.defined();
  const T* lse_s = lse_sim.const_data_ptr<T>();
  const T* dlse_s = sim ? dlse_sim.const_data_ptr<T>() : nullptr;
  const T* lse_a = values ? lse_attn.const_data_ptr<T>() : nullptr;
  const T* dlt = values ? delta.const_data_ptr<T>() : nullptr;
  at::parallel_for(0, q.size(0), 1, [&](int64_t bh_begin, int64_t bh_end) {
    at::Tensor logits = at::empty({rows, n}, q.options()), dlogits = at::empty({rows, n}, q.options());
    at::Tensor prob = values ? at::empty({rows, n}, q.options()) : at::Tensor();
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      const at::Tensor qb = q[bh], kb = k[bh];
      at::Tensor dkb = dk[bh];
      for (int64_t r0 = 0; r0 < n; r0 += rows) {
        const int64_t m = std::min(rows, n - r0), off = bh * n + r0;
        at::Tensor lg = logits.narrow(0, 0, m), dl = dlogits.narrow(0, 0, m);
        const at::Tensor qt = qb.narrow(0, r0, m);
        at::mm_out(lg, qt, kb.t());
        const T* x = lg.const_data_ptr<T>();
        T* d = dl.data_ptr<T>();
        if (values) {
          const at::Tensor dot = dout[bh].narrow(0, r0, m), pr = prob.narrow(0, 0, m);
          T* p = pr.data_ptr<T>();
          at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) rowwise::exp_store(p + i * n, x + i * n, n, c, lse_a[off + i], T(1));
          });
          dv[bh].addmm_(pr.t(), dot);
          at::mm_out(dl, dot, v[bh].t());
          at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i)
              rowwise::dlogits(d + i * n, p + i * n, x + i * n, n, c, dlt[off + i], sim ? s * dlse_s[off + i] : T(0),
                               s, lse_s[off + i]);
          });
        } else {
          at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i)
              rowwise::exp_store(d + i * n, x + i * n, n, s, lse_s[off + i], s * dlse_s[off + i]);
          });
        }
        at::Tensor dqt = dq[bh].narrow(0, r0, m);
        if (accumulate) dqt.addmm_(dl, kb);
        else at::mm_out(dqt, dl, kb);
        dkb.addmm_(dl.t(), qt);
      }
    }
  });
}

}  // namespace

void attention_forward_sweep_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                 at::Tensor& lse_attn, at::Tensor& lse_sim, double c, double s) {
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "spatial_attention_forward_cpu", [&] {
    forward_sweep<scalar_t>(q, k, v, out, lse_attn, lse_sim, c, s);
  });
}

void attention_backward_sweep_cpu(const AttentionGrads& in, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, double c,
                                  double s, bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "spatial_attention_backward_cpu", [&] {
    backward_sweep<scalar_t>(in.q, in.k, in.v, in.dout, in.delta, in.lse_attn, in.dlse_sim, in.lse_sim, dq, dk, dv,
                             c, s, accumulate);
  });
}

TORCH_LIBRARY_IMPL(attenscribble_ops, CPU, m) {
  m.impl("spatial_attention_forward", &attention_forward<CpuSweeps>);
  m.impl("spatial_attention_backward", &attention_backward<CpuSweeps>);
  m.impl("spatial_attention_backward_accumulate", &attention_backward_accumulate<CpuSweeps>);
  m.impl("spatial_attention_lse", &attention_lse<CpuSweeps>);
  m.impl("spatial_attention_lse_backward", &attention_lse_backward<CpuSweeps>);
}

}  // namespace attenscribble_ops
