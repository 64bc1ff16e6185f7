// spatial_attention on CUDA: attention with the similarity normaliser, O(n) memory.
//
// Forward, per (b, head), c = D^-1/2, s = logit_scale, Lambda = q k^T:
//   lse_sim = logsumexp_j(s Lambda_ij),  lse_attn = logsumexp_j(c Lambda_ij),  out = exp(c Lambda - lse_attn) v
// Backward (delta_i = dout_i . out_i - dlse_attn_i, computed by the shared entry point):
//   dLambda = c P o (dout v^T - delta) + s dlse_sim o exp(s Lambda - lse_sim)
//   dq = dLambda k (kernel over query rows),  dk = dLambda^T q, dv = P^T dout (kernel over key rows)
// Two kernels instead of atomics: deterministic. HAS_V = false is the LSE-only pair.
//
// Layout: (B * heads, n, D) contiguous in the accumulation type (fp32; fp64 for fp64), LSEs (B * heads, n).
// Decomposition: grid (ceil(n / 64), B * heads), one thread per query row (dq kernel: per query
// row; dk/dv kernel: per key row) with its row, accumulators and running max/sum in registers;
// the other operand streams through shared memory in tiles of 16 KiB per array, read by every
// thread at the same address (broadcast, no bank conflicts). Head dims up to 128 (DMAX buckets
// 32/64/128; padding lanes are zero). Plain FMA, no tensor cores and no tf32: exact fp32 dots.
// The Triton backend is the tensor-core path. The exponents' products s x and c x are rounded
// before the maximum or LSE is subtracted (mul_rn, never an FMA), as the reference rounds them.
//
// Includes only CUDA and ATen/c10 core headers (compiled by `nvcc -c` in the test suite).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>
#include <math.h>

#include <algorithm>
#include <type_traits>

#include "cuda/launch.cuh"
#include "fast_math.h"
#include "spatial_attention_inputs.h"

namespace attenscribble_ops {
namespace {

constexpr int kThreads = 64;
constexpr int kTileBytes = 16384;

template <typename acc_t, int DMAX>
struct Tile {
  static constexpr int rows = kTileBytes / (DMAX * static_cast<int>(sizeof(acc_t)));
};

// Rows [r0, r0 + count) of a (n, dim) slice into shared memory, zero-padded to DMAX and `rows`.
template <typename acc_t, int DMAX, int ROWS>
__device__ void load_tile(acc_t (*dst)[DMAX], const acc_t* src, int64_t r0, int count, int64_t dim) {
  for (int idx = threadIdx.x; idx < ROWS * DMAX; idx += blockDim.x) {
    const int r = idx / DMAX, d = idx - r * DMAX;
    dst[r][d] = (r < count && d < dim) ? src[(r0 + r) * dim + d] : acc_t(0);
  }
}

template <typename acc_t, int DMAX>
__device__ __forceinline__ acc_t dot_row(const acc_t* a, const acc_t* b) {
  acc_t x = 0;
#pragma unroll
  for (int d = 0; d < DMAX; ++d) x += a[d] * b[d];
  return x;
}

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }

// Online log-sum-exp: (m, l) holds max and sum of exp(x - m) of the values seen so far.
template <typename acc_t>
__device__ __forceinline__ void online_lse(acc_t& m, acc_t& l, acc_t x) {
  if (x > m) {
    l = l * exp_(m - x) + acc_t(1);  // exp(-inf) = 0 on the first value
    m = x;
  } else {
    l += exp_(x - m);
  }
}

template <typename acc_t, int DMAX, bool HAS_V>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ k, const acc_t* __restrict__ v,
                             acc_t* __restrict__ out, acc_t* __restrict__ lse_attn, acc_t* __restrict__ lse_sim,
                             int64_t n, int64_t dim, int64_t dv, acc_t c, acc_t s, int64_t bh0) {
  constexpr int BN = Tile<acc_t, DMAX>::rows;
  __shared__ acc_t ks[BN][DMAX];
  __shared__ acc_t vs[HAS_V ? BN : 1][DMAX];
  const int64_t bh = bh0 + blockIdx.y, i = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const bool active = i < n;
  acc_t qr[DMAX], o[HAS_V ? DMAX : 1];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) qr[d] = (active && d < dim) ? q[(bh * n + i) * dim + d] : acc_t(0);
#pragma unroll
  for (int d = 0; d < (HAS_V ? DMAX : 1); ++d) o[d] = 0;
  acc_t m_s = -INFINITY, l_s = 0, m_a = -INFINITY, l_a = 0;
  for (int64_t j0 = 0; j0 < n; j0 += BN) {
    const int count = static_cast<int>(n - j0 < BN ? n - j0 : BN);
    __syncthreads();  // the previous tile is no longer read
    load_tile<acc_t, DMAX, BN>(ks, k + bh * n * dim, j0, count, dim);
    if constexpr (HAS_V) load_tile<acc_t, DMAX, BN>(vs, v + bh * n * dv, j0, count, dv);
    __syncthreads();
    for (int j = 0; j < count; ++j) {
      const acc_t x = dot_row<acc_t, DMAX>(qr, ks[j]);
      online_lse(m_s, l_s, mul_rn(s, x));
      if constexpr (HAS_V) {
        const acc_t xa = mul_rn(c, x);
        if (xa > m_a) {  // new maximum: rescale what was accumulated
          const acc_t scale = exp_(m_a - xa);
          l_a = l_a * scale + acc_t(1);
#pragma unroll
          for (int d = 0; d < DMAX; ++d) o[d] = o[d] * scale + vs[j][d];
          m_a = xa;
        } else {
          const acc_t p = exp_(xa - m_a);
          l_a += p;
#pragma unroll
          for (int d = 0; d < DMAX; ++d) o[d] += p * vs[j][d];
        }
      }
    }
  }
  if (!active) return;
  lse_sim[bh * n + i] = m_s + log(l_s);
  if constexpr (HAS_V) {
    lse_attn[bh * n + i] = m_a + log(l_a);
    for (int d = 0; d < dv; ++d) out[(bh * n + i) * dv + d] = o[d] / l_a;
  }
}

// dq for one query row per thread. dlse_sim may be null (no similarity gradient).
template <typename acc_t, int DMAX, bool HAS_V>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dq_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ k,
                                 const acc_t* __restrict__ v, const acc_t* __restrict__ dout,
                                 const acc_t* __restrict__ delta, const acc_t* __restrict__ lse_attn,
                                 const acc_t* __restrict__ lse_sim, const acc_t* __restrict__ dlse_sim,
                                 acc_t* __restrict__ dq, int64_t n, int64_t dim, int64_t dv, acc_t c, acc_t s,
                                 bool accumulate, int64_t bh0) {
  constexpr int BN = Tile<acc_t, DMAX>::rows;
  __shared__ acc_t ks[BN][DMAX];
  __shared__ acc_t vs[HAS_V ? BN : 1][DMAX];
  const int64_t bh = bh0 + blockIdx.y, i = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const bool active = i < n;
  const int64_t row = bh * n + (active ? i : 0);
  acc_t qr[DMAX], dor[HAS_V ? DMAX : 1], acc[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) {
    qr[d] = (active && d < dim) ? q[row * dim + d] : acc_t(0);
    acc[d] = 0;
  }
  acc_t la = 0, dl = 0;
  if constexpr (HAS_V) {
#pragma unroll
    for (int d = 0; d < DMAX; ++d) dor[d] = (active && d < dv) ? dout[row * dv + d] : acc_t(0);
    la = lse_attn[row];
    dl = delta[row];
  }
  const acc_t ls = lse_sim[row], sd = dlse_sim ? s * dlse_sim[row] : acc_t(0);
  for (int64_t j0 = 0; j0 < n; j0 += BN) {
    const int count = static_cast<int>(n - j0 < BN ? n - j0 : BN);
    __syncthreads();
    load_tile<acc_t, DMAX, BN>(ks, k + bh * n * dim, j0, count, dim);
    if constexpr (HAS_V) load_tile<acc_t, DMAX, BN>(vs, v + bh * n * dv, j0, count, dv);
    __syncthreads();
    for (int j = 0; j < count; ++j) {
      const acc_t x = dot_row<acc_t, DMAX>(qr, ks[j]);
      acc_t ds = 0;
      if constexpr (HAS_V) ds = c * exp_(mul_rn(c, x) - la) * (dot_row<acc_t, DMAX>(dor, vs[j]) - dl);
      if (dlse_sim) ds += sd * exp_(mul_rn(s, x) - ls);
#pragma unroll
      for (int d = 0; d < DMAX; ++d) acc[d] += ds * ks[j][d];
    }
  }
  if (!active) return;
  for (int d = 0; d < dim; ++d) dq[row * dim + d] = accumulate ? dq[row * dim + d] + acc[d] : acc[d];
}

// dk (and dv) for one key row per thread.
template <typename acc_t, int DMAX, bool HAS_V>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dkdv_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ k,
                                   const acc_t* __restrict__ v, const acc_t* __restrict__ dout,
                                   const acc_t* __restrict__ delta, const acc_t* __restrict__ lse_attn,
                                   const acc_t* __restrict__ lse_sim, const acc_t* __restrict__ dlse_sim,
                                   acc_t* __restrict__ dk, acc_t* __restrict__ dvo, int64_t n, int64_t dim,
                                   int64_t dv, acc_t c, acc_t s, bool accumulate, int64_t bh0) {
  constexpr int BM = Tile<acc_t, DMAX>::rows;
  __shared__ acc_t qs[BM][DMAX];
  __shared__ acc_t dos[HAS_V ? BM : 1][DMAX];
  __shared__ acc_t row_lse_a[BM], row_delta[BM], row_lse_s[BM], row_sd[BM];
  const int64_t bh = bh0 + blockIdx.y, j = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const bool active = j < n;
  const int64_t col = bh * n + (active ? j : 0);
  acc_t kr[DMAX], vr[HAS_V ? DMAX : 1], gk[DMAX], gv[HAS_V ? DMAX : 1];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) {
    kr[d] = (active && d < dim) ? k[col * dim + d] : acc_t(0);
    gk[d] = 0;
  }
  if constexpr (HAS_V) {
#pragma unroll
    for (int d = 0; d < DMAX; ++d) {
      vr[d] = (active && d < dv) ? v[col * dv + d] : acc_t(0);
      gv[d] = 0;
    }
  }
  for (int64_t i0 = 0; i0 < n; i0 += BM) {
    const int count = static_cast<int>(n - i0 < BM ? n - i0 : BM);
    __syncthreads();
    load_tile<acc_t, DMAX, BM>(qs, q + bh * n * dim, i0, count, dim);
    if constexpr (HAS_V) load_tile<acc_t, DMAX, BM>(dos, dout + bh * n * dv, i0, count, dv);
    for (int r = threadIdx.x; r < count; r += blockDim.x) {
      const int64_t row = bh * n + i0 + r;
      row_lse_s[r] = lse_sim[row];
      row_sd[r] = dlse_sim ? s * dlse_sim[row] : acc_t(0);
      if constexpr (HAS_V) {
        row_lse_a[r] = lse_attn[row];
        row_delta[r] = delta[row];
      }
    }
    __syncthreads();
    for (int r = 0; r < count; ++r) {
      const acc_t x = dot_row<acc_t, DMAX>(qs[r], kr);
      acc_t ds = 0;
      if constexpr (HAS_V) {
        const acc_t p = exp_(mul_rn(c, x) - row_lse_a[r]);
#pragma unroll
        for (int d = 0; d < DMAX; ++d) gv[d] += p * dos[r][d];
        ds = c * p * (dot_row<acc_t, DMAX>(dos[r], vr) - row_delta[r]);
      }
      if (dlse_sim) ds += row_sd[r] * exp_(mul_rn(s, x) - row_lse_s[r]);
#pragma unroll
      for (int d = 0; d < DMAX; ++d) gk[d] += ds * qs[r][d];
    }
  }
  if (!active) return;
  for (int d = 0; d < dim; ++d) dk[col * dim + d] = accumulate ? dk[col * dim + d] + gk[d] : gk[d];
  if constexpr (HAS_V)
    for (int d = 0; d < dv; ++d) dvo[col * dv + d] = gv[d];
}

template <typename F>
void with_dmax(int64_t width, F&& f) {
  if (width <= 32) f(std::integral_constant<int, 32>());
  else if (width <= 64) f(std::integral_constant<int, 64>());
  else f(std::integral_constant<int, 128>());
}

// CUDA's limit on grid.y: the B * heads slices are launched in chunks of at most this many, the
// kernels adding the chunk's first slice bh0 to blockIdx.y.
constexpr int64_t kMaxGridY = 65535;

// Calls launch(grid, bh0) for every chunk of the bh slices of n rows.
template <typename F>
void over_slices(int64_t n, int64_t bh, F&& launch) {
  for (int64_t bh0 = 0; bh0 < bh; bh0 += kMaxGridY)
    launch(dim3(static_cast<unsigned>((n + kThreads - 1) / kThreads),
                static_cast<unsigned>(std::min(kMaxGridY, bh - bh0))),
           bh0);
}

const void* maybe(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace

void attention_forward_sweep_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                  at::Tensor& lse_attn, at::Tensor& lse_sim, double c, double s) {
  const int64_t n = q.size(1), dim = q.size(2), dv = v.defined() ? v.size(2) : dim;
  TORCH_CHECK_VALUE(std::max(dim, dv) <= 128, "spatial_attention (cuda): head dims up to 128 are supported, got ",
                    std::max(dim, dv));
  c10::DeviceGuard guard(q.device());
  const cudaStream_t stream = current_stream(q.device());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "spatial_attention_forward_cuda", [&] {
    with_dmax(std::max(dim, dv), [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      const auto* qp = q.const_data_ptr<scalar_t>();
      const auto* kp = k.const_data_ptr<scalar_t>();
      over_slices(n, q.size(0), [&](dim3 grid, int64_t bh0) {
        if (v.defined())
          attention_forward_kernel<scalar_t, DMAX, true><<<grid, kThreads, 0, stream>>>(
              qp, kp, v.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse_attn.data_ptr<scalar_t>(),
              lse_sim.data_ptr<scalar_t>(), n, dim, dv, scalar_t(c), scalar_t(s), bh0);
        else
          attention_forward_kernel<scalar_t, DMAX, false><<<grid, kThreads, 0, stream>>>(
              qp, kp, nullptr, nullptr, nullptr, lse_sim.data_ptr<scalar_t>(), n, dim, dim, scalar_t(c),
              scalar_t(s), bh0);
      });
    });
  });
  check_launch("spatial_attention_forward");
}

void attention_backward_sweep_cuda(const AttentionGrads& in, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                   double c, double s, bool accumulate) {
  const int64_t n = in.q.size(1), dim = in.q.size(2), dvw = in.v.defined() ? in.v.size(2) : dim;
  TORCH_CHECK_VALUE(std::max(dim, dvw) <= 128, "spatial_attention (cuda): head dims up to 128 are supported");
  c10::DeviceGuard guard(in.q.device());
  const cudaStream_t stream = current_stream(in.q.device());
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "spatial_attention_backward_cuda", [&] {
    using T = scalar_t;
    const T* qp = in.q.const_data_ptr<T>();
    const T* kp = in.k.const_data_ptr<T>();
    const T* vp = static_cast<const T*>(maybe(in.v));
    const T* dop = static_cast<const T*>(maybe(in.dout));
    const T* dlt = static_cast<const T*>(maybe(in.delta));
    const T* la = static_cast<const T*>(maybe(in.lse_attn));
    const T* ls = in.lse_sim.const_data_ptr<T>();
    const T* dls = static_cast<const T*>(maybe(in.dlse_sim));
    with_dmax(std::max(dim, dvw), [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      over_slices(n, in.q.size(0), [&](dim3 grid, int64_t bh0) {
        if (in.v.defined()) {
          attention_backward_dq_kernel<T, DMAX, true><<<grid, kThreads, 0, stream>>>(
              qp, kp, vp, dop, dlt, la, ls, dls, dq.data_ptr<T>(), n, dim, dvw, T(c), T(s), accumulate, bh0);
          attention_backward_dkdv_kernel<T, DMAX, true><<<grid, kThreads, 0, stream>>>(
              qp, kp, vp, dop, dlt, la, ls, dls, dk.data_ptr<T>(), dv.data_ptr<T>(), n, dim, dvw, T(c), T(s),
              accumulate, bh0);
        } else {
          attention_backward_dq_kernel<T, DMAX, false><<<grid, kThreads, 0, stream>>>(
              qp, kp, nullptr, nullptr, nullptr, nullptr, ls, dls, dq.data_ptr<T>(), n, dim, dim, T(c), T(s),
              accumulate, bh0);
          attention_backward_dkdv_kernel<T, DMAX, false><<<grid, kThreads, 0, stream>>>(
              qp, kp, nullptr, nullptr, nullptr, nullptr, ls, dls, dk.data_ptr<T>(), nullptr, n, dim, dim, T(c),
              T(s), accumulate, bh0);
        }
      });
    });
  });
  check_launch("spatial_attention_backward");
}

TORCH_LIBRARY_IMPL(attenscribble_ops, CUDA, m) {
  m.impl("spatial_attention_forward", &attention_forward<CudaSweeps>);
  m.impl("spatial_attention_backward", &attention_backward<CudaSweeps>);
  m.impl("spatial_attention_backward_accumulate", &attention_backward_accumulate<CudaSweeps>);
  m.impl("spatial_attention_lse", &attention_lse<CudaSweeps>);
  m.impl("spatial_attention_lse_backward", &attention_lse_backward<CudaSweeps>);
}

}  // namespace attenscribble_ops
