// clean_mask on the CPU: out = (isnan(m) || m < 1) ? 0 : m, cast to `dtype`.
// Layout: any strides in, a contiguous tensor of the same shape out. One pass, at::parallel_for
// over flat index ranges.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

namespace attenscribble_ops {
namespace {

template <typename in_t, typename out_t>
void clean_mask_kernel(const in_t* in, out_t* out, int64_t numel) {
  at::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double v = static_cast<double>(in[i]);
      out[i] = (std::isnan(v) || v < 1.0) ? out_t(0) : static_cast<out_t>(v);
    }
  });
}

}  // namespace

at::Tensor clean_mask_cpu(const at::Tensor& mask, at::ScalarType dtype) {
  TORCH_CHECK(mask.device().is_cpu(), "clean_mask_cpu: mask must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(dtype), "clean_mask: dtype must be a floating type, got ", dtype);
  TORCH_CHECK(!at::isComplexType(mask.scalar_type()), "clean_mask: mask must be real, got ",
              mask.scalar_type());
  const at::Tensor in = mask.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(dtype));
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, in.scalar_type(), "clean_mask_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "clean_mask_out", [&] {
      clean_mask_kernel<in_t, scalar_t>(in.const_data_ptr<in_t>(), out.data_ptr<scalar_t>(), in.numel());
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(attenscribble_ops, CPU, m) {
  m.impl("clean_mask", &clean_mask_cpu);
}

}  // namespace attenscribble_ops
