// Portable inline math shared by the CPU and CUDA kernels (plain C++; __host__ __device__ under nvcc).
//
// exp_f32(x) = 2^k e^r with k = round(x / ln 2) (the 1.5 * 2^23 rounding trick, which vectorises
// on every instruction set), r = x - k ln 2 (ln 2 split in two so k * ln2_hi is exact), and e^r by
// its Taylor series to degree 7: |r| <= ln(2)/2 bounds the truncation by 0.35^8 / 8! < 6e-9
// relative, below fp32 rounding. Inputs below -87 (where 2^k leaves the normal range) give 0;
// inputs above 88 are clamped (the kernels only exponentiate logits minus a maximum or an LSE,
// and sigmoid's exp(-z), where a clamp instead of inf changes the result by < 1e-38).
// On the host it replaces libm's expf in the hot loops: inlined, no call, vectorisable.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define ASL_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always inlined, so that each instruction-set clone of the CPU loops compiles its own copy
#define ASL_HOST_DEVICE __attribute__((always_inline)) inline
#else
#define ASL_HOST_DEVICE inline
#endif

namespace attenscribble_ops {

ASL_HOST_DEVICE float exp_f32(float x) {
  x = x > 88.0f ? 88.0f : x;
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float k = shifted - 12582912.0f;
  const float r = (x - k * 0.693359375f) - k * -2.12194440054690583e-4f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^k: k sits in the low mantissa bits of `shifted` (1.5 * 2^23 + k, exact for |k| < 2^22), so
  // its exponent bits come from those, in unsigned arithmetic, defined for every x: below -87 the
  // result is 0 whatever they are, and a NaN x makes p NaN. The former conversion of k to int
  // overflowed the exponent bits' product for x below about -266, and was itself undefined below
  // about -1.5e9 (UndefinedBehaviorSanitizer, `make test-sanitize`).
  uint32_t shifted_bits;
  memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  const uint32_t bits = (shifted_bits - 0x4B400000u + 127u) << 23;
  float two_k;
  memcpy(&two_k, &bits, sizeof two_k);
  return x < -87.0f ? 0.0f : p * two_k;
}

// exp in the accumulation type: fp32 through exp_f32 on the host and the hardware exp on the GPU;
// fp64 through the C library (fp64 is the verification path).
ASL_HOST_DEVICE float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return exp_f32(x);
#endif
}
ASL_HOST_DEVICE double exp_acc(double x) { return ::exp(x); }

// a * b rounded before whatever it is added to: never fused into an FMA. The softmax exponents
// s x - lse need it to cancel the way the reference's do: for a row's maximum the exponent is then
// exactly 0 in the forward, where an FMA leaves the rounding error of s x, up to half an ulp of the
// logit (512 at 1e10 in fp32; README, Large logit scales). On the GPU __fmul_rn is the product the
// compiler may not contract (nvcc fuses by default, and --use_fast_math keeps that); on the host
// the extension compiles with -ffp-contract=off (setup.py), so a plain product is already rounded.
ASL_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ASL_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

}  // namespace attenscribble_ops
