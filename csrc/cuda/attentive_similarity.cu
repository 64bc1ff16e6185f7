// attentive_similarity on CUDA: the local-window part of the attentive similarity loss.
// Formulas, gradients and layout: csrc/attentive_similarity.h, whose per-token functions this
// file runs verbatim (the CPU tests exercise the same arithmetic).
// Decomposition: one thread per token (grid-stride over B * n, int64 indices); a thread gathers
// its (2r+1)^2 window in runs of ASL_CHUNK neighbours and writes only its own token's outputs:
// no atomics, deterministic. The backward takes one head at a time, its dq/dk accumulators in a
// thread-local array of 2 * DMAX (32/64/128) values. Per-token partials of dL/dalpha, dL/dbeta are
// summed by ATen.
// q, k (and dq, dk) are handed to the kernels dim-major, (B, heads, D, n): the threads of a warp
// are consecutive tokens, so each load of one dimension is 32 consecutive values (coalesced). In
// the token-major layout the same load touched 32 rows D values apart. tests/cuda_emulation runs
// the dim-major row functions on the host against the CPU kernel.
//
// Includes only CUDA and ATen/c10 core headers (compiled by `nvcc -c` in the test suite).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "attentive_similarity.h"
#include "attentive_similarity_inputs.h"
#include "cuda/launch.cuh"

namespace attenscribble_ops {
namespace {

constexpr int kThreads = 128;

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    attentive_similarity_forward_kernel(const window::Args<acc_t> a, acc_t* __restrict__ rows, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads)
    rows[i] = window::row_loss<true>(a, i / a.n, i % a.n);
}

template <typename acc_t, int DMAX>
__global__ void __launch_bounds__(kThreads)
    attentive_similarity_backward_kernel(const window::Args<acc_t> a, const window::Grads<acc_t> g, int64_t total) {
  // one head at a time: its accumulators (2 * DMAX values) stay in thread-local memory
  acc_t scratch[2 * DMAX + 2 * ASL_CHUNK + 2];
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads)
    window::row_backward<true>(a, g, i / a.n, i % a.n, int64_t(1), scratch);
}

unsigned blocks_for(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
}

// q or k of the prepared inputs, dim-major: (B, heads, D, n) contiguous.
at::Tensor dim_major(const at::Tensor& x) { return x.transpose(2, 3).contiguous(); }

struct CudaWindow {
  using Sweeps = CudaSweeps;

  static at::Tensor forward(const Prepared& p, int64_t radius, double sigma, double logit_scale) {
    c10::DeviceGuard guard(p.q.device());
    at::Tensor rows = at::empty({p.batch, p.n}, p.q.options());
    const int64_t total = p.batch * p.n;
    const cudaStream_t stream = current_stream(p.q.device());
    const at::Tensor q = dim_major(p.q), k = dim_major(p.k);
    AT_DISPATCH_FLOATING_TYPES(p.acc, "attentive_similarity_forward_cuda", [&] {
      window::Args<scalar_t> a = make_args<scalar_t>(p, radius, sigma, logit_scale);
      a.q = q.const_data_ptr<scalar_t>();
      a.k = k.const_data_ptr<scalar_t>();
      attentive_similarity_forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          a, rows.data_ptr<scalar_t>(), total);
    });
    check_launch("attentive_similarity_forward");
    return rows;
  }

  static WindowGrads backward(const Prepared& p, const at::Tensor& gamma, int64_t radius, double sigma,
                              double logit_scale) {
    TORCH_CHECK_VALUE(p.dim <= 128, "attentive_similarity (cuda): head dims up to 128 are supported, got ", p.dim);
    c10::DeviceGuard guard(p.q.device());
    WindowGrads r{at::Tensor(), at::Tensor(), at::empty_like(p.lse),
                  at::empty_like(p.probs), at::empty_like(p.lse), at::empty({p.batch, p.n}, p.q.options())};
    at::Tensor q = dim_major(p.q), k = dim_major(p.k);
    at::Tensor dq = at::empty_like(q), dk = at::empty_like(k);  // dim-major as q, k
    const int64_t total = p.batch * p.n;
    const cudaStream_t stream = current_stream(p.q.device());
    AT_DISPATCH_FLOATING_TYPES(p.acc, "attentive_similarity_backward_cuda", [&] {
      window::Args<scalar_t> a = make_args<scalar_t>(p, radius, sigma, logit_scale);
      a.q = q.const_data_ptr<scalar_t>();
      a.k = k.const_data_ptr<scalar_t>();
      window::Grads<scalar_t> g;
      g.dq = dq.data_ptr<scalar_t>();
      g.dk = dk.data_ptr<scalar_t>();
      g.dlse = r.dlse.data_ptr<scalar_t>();
      g.dprobs = r.dprobs.data_ptr<scalar_t>();
      g.dalpha = r.dalpha.data_ptr<scalar_t>();
      g.dbeta = r.dbeta.data_ptr<scalar_t>();
      g.grad_rows = gamma.const_data_ptr<scalar_t>();
      const unsigned blocks = blocks_for(total);
      if (p.dim <= 32)
        attentive_similarity_backward_kernel<scalar_t, 32><<<blocks, kThreads, 0, stream>>>(a, g, total);
      else if (p.dim <= 64)
        attentive_similarity_backward_kernel<scalar_t, 64><<<blocks, kThreads, 0, stream>>>(a, g, total);
      else
        attentive_similarity_backward_kernel<scalar_t, 128><<<blocks, kThreads, 0, stream>>>(a, g, total);
    });
    check_launch("attentive_similarity_backward");
    // back to (B, heads, n, D) contiguous, as the callers take them. Each buffer is released as
    // soon as it is done with (stream-ordered, so before the kernel has finished is fine): the
    // peak stays at the caller's q, k plus two more pairs of buffers of their size.
    q.reset();
    k.reset();
    r.dq = dim_major(dq);
    dq.reset();
    r.dk = dim_major(dk);
    return r;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(attenscribble_ops, CUDA, m) {
  m.impl("attentive_similarity_forward", &window_forward_op<CudaWindow>);
  m.impl("attentive_similarity_backward", &window_backward_op<CudaWindow>);
  m.impl("attentive_similarity_fused_forward", &fused_forward_op<CudaWindow>);
  m.impl("attentive_similarity_fused_backward", &fused_backward_op<CudaWindow>);
}

}  // namespace attenscribble_ops
