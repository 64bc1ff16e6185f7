// Masked CRF loss on CUDA: the loss and (with_grad) its gradient in one fused pass, the window
// evaluated on the fly from shared-memory tiles with a halo. The maths, layout and parallel
// decomposition are above the block program in csrc/cuda/masked_crf_tile.cuh (shared with a
// host emulation that the tests run without a GPU); this file holds the launches and the
// operator registration.
//
// Memory: nothing beyond the inputs, the gradient, one partial per 32 x 8 tile and a device copy
// of the (K, 2 + F) descriptor table. No host synchronisation: the table is copied from pinned
// memory asynchronously.
// Includes only CUDA + ATen/c10 core headers, like clean_mask.cu, so that `nvcc -c` compiles it
// against a CPU build of torch (the test suite does).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>

#include "cuda/launch.cuh"
#include "cuda/masked_crf_tile.cuh"
#include "masked_crf.h"

namespace attenscribble_ops {
namespace {

using crf_tile::Args;
using crf_tile::kThreads;

struct DeviceSync {
  __device__ void operator()() const { __syncthreads(); }
};

template <int CC, bool WithGrad, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) masked_crf_kernel(const Args<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ acc_t red[kThreads];
  DeviceSync sync;
  crf_tile::run_block<CC, WithGrad>(a, blockIdx.x, gridDim.x, threadIdx.x, reinterpret_cast<acc_t*>(shared_raw), red,
                                   sync);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) masked_crf_sum_kernel(const acc_t* partial, int64_t count, acc_t* out) {
  __shared__ double red[kThreads];
  DeviceSync sync;
  crf_tile::sum_partials(partial, count, out, threadIdx.x, red, sync);
}

// Shared memory for the staged halo; the band shape in plan() keeps it within this, so no
// opt-in beyond the default 48 KiB per block is needed on any architecture.
constexpr int64_t kSharedBudget = 40 * 1024;

// The descriptor table on the device: filled in the accumulate dtype on the host, so that the
// copy is a plain asynchronous copy from pinned memory.
at::Tensor device_table(c10::ArrayRef<double> table, const at::Tensor& probs) {
  const at::ScalarType acc = crf_accumulate_type(probs.scalar_type());
  at::Tensor host = at::empty({static_cast<int64_t>(table.size())}, at::TensorOptions().dtype(acc).pinned_memory(true));
  if (acc == at::kDouble) {
    std::copy(table.begin(), table.end(), host.data_ptr<double>());
  } else {
    std::transform(table.begin(), table.end(), host.data_ptr<float>(), [](double v) { return static_cast<float>(v); });
  }
  return host.to(probs.options().dtype(acc), /*non_blocking=*/true);
}

template <typename scalar_t, typename acc_t>
Args<scalar_t, acc_t> make_args(const CrfInputs& in, const at::Tensor& table) {
  const CrfGeometry& g = in.geo;
  Args<scalar_t, acc_t> a;
  a.probs = in.probs.const_data_ptr<scalar_t>();
  a.image = in.image.defined() ? in.image.const_data_ptr<acc_t>() : nullptr;
  a.mask_dst = in.mask_dst.defined() ? in.mask_dst.const_data_ptr<acc_t>() : nullptr;
  a.mask_src = in.mask_src.defined() ? in.mask_src.const_data_ptr<acc_t>() : nullptr;
  a.mu = in.compat.defined() ? in.compat.const_data_ptr<acc_t>() : nullptr;
  a.table = table.const_data_ptr<acc_t>();
  a.batch = g.batch;
  a.classes = g.classes;
  a.channels = g.channels;
  a.kernels = g.kernels;
  a.depth = g.depth;
  a.height = g.height;
  a.width = g.width;
  a.rd = g.rd;
  a.rh = g.rh;
  a.rw = g.rw;
  a.sd = acc_t(g.sd);
  a.sh = acc_t(g.sh);
  a.sw = acc_t(g.sw);
  a.zero_padding = g.zero_padding;
  a.has_mask_dst = g.has_mask_dst;
  a.has_mask_src = g.has_mask_src;
  return a;
}

// Tiles are independent; a grid-stride loop covers any count with a grid that fits gridDim.x.
int grid_for(int64_t tiles) {
  return static_cast<int>(std::min<int64_t>(tiles, int64_t{1} << 30));
}

template <int CC, bool WithGrad, typename scalar_t, typename acc_t>
void launch(Args<scalar_t, acc_t>& a, cudaStream_t stream) {
  crf_tile::plan<CC>(a, WithGrad, kSharedBudget);
  const size_t shared = static_cast<size_t>(crf_tile::shared_bytes<CC>(a));
  masked_crf_kernel<CC, WithGrad><<<grid_for(a.tiles), kThreads, shared, stream>>>(a);
  check_launch("masked_crf_forward");
}

// Classes per chunk: the register accumulators of one thread.
template <bool WithGrad, typename scalar_t, typename acc_t>
void launch_chunked(Args<scalar_t, acc_t>& a, cudaStream_t stream) {
  if (a.classes <= 2) return launch<2, WithGrad>(a, stream);
  if (a.classes <= 4) return launch<4, WithGrad>(a, stream);
  launch<8, WithGrad>(a, stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_crf_forward_cuda(
    const at::Tensor& probs, const std::optional<at::Tensor>& image, const std::optional<at::Tensor>& mask_dst,
    const std::optional<at::Tensor>& mask_src, const std::optional<at::Tensor>& compat, c10::ArrayRef<double> table,
    c10::IntArrayRef radius, c10::ArrayRef<double> spacing, bool zero_padding, bool with_grad) {
  c10::DeviceGuard guard(probs.device());
  const CrfInputs in = masked_crf_inputs("masked_crf_forward", probs, image, mask_dst, mask_src, compat, table,
                                         radius, spacing, zero_padding);
  TORCH_CHECK(probs.device().is_cuda(), "masked_crf_forward: the CUDA kernel needs CUDA tensors, got ", probs.device());
  const at::Tensor device_params = device_table(table, probs);
  const at::TensorOptions acc = probs.options().dtype(crf_accumulate_type(probs.scalar_type()));
  at::Tensor loss = at::empty({}, acc);
  at::Tensor grad = with_grad ? at::empty(in.probs.sizes(), acc) : at::empty({0}, acc);
  const cudaStream_t stream = current_stream(probs.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.probs.scalar_type(), "masked_crf_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Args<scalar_t, acc_t> a = make_args<scalar_t, acc_t>(in, device_params);
    crf_tile::plan<2>(a, with_grad, kSharedBudget);  // the tile count does not depend on the chunk
    at::Tensor partial = at::empty({a.tiles}, acc);
    a.partial = partial.data_ptr<acc_t>();
    if (with_grad) {
      a.grad = grad.data_ptr<acc_t>();
      launch_chunked<true>(a, stream);
    } else {
      launch_chunked<false>(a, stream);
    }
    masked_crf_sum_kernel<acc_t><<<1, kThreads, 0, stream>>>(a.partial, a.tiles, loss.data_ptr<acc_t>());
    check_launch("masked_crf_forward (sum)");
  });
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(attenscribble_ops, CUDA, m) {
  m.impl("masked_crf_forward", &masked_crf_forward_cuda);
}

}  // namespace attenscribble_ops
