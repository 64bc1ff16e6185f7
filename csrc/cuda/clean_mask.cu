// clean_mask on CUDA: out = (isnan(m) || m < 1) ? 0 : m, cast to `dtype`.
// One thread per element (grid-stride, int64 indices); the input is made contiguous first.
// Includes only CUDA and ATen/c10 core headers, so `nvcc -c` compiles it without a CUDA build of
// torch (the test suite does exactly that); the stream comes from c10's device-generic API.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "cuda/launch.cuh"

namespace attenscribble_ops {
namespace {

template <typename in_t, typename out_t>
__global__ void clean_mask_kernel(const in_t* __restrict__ in, out_t* __restrict__ out, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // double inputs stay double until the final cast; everything narrower goes through float
    using acc_t = typename std::conditional<std::is_same<in_t, double>::value, double, float>::type;
    const acc_t v = static_cast<acc_t>(in[i]);
    out[i] = (isnan(v) || v < acc_t(1)) ? out_t(0) : static_cast<out_t>(v);
  }
}

}  // namespace

at::Tensor clean_mask_cuda(const at::Tensor& mask, at::ScalarType dtype) {
  TORCH_CHECK(mask.device().is_cuda(), "clean_mask_cuda: mask must be a CUDA tensor");
  TORCH_CHECK(at::isFloatingType(dtype), "clean_mask: dtype must be a floating type, got ", dtype);
  c10::DeviceGuard guard(mask.device());
  const at::Tensor in = mask.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(dtype));
  const int64_t numel = in.numel();
  if (numel == 0) return out;
  const cudaStream_t stream = current_stream(mask.device());
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((numel + threads - 1) / threads, 65535));
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, in.scalar_type(), "clean_mask_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "clean_mask_out", [&] {
      clean_mask_kernel<in_t, scalar_t><<<blocks, threads, 0, stream>>>(
          in.const_data_ptr<in_t>(), out.data_ptr<scalar_t>(), numel);
    });
  });
  check_launch("clean_mask");
  return out;
}

TORCH_LIBRARY_IMPL(attenscribble_ops, CUDA, m) {
  m.impl("clean_mask", &clean_mask_cuda);
}

}  // namespace attenscribble_ops
