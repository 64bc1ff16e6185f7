// Element-wise passes over one row of logits for the CPU attention sweeps, fused so that each
// row of a tile is read once or twice instead of once per ATen op.
//
// Speed: the fp32 versions are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) with
// GCC's target_clones and picked at load time, so the package stays portable while the hot loops
// use the machine's widest vectors. Reductions keep kLanes independent partial results, which is
// what lets the compiler vectorise them without reassociating floating-point sums (no fast-math).
// The fp64 versions use std::exp: fp64 exists for verification, not speed.
//
// exp: exp_f32 of csrc/fast_math.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fast_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// static (one resolver per translation unit); "unused": each of the two files calls only some of them.
#define ASL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), unused))
#else
#define ASL_CPU_CLONES [[maybe_unused]]
#endif
// The bodies must be inlined into each clone to be compiled for its instruction set.
#if defined(__GNUC__)
#define ASL_INLINE __attribute__((always_inline)) inline
#else
#define ASL_INLINE inline
#endif

namespace attenscribble_ops {
namespace rowwise {

constexpr int kLanes = 16;

ASL_INLINE float exp_of(float x) { return exp_f32(x); }
ASL_INLINE double exp_of(double x) { return std::exp(x); }

template <typename T>
ASL_INLINE void max_min_impl(const T* x, int64_t n, T* mx, T* mn) {
  T hi[kLanes], lo[kLanes];
  for (int j = 0; j < kLanes; ++j) hi[j] = lo[j] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      hi[j] = x[i + j] > hi[j] ? x[i + j] : hi[j];
      lo[j] = x[i + j] < lo[j] ? x[i + j] : lo[j];
    }
  for (; i < n; ++i) {
    hi[0] = x[i] > hi[0] ? x[i] : hi[0];
    lo[0] = x[i] < lo[0] ? x[i] : lo[0];
  }
  for (int j = 1; j < kLanes; ++j) {
    hi[0] = hi[j] > hi[0] ? hi[j] : hi[0];
    lo[0] = lo[j] < lo[0] ? lo[j] : lo[0];
  }
  *mx = hi[0];
  *mn = lo[0];
}

// out[j] = exp(scale * x[j] - shift) (out may be null); returns sum_j exp(scale * x[j] - shift).
template <typename T>
ASL_INLINE T exp_sum_impl(T* out, const T* x, int64_t n, T scale, T shift) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const T e = exp_of(scale * x[i + j] - shift);
      if (out) out[i + j] = e;
      acc[j] += e;
    }
  for (; i < n; ++i) {
    const T e = exp_of(scale * x[i] - shift);
    if (out) out[i] = e;
    acc[0] += e;
  }
  T total = 0;
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

// Both sums of the attention forward in one read of x: out[j] = exp(c x[j] - shift_c);
// *sum_c = sum_j out[j], *sum_s = sum_j exp(s x[j] - shift_s).
template <typename T>
ASL_INLINE void exp_sum2_impl(T* out, const T* x, int64_t n, T c, T shift_c, T s, T shift_s, T* sum_c, T* sum_s) {
  T acc_c[kLanes] = {}, acc_s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const T e = exp_of(c * x[i + j] - shift_c);
      out[i + j] = e;
      acc_c[j] += e;
      acc_s[j] += exp_of(s * x[i + j] - shift_s);
    }
  for (; i < n; ++i) {
    const T e = exp_of(c * x[i] - shift_c);
    out[i] = e;
    acc_c[0] += e;
    acc_s[0] += exp_of(s * x[i] - shift_s);
  }
  T tc = 0, ts = 0;
  for (int j = 0; j < kLanes; ++j) {
    tc += acc_c[j];
    ts += acc_s[j];
  }
  *sum_c = tc;
  *sum_s = ts;
}

// out[j] = mult * exp(scale * x[j] - shift)
template <typename T>
ASL_INLINE void exp_store_impl(T* out, const T* x, int64_t n, T scale, T shift, T mult) {
  for (int64_t i = 0; i < n; ++i) out[i] = mult * exp_of(scale * x[i] - shift);
}

// The attention backward's row pass in one read: p[j] = exp(c x[j] - lse_a) (stored for dv), then
// dl[j] = c p[j] (dl[j] - delta) + sd exp(s x[j] - lse_s)   (dl holds dout . v_j on entry)
template <typename T>
ASL_INLINE void exp_dlogits_impl(T* dl, T* p, const T* x, int64_t n, T c, T lse_a, T delta, T sd, T s, T lse_s) {
  if (sd == T(0)) {
    for (int64_t i = 0; i < n; ++i) {
      const T e = exp_of(c * x[i] - lse_a);
      p[i] = e;
      dl[i] = c * e * (dl[i] - delta);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T e = exp_of(c * x[i] - lse_a);
    p[i] = e;
    dl[i] = c * e * (dl[i] - delta) + sd * exp_of(s * x[i] - lse_s);
  }
}

ASL_CPU_CLONES static void max_min(const float* x, int64_t n, float* mx, float* mn) { max_min_impl(x, n, mx, mn); }
inline void max_min(const double* x, int64_t n, double* mx, double* mn) { max_min_impl(x, n, mx, mn); }

ASL_CPU_CLONES static float exp_sum(float* out, const float* x, int64_t n, float scale, float shift) {
  return exp_sum_impl(out, x, n, scale, shift);
}
inline double exp_sum(double* out, const double* x, int64_t n, double scale, double shift) {
  return exp_sum_impl(out, x, n, scale, shift);
}

ASL_CPU_CLONES static void exp_sum2(float* out, const float* x, int64_t n, float c, float shift_c, float s,
                                    float shift_s, float* sum_c, float* sum_s) {
  exp_sum2_impl(out, x, n, c, shift_c, s, shift_s, sum_c, sum_s);
}
inline void exp_sum2(double* out, const double* x, int64_t n, double c, double shift_c, double s, double shift_s,
                     double* sum_c, double* sum_s) {
  exp_sum2_impl(out, x, n, c, shift_c, s, shift_s, sum_c, sum_s);
}

ASL_CPU_CLONES static void exp_store(float* out, const float* x, int64_t n, float scale, float shift, float mult) {
  exp_store_impl(out, x, n, scale, shift, mult);
}
inline void exp_store(double* out, const double* x, int64_t n, double scale, double shift, double mult) {
  exp_store_impl(out, x, n, scale, shift, mult);
}

ASL_CPU_CLONES static void exp_dlogits(float* dl, float* p, const float* x, int64_t n, float c, float lse_a,
                                       float delta, float sd, float s, float lse_s) {
  exp_dlogits_impl(dl, p, x, n, c, lse_a, delta, sd, s, lse_s);
}
inline void exp_dlogits(double* dl, double* p, const double* x, int64_t n, double c, double lse_a, double delta,
                        double sd, double s, double lse_s) {
  exp_dlogits_impl(dl, p, x, n, c, lse_a, delta, sd, s, lse_s);
}

}  // namespace rowwise
}  // namespace attenscribble_ops
