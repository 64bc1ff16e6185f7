"""fp32 products as 3xTF32 on tensor cores, with the operands split by the kernels themselves.

Triton's own ``input_precision="tf32x3"`` splits both operands of every dot again, guarding each
element against inf and NaN (7 instructions per element on sm_90). Kernels that use a tile in
several products, or keep one for a whole loop (a query block), split it once here (3
instructions per element) and run the three "tf32" products with :func:`mm`. Same arithmetic:
big = TF32 rounded to nearest (ties away, as cvt.rna.tf32 does), small = x - big, read truncated
by the tensor cores; small terms are added first (:func:`mm_t` for a product whose transpose
another kernel computes with :func:`mm`: the same additions per element). An infinite element
gives a NaN small part, so inf in an operand gives NaN (Triton's guarded split: inf) in the
products it enters; so does a finite element within 2^-11 (relative) of the largest fp32, whose
big part rounds to inf.
"""
import triton
import triton.language as tl


@triton.jit
def split(x, SPLIT: tl.constexpr):
    """x (fp32) as (big, small) for :func:`mm`; without SPLIT: (x, x)."""
    if SPLIT:
        big = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return big, x - big
    return x, x


@triton.jit
def mm(a_big, a_small, b_big, b_small, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr, X3: tl.constexpr,
       PRECISION: tl.constexpr, B_SMALL_FIRST: tl.constexpr = False):
    """a @ b in fp32. X3 (fp32 products as tf32x3): tensor-core "tf32" products of the split
    operands, small terms first (a_small.b_big, then a_big.b_small; B_SMALL_FIRST the other way
    round: :func:`mm_t`); an operand that is not split (SPLIT_A/B false) is exact in TF32 (e.g.
    q, k from 16-bit inputs), so its small part, zero, is skipped. Otherwise one product in
    PRECISION."""
    if X3:
        acc = tl.zeros([a_big.shape[0], b_big.shape[1]], tl.float32)
        if SPLIT_B and B_SMALL_FIRST:
            acc = tl.dot(a_big, b_small, acc, input_precision="tf32")
        if SPLIT_A:
            acc = tl.dot(a_small, b_big, acc, input_precision="tf32")
        if SPLIT_B and not B_SMALL_FIRST:
            acc = tl.dot(a_big, b_small, acc, input_precision="tf32")
        return tl.dot(a_big, b_big, acc, input_precision="tf32")
    return tl.dot(a_big, b_big, input_precision=PRECISION)


@triton.jit
def mm_t(a_big, a_small, b_big, b_small, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr, X3: tl.constexpr,
         PRECISION: tl.constexpr):
    """a @ b as :func:`mm`, for a product whose transpose b^T @ a^T another kernel computes with
    :func:`mm` (the attention's dk/dv kernel recomputes the forward's logits as k q^T): the two
    small terms are added in the other order, so that each element of a @ b takes the same fp32
    additions as its element of mm(b^T, a^T, SPLIT_B, SPLIT_A) (note the flags' order), small.big
    of b^T, a^T first. With the small terms the other way round, on a GPU, whose tensor cores add
    each depth step's products to the accumulator, an element may round one ulp apart from the
    other kernel's (a backward's probabilities then exp(s ulp) away from the forward's)."""
    return mm(a_big, a_small, b_big, b_small, SPLIT_A, SPLIT_B, X3, PRECISION, True)
