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
// Tiles: kTileRows queries x up to 2^18 / kTileRows keys (~2^18 logits, 1 MiB in fp32, so the
// element-wise passes run from L2, and each query tile streams k and v once from the cache however
// large n is). A tile's logits exist only inside the tile loop: memory O(threads * tile + B heads
// n D), never O(n^2). The forward walks a query tile's key blocks with running row maxima and sums
// (online softmax: the partial output is rescaled when the maximum grows) and is one parallel
// region over every (slice, query tile) pair. The backward needs no running state (the forward's
// LSEs normalise every block) and is one region over the B * heads slices, because dk and dv
// accumulate over a slice's query tiles; with a single slice the region is skipped and the
// products and row passes parallelise instead. One parallel region per call: many short regions
// stall whenever another process holds a core. Per tile, the matrix products go to BLAS (ATen's
// mm) and the element-wise work is one or two fused passes per row (csrc/cpu/rowwise.h).
//
// Determinism: every sum runs in a fixed order whatever the thread count. BLAS needs help there:
// MKL splits a product's inner dimension between its threads, so the same product gives other bits
// with 1 and 2 threads (measured with torch's MKL on this project's development CPU: fp32 from an
// inner dimension of 256, fp64 from 128; inside a parallel region too). Every product here runs on
// its calling thread alone (SequentialBlas), and the one-slice backward, which has no region over
// slices, spreads its products over the threads itself, in chunks that depend only on the shapes
// (product below).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/rowwise.h"
#include "spatial_attention_inputs.h"

#if defined(__GNUC__)
// MKL's per-thread thread count (its C entry point: mkl_service.h maps mkl_set_num_threads_local to
// it; the lower-case symbol itself is the Fortran one, taking a pointer). Weak: null when torch's
// BLAS is not MKL, whose determinism across thread counts is then not guaranteed here.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

namespace attenscribble_ops {
namespace {

using SetLocalThreads = int (*)(int);

SetLocalThreads mkl_set_local_threads() {
#if defined(__GNUC__)
  return &MKL_Set_Num_Threads_Local;
#else
  return nullptr;
#endif
}

// BLAS on the calling thread only while this lives (then its previous setting again).
class SequentialBlas {
 public:
  SequentialBlas() : set_(mkl_set_local_threads()), before_(set_ ? set_(1) : 0) {}
  ~SequentialBlas() {
    if (set_) set_(before_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  SetLocalThreads set_;
  int before_;
};

// at::parallel_for over [begin, end) whose workers take the calling thread's thread-local state
// (inference mode, grad mode, dispatch keys), as autograd's worker threads do: the sweeps run ATen
// products into the caller's tensors there (out= and in-place adds), which under
// torch.inference_mode are inference tensors that only inference mode may write into.
template <typename F>
void parallel(int64_t begin, int64_t end, int64_t grain, const F& body) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    body(b, e);
  });
}

// How a product spreads over the threads (the one-slice backward's): not at all, or in chunks of
// out's rows or of its columns, fixed by the shapes (at least kMinChunk, at most kMaxChunks
// chunks). Chunks are cut on the side of the large operand, so that each call packs only its own
// part of it. (Each chunk is one more BLAS call: on one thread, B = 1, 64 x 64, D = 64, the
// backward takes about 9 % longer than with whole products; with 2 threads, as long.)
enum class Split { kNone, kRows, kCols };
constexpr int64_t kMinChunk = 64, kMaxChunks = 8;

// out = a b, or out += a b: each call (each chunk) one sequential BLAS call, so the bits do not
// depend on the thread count. The chunks run on the threads outside a parallel region, in turn
// inside one.
void product(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate, Split split) {
  const auto one = [&](at::Tensor o, const at::Tensor& x, const at::Tensor& y) {
    SequentialBlas sequential;
    if (accumulate) o.addmm_(x, y);
    else at::mm_out(o, x, y);
  };
  if (split == Split::kNone) return one(out, a, b);
  const int dim = split == Split::kRows ? 0 : 1;
  const int64_t size = out.size(dim);
  const int64_t chunk = std::max<int64_t>(kMinChunk, (size + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (size + chunk - 1) / chunk;
  parallel(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * chunk, len = std::min(chunk, size - c0);
      if (dim == 0) one(out.narrow(0, c0, len), a.narrow(0, c0, len), b);
      else one(out.narrow(1, c0, len), a, b.narrow(1, c0, len));
    }
  });
}

constexpr int64_t kTileLogits = int64_t(1) << 18;
constexpr int64_t kTileRows = 128;
constexpr int64_t kRowGrain = 8;
int64_t tile_rows(int64_t n) { return std::min(n, kTileRows); }
int64_t tile_cols(int64_t n) { return std::min(n, kTileLogits / kTileRows); }

// One sweep over the keys for every query tile, in key blocks with running (online) maxima and
// sums. v undefined: similarity LSE only.
template <typename T>
void forward_sweep(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                   at::Tensor& lse_attn, at::Tensor& lse_sim, T c, T s) {
  const int64_t n = q.size(1), rows = tile_rows(n), cols = tile_cols(n);
  const bool values = v.defined();
  const int64_t tiles = (n + rows - 1) / rows;
  // query tiles are independent: one region over every (slice, tile) pair
  parallel(0, q.size(0) * tiles, 1, [&](int64_t task_begin, int64_t task_end) {
    SequentialBlas sequential;
    at::Tensor logits = at::empty({rows, cols}, q.options());
    at::Tensor prob = values ? at::empty({rows, cols}, q.options()) : at::Tensor();
    // per query row: running max and min of the raw logits, sum of exp(s x - shift_s), sum of
    // exp(c x - c max)
    std::vector<T> hi(rows), lo(rows), sum_s(rows), sum_c(rows);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t bh = task / tiles, r0 = (task % tiles) * rows, m = std::min(rows, n - r0);
      const at::Tensor qt = q[bh].narrow(0, r0, m);
      at::Tensor o = values ? out[bh].narrow(0, r0, m) : at::Tensor();
      T* orows = values ? o.data_ptr<T>() : nullptr;
      const int64_t dv = values ? o.size(1) : 0;
      for (int64_t j0 = 0; j0 < n; j0 += cols) {
        const int64_t w = std::min(cols, n - j0);
        const bool first = j0 == 0;
        at::Tensor lg = logits.narrow(0, 0, m).narrow(1, 0, w);
        at::mm_out(lg, qt, k[bh].narrow(0, j0, w).t());
        const T* x = lg.const_data_ptr<T>();
        const int64_t ld = lg.stride(0);
        T* p = values ? prob.data_ptr<T>() : nullptr;
        at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const T* row = x + i * ld;
            T bmx, bmn;
            rowwise::max_min(row, w, &bmx, &bmn);
            const T mx = first ? bmx : std::max(hi[i], bmx), mn = first ? bmn : std::min(lo[i], bmn);
            // shifting by the running maximum of the scaled logits keeps every exponent <= 0
            const T shift_s = s >= T(0) ? s * mx : s * mn;
            const T prev_s = s >= T(0) ? s * hi[i] : s * lo[i];
            T tail_s, tail_c = T(0);
            if (p) rowwise::exp_sum2(p + i * cols, row, w, c, c * mx, s, shift_s, &tail_c, &tail_s);
            else tail_s = rowwise::exp_sum(static_cast<T*>(nullptr), row, w, s, shift_s);
            sum_s[i] = first ? tail_s : sum_s[i] * std::exp(prev_s - shift_s) + tail_s;
            if (p) {
              if (first) {
                sum_c[i] = tail_c;
              } else {
                const T alpha = std::exp(c * (hi[i] - mx));
                sum_c[i] = sum_c[i] * alpha + tail_c;
                if (alpha != T(1))
                  for (int64_t d = 0; d < dv; ++d) orows[i * dv + d] *= alpha;
              }
            }
            hi[i] = mx;
            lo[i] = mn;
          }
        });
        if (!values) continue;
        const at::Tensor pr = prob.narrow(0, 0, m).narrow(1, 0, w), vb = v[bh].narrow(0, j0, w);
        if (first) at::mm_out(o, pr, vb);
        else o.addmm_(pr, vb);
      }
      T* ls = lse_sim.data_ptr<T>() + bh * n + r0;
      T* la = values ? lse_attn.data_ptr<T>() + bh * n + r0 : nullptr;
      for (int64_t i = 0; i < m; ++i) {
        ls[i] = (s >= T(0) ? s * hi[i] : s * lo[i]) + std::log(sum_s[i]);
        if (la) la[i] = c * hi[i] + std::log(sum_c[i]);
      }
      for (int64_t i = 0; values && i < m; ++i)
        for (int64_t d = 0; d < dv; ++d) orows[i * dv + d] /= sum_c[i];
    }
  });
}

// The backward sweep, in the same tiles (no running state: the forward's LSEs normalise each
// block). v undefined: the LSE-only backward (dq, dk from dlse_sim).
template <typename T>
void backward_sweep(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                    const at::Tensor& delta, const at::Tensor& lse_attn, const at::Tensor& dlse_sim,
                    const at::Tensor& lse_sim, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, T c, T s,
                    bool accumulate) {
  const int64_t n = q.size(1), rows = tile_rows(n), cols = tile_cols(n);
  const bool values = v.defined(), sim = dlse_sim.defined();
  const T* lse_s = lse_sim.const_data_ptr<T>();
  const T* dlse_s = sim ? dlse_sim.const_data_ptr<T>() : nullptr;
  const T* lse_a = values ? lse_attn.const_data_ptr<T>() : nullptr;
  const T* dlt = values ? delta.const_data_ptr<T>() : nullptr;
  // One slice: no region over slices (at::parallel_for would run it inline under a parallel
  // guard, which ATen's native thread pool takes for a region: its nested loops would run inline
  // too); its row passes and products spread over the threads instead.
  const bool one_slice = q.size(0) == 1;
  const Split rows_split = one_slice ? Split::kRows : Split::kNone;
  const Split cols_split = one_slice ? Split::kCols : Split::kNone;
  const auto sweep = [&](int64_t bh_begin, int64_t bh_end) {
    at::Tensor logits = at::empty({rows, cols}, q.options()), dlogits = at::empty({rows, cols}, q.options());
    at::Tensor prob = values ? at::empty({rows, cols}, q.options()) : at::Tensor();
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      const at::Tensor qb = q[bh], kb = k[bh];
      at::Tensor dkb = dk[bh];
      for (int64_t r0 = 0; r0 < n; r0 += rows) {
        const int64_t m = std::min(rows, n - r0), off = bh * n + r0;
        const at::Tensor qt = qb.narrow(0, r0, m);
        at::Tensor dqt = dq[bh].narrow(0, r0, m);
        for (int64_t j0 = 0; j0 < n; j0 += cols) {
          const int64_t w = std::min(cols, n - j0);
          const at::Tensor kt = kb.narrow(0, j0, w);
          at::Tensor lg = logits.narrow(0, 0, m).narrow(1, 0, w), dl = dlogits.narrow(0, 0, m).narrow(1, 0, w);
          product(lg, qt, kt.t(), false, cols_split);
          const T* x = lg.const_data_ptr<T>();
          T* d = dl.data_ptr<T>();
          if (values) {
            const at::Tensor dot = dout[bh].narrow(0, r0, m), pr = prob.narrow(0, 0, m).narrow(1, 0, w);
            T* p = pr.data_ptr<T>();
            product(dl, dot, v[bh].narrow(0, j0, w).t(), false, cols_split);
            at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
              for (int64_t i = begin; i < end; ++i)
                rowwise::exp_dlogits(d + i * cols, p + i * cols, x + i * cols, w, c, lse_a[off + i], dlt[off + i],
                                     sim ? s * dlse_s[off + i] : T(0), s, lse_s[off + i]);
            });
            product(dv[bh].narrow(0, j0, w), pr.t(), dot, true, rows_split);
          } else {
            at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
              for (int64_t i = begin; i < end; ++i)
                rowwise::exp_store(d + i * cols, x + i * cols, w, s, lse_s[off + i], s * dlse_s[off + i]);
            });
          }
          product(dqt, dl, kt, accumulate || j0 > 0, rows_split);
          product(dkb.narrow(0, j0, w), dl.t(), qt, true, rows_split);
        }
      }
    }
  };
  if (one_slice) sweep(0, 1);
  else parallel(0, q.size(0), 1, sweep);
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
