// Included by the CPU translation units of the attention and the similarity loss, after the ATen
// and standard headers and before the project's own: from here on, every product is rounded before
// it is added (no fused multiply-add contraction), as in the reference, and in every
// instruction-set clone alike.
//
// Why: GCC contracts a * b - c into one FMA by default, in C++ whatever -std says (and clang within
// an expression), in the AVX2 and AVX-512 clones of the hot loops. The softmax exponents s x - lse
// then carry the rounding error of s x instead of cancelling it: for the row's maximum the exponent
// is that error, where the reference's is 0. At |s x| ~ 1e10 in fp32 (ulp 1024) it is in the
// thousands, its exp inf or 0, and the gradients came out NaN where the reference's are finite
// (tests/test_spatial_attention.py; README, Large logit scales). Cost, measured on an Intel Xeon
// (2 threads): about 9 % on the CPU attention, 7 % on the similarity loss (the exp polynomial
// loses its FMAs as well); the masked CRF, which does not cancel, keeps them (this header is not
// included there). The CUDA kernels round the same products with __fmul_rn (mul_rn in
// fast_math.h), the Triton kernels with libdevice's mul_rn.
#pragma once

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
