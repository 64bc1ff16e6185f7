// Masked CRF loss on the CPU: one fused pass that evaluates the window on the fly and gives the
// loss and, with with_grad, its gradient; memory O(inputs): nothing (2r+1)^d-sized is stored.
//
// Loss:     raw = sum_i m_i (S_i + border_i - sum_c P_ic A_ic)        (Potts)
//           raw = sum_i m_i sum_c P_ic (mu A_i)_c                     (compatibility mu)
// Gradient: dP_kc = -(m_k A_kc + msrc_k B_kc)                          (Potts)
//           dP_kc =   m_k (mu A_k)_c + msrc_k (mu^T B_k)_c            (compatibility)
// with S, A, B the window sums of csrc/cpu/masked_crf_rows.inc. The gradient is a gather: every
// pixel sums its own window in both mask roles (the Gaussian part of the kernel is symmetric),
// so no two tasks write the same element and nothing is atomic. Autograd multiplies it by the
// upstream gradient (attenscribble_ops/_crf_ops.py).
//
// Layout: probs (B, C, [D,] H, W) in any float dtype, made contiguous; image (B, F, ...),
// masks (B, 1, ...) and mu (C, C) in the accumulate dtype (float, double for double probs).
// Parallel: at::parallel_for over output rows (b, z, y), one scratch set per task. The loss is
// reduced deterministically: one double partial per row, summed in row order afterwards, so
// the result does not depend on the number of threads.
//
// Instruction sets: the row engine is compiled twice from the same source, for the baseline ISA
// (16-byte vectors) and for AVX2 + FMA (32-byte vectors, fused multiply-adds: the exp
// polynomial is a chain of them), picked at run time unless ATTENSCRIBBLE_CPU_ISA=baseline; the
// build flags stay those of the package (GCC only: Clang does not honour "#pragma GCC target"
// and gets the baseline build). Each build is deterministic and independent of the
// thread count; the two differ from each other in the last bits where FMA rounds once.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "masked_crf.h"

namespace attenscribble_ops {
#define ATTENSCRIBBLE_VEC_BYTES 16
namespace crf_baseline {
#include "cpu/vec_exp.inc"
#include "cpu/masked_crf_simd.inc"
#include "cpu/masked_crf_rows.inc"
}  // namespace crf_baseline
#undef ATTENSCRIBBLE_VEC_BYTES

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define ATTENSCRIBBLE_CRF_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// The extension compiles with -ffp-contract=off (setup.py: the attention's exponents must round as
// the reference's do); the CRF's sums of Gaussians do not cancel, so its AVX2 path keeps its FMAs.
#pragma GCC optimize("fp-contract=fast")
#define ATTENSCRIBBLE_VEC_BYTES 32
namespace crf_avx2 {
#include "cpu/vec_exp.inc"
#include "cpu/masked_crf_simd.inc"
#include "cpu/masked_crf_rows.inc"
}  // namespace crf_avx2
#undef ATTENSCRIBBLE_VEC_BYTES
#pragma GCC pop_options
#else
#define ATTENSCRIBBLE_CRF_AVX2 0
#endif

namespace {

bool use_avx2() {
#if ATTENSCRIBBLE_CRF_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* isa = std::getenv("ATTENSCRIBBLE_CPU_ISA");
  return supported && !(isa != nullptr && std::strcmp(isa, "baseline") == 0);
#else
  return false;
#endif
}

template <typename acc_t>
const acc_t* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

template <typename Rows>
Rows make_rows(const CrfInputs& in, c10::ArrayRef<double> table) {
  using scalar_t = typename Rows::scalar_type;
  using acc_t = typename Rows::acc_t;
  return Rows(in.geo, table, in.probs.const_data_ptr<scalar_t>(), optional_data<acc_t>(in.image),
              optional_data<acc_t>(in.mask_dst), optional_data<acc_t>(in.mask_src), optional_data<acc_t>(in.compat));
}

// The loss (rows summed in row order) and, with `grad`, the gradient of every row.
template <typename Rows, typename Scratch>
double run_rows(const CrfInputs& in, c10::ArrayRef<double> table, typename Rows::acc_t* grad) {
  const Rows rows = make_rows<Rows>(in, table);
  std::vector<double> partial(rows.rows());
  at::parallel_for(0, rows.rows(), 1, [&](int64_t begin, int64_t end) {
    Scratch scratch = rows.scratch();
    for (int64_t r = begin; r < end; ++r) partial[r] = rows.row(r, grad, scratch);
  });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

template <typename scalar_t>
double dispatch_isa(const CrfInputs& in, c10::ArrayRef<double> table, at::opmath_type<scalar_t>* grad) {
  using acc_t = at::opmath_type<scalar_t>;
#if ATTENSCRIBBLE_CRF_AVX2
  if (use_avx2()) return run_rows<crf_avx2::Rows<scalar_t>, crf_avx2::Scratch<acc_t>>(in, table, grad);
#endif
  return run_rows<crf_baseline::Rows<scalar_t>, crf_baseline::Scratch<acc_t>>(in, table, grad);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_crf_forward_cpu(
    const at::Tensor& probs, const std::optional<at::Tensor>& image, const std::optional<at::Tensor>& mask_dst,
    const std::optional<at::Tensor>& mask_src, const std::optional<at::Tensor>& compat, c10::ArrayRef<double> table,
    c10::IntArrayRef radius, c10::ArrayRef<double> spacing, bool zero_padding, bool with_grad) {
  const CrfInputs in = masked_crf_inputs("masked_crf_forward", probs, image, mask_dst, mask_src, compat, table,
                                         radius, spacing, zero_padding);
  TORCH_CHECK(probs.device().is_cpu(), "masked_crf_forward: the CPU kernel needs CPU tensors, got ", probs.device());
  const at::TensorOptions acc = probs.options().dtype(crf_accumulate_type(probs.scalar_type()));
  at::Tensor loss = at::empty({}, acc);
  at::Tensor grad = with_grad ? at::empty(in.probs.sizes(), acc) : at::empty({0}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.probs.scalar_type(), "masked_crf_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const double total = dispatch_isa<scalar_t>(in, table, with_grad ? grad.data_ptr<acc_t>() : nullptr);
    *loss.data_ptr<acc_t>() = static_cast<acc_t>(total);
  });
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(attenscribble_ops, CPU, m) {
  m.impl("masked_crf_forward", &masked_crf_forward_cpu);
}

}  // namespace attenscribble_ops
