"""Attention of the spatial self-attention block in Triton, with the similarity normaliser.

Forward (one sweep over the keys, two running sums and one running maximum of Lambda, or two
when s <= 0), per (b, head), c = D^-1/2,
s = logit_scale, Lambda = q k^T:
    lse_sim = logsumexp_j(s Lambda_ij),   lse_attn = logsumexp_j(c Lambda_ij),
    out = exp(c Lambda - lse_attn) v
Backward (flash-attention style, logits recomputed tile by tile, O(n) memory):
    delta_i = dout_i . out_i - dlse_attn_i                  (in PyTorch, O(n D))
    dLambda = c P o (dout v^T - delta) + s dlse_sim o exp(s Lambda - lse_sim)
    dq = dLambda k  (one program per query block),  dk = dLambda^T q, dv = P^T dout  (one per key block)
Two kernels instead of atomics: deterministic. HAS_V=False gives the LSE-only pair used by the
attentive similarity loss when no block handed it the LSE.

Layout: (B * heads, n, D) contiguous; LSEs (B * heads, n) fp32. Grid: (blocks of rows, B * heads).
Dots accumulate in fp32; fp16/bf16 operands stay in their dtype (tensor cores); fp32 operands run
as attenscribble_ops.backends.triton_fp32_dot says: by default tf32x3 (three TF32 tensor-core
products, as torch's memory-efficient SDPA kernel in fp32), tf32 where torch lets its fp32 matmuls
use TF32, or exact FMA dots ("ieee"). float64 is not supported here.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import _vmap, backends
from .._checks import same_device_fake
from . import _target
from ._tf32x3 import mm as _mm
from ._tf32x3 import mm_t as _mm_t
from ._tf32x3 import split as _split
from .._composite import attention, attention_autograd, with_formula

try:  # Triton 3.4 and later: the switch triton.jit reads
    from triton import knobs as _knobs

    _INTERPRETED = bool(_knobs.runtime.interpret)
except ImportError:  # earlier Triton read the variable itself
    _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


LOG2E = tl.constexpr(1.4426950408889634)
# Whether the kernels compile for an NVIDIA GPU (libdevice's mul_rn) rather than run in the
# interpreter (decided as triton.jit decides it: TRITON_INTERPRET when this module is imported) or
# compile for ROCm, whose libdevice has no mul_rn (there the compiler may fuse the product).
_ROUNDED_MUL = tl.constexpr(not _INTERPRETED and torch.version.hip is None)


@triton.jit
def mul_rn(a, b):
    """a * b rounded before whatever it is added to: never fused into an FMA. The softmax exponents
    s x - m and s x - lse need it to cancel as the reference's do: for the row's maximum the
    forward's exponent is then exactly 0, the backward's minus the log of the row's sum as the LSE
    rounded it, where an FMA leaves the rounding error of s x in them, up to half an ulp of the
    logit (0.004 at 1e5, 512 at 1e10 in fp32, whose exp2 is inf or 0).
    The GPU compiler fuses a product into the add that follows by default; libdevice's mul_rn is
    the product it may not fuse. The interpreter never fuses (numpy)."""
    if _ROUNDED_MUL:
        y = libdevice.mul_rn(a, b)
    else:
        y = a * b
    return y


@triton.jit
def _rows_tile(X, base, rows, ok, cols, width, EVEN: tl.constexpr, FULL: tl.constexpr):
    """Rows ``rows`` (valid where ``ok``) of the (n, width) matrix at ``base``, columns ``cols``;
    EVEN: every row is valid, FULL: every column (no masks)."""
    ptrs = X + base + rows[:, None] * width + cols[None, :]
    if EVEN and FULL:
        return tl.load(ptrs)
    elif EVEN:
        return tl.load(ptrs, mask=cols[None, :] < width, other=0.0)
    elif FULL:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    return tl.load(ptrs, mask=ok[:, None] & (cols[None, :] < width), other=0.0)


@triton.jit
def _spatial_attention_fwd_kernel(Q, K, V, Out, LseAttn, LseSim, n, D, DV, c, s,
                                  HAS_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                                  X3: tl.constexpr, EVEN: tl.constexpr, FULL_D: tl.constexpr,
                                  SHARED_MAX: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dvs = tl.arange(0, BLOCK_DV)
    row_ok = rows < n
    q_b, q_s = _split(_rows_tile(Q, bh * n * D, rows, row_ok, dims, D, EVEN, FULL_D), X3)
    c2 = c * LOG2E
    s2 = s * LOG2E
    # running maxima of the logits: one for both softmaxes when s > 0 (SHARED_MAX: max_j s x_j is
    # s max_j x_j), else the similarity's own, of s x
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_a = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # the first block always holds key 0, so every running maximum is finite after it
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        k_b, k_s = _split(_rows_tile(K, bh * n * D, cols, col_ok, dims, D, EVEN, FULL_D), X3)
        logits = _mm(q_b, q_s, tl.trans(k_b), tl.trans(k_s), X3, X3, X3, PRECISION)
        x = logits
        if not EVEN:
            x = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        # exponents in log2 units (exp2 is one instruction on the GPU), of rounded products (mul_rn)
        if SHARED_MAX:
            l_s = l_s * tl.exp2((m - m_new) * s2) + tl.sum(tl.exp2(mul_rn(x, s2) - mul_rn(m_new, s2)[:, None]), 1)
        else:
            # s x in natural units, as the backward rounds it (in base 2 the two would round apart)
            xs = mul_rn(logits, s)
            if not EVEN:
                xs = tl.where(col_ok[None, :], xs, float("-inf"))
            ms_new = tl.maximum(m_s, tl.max(xs, 1))
            l_s = l_s * tl.exp2((m_s - ms_new) * LOG2E) + tl.sum(tl.exp2((xs - ms_new[:, None]) * LOG2E), 1)
            m_s = ms_new
        if HAS_V:
            alpha = tl.exp2((m - m_new) * c2)
            p = tl.exp2(mul_rn(x, c2) - mul_rn(m_new, c2)[:, None])
            l_a = l_a * alpha + tl.sum(p, 1)
            v_b, v_s = _split(_rows_tile(V, bh * n * DV, cols, col_ok, dvs, DV, EVEN, FULL_D), X3)
            p_b, p_s = _split(p.to(v_b.dtype), X3)
            acc = acc * alpha[:, None] + _mm(p_b, p_s, v_b, v_s, X3, X3, X3, PRECISION)
        m = m_new
    if SHARED_MAX:
        lse_sim = mul_rn(m, s) + tl.log(l_s)
    else:
        lse_sim = m_s + tl.log(l_s)
    tl.store(LseSim + bh * n + rows, lse_sim, mask=row_ok)
    if HAS_V:
        tl.store(LseAttn + bh * n + rows, mul_rn(m, c) + tl.log(l_a), mask=row_ok)
        out = acc / l_a[:, None]
        tl.store(Out + bh * n * DV + rows[:, None] * DV + dvs[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (dvs[None, :] < DV))


@triton.jit
def _per_row(x, T: tl.constexpr):
    """A per-query vector broadcast over a tile: (queries, keys), or (keys, queries) with T (one
    return: the GPU compiler refuses returns of different shapes, even behind a constexpr)."""
    if T:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _probs(logits, scale, lse, T: tl.constexpr):
    """exp(scale Lambda - lse) for one tile. The exponent is the rounded product scale Lambda minus
    the LSE (mul_rn: rounded as the forward rounded it into the LSE, so that the two cancel), then
    scaled to base 2; exp2 of x * (scale log2 e) - lse log2 e rounds them apart (in the interpreter
    at logit_scale 30, 2 x 2 heads of 37 tokens, D = 16: dq and dk 5.9 and 4.3 times the fp32
    reference's error, against 1.0 so). The forward's exponents may take the scale in base 2: their
    maximum is rounded with them."""
    return tl.exp2((mul_rn(logits, scale) - _per_row(lse, T)) * LOG2E)


@triton.jit
def _dlogits(logits, p, do_dot_v, delta, lse_s, dls, row_ok, col_ok, c, s, HAS_V: tl.constexpr,
             HAS_DLSE: tl.constexpr, EVEN: tl.constexpr, T: tl.constexpr):
    """dLambda for one tile, (queries, keys) or with T (keys, queries); zero outside the valid
    rows and columns."""
    ds = tl.zeros(logits.shape, tl.float32)
    if HAS_V:
        ds = p * (do_dot_v * c - _per_row(delta * c, T))  # one FMA and one product per entry
    if HAS_DLSE:
        ds += _per_row(s * dls, T) * _probs(logits, s, lse_s, T)
    if not EVEN:
        if T:
            ok = col_ok[:, None] & row_ok[None, :]
        else:
            ok = row_ok[:, None] & col_ok[None, :]
        ds = tl.where(ok, ds, 0.0)
    return ds  # one return (the GPU compiler also builds a return behind a false constexpr)


@triton.jit
def _fp16_scales(ds, AXIS: tl.constexpr):
    """Powers of two, one per row (AXIS=1) or column (AXIS=0) of ds, that bring its largest entry
    into [2**8, 2**9) before the fp16 dot: small gradients would otherwise round to fp16 subnormals
    (on an H100 and in the interpreter: q, k gradients of about 1e-6 off by 15 times the fp16
    reference's own error) and large ones to inf.
    The dot's fp32 result is divided by the same scales."""
    amax = tl.maximum(tl.max(tl.abs(ds), axis=AXIS), 1e-30)
    return tl.exp2(tl.minimum(8.0 - tl.floor(tl.log2(amax)), 100.0))


@triton.jit
def _spatial_attention_bwd_dq_kernel(Q, K, V, DOut, Delta, LseAttn, LseSim, DLseSim, DQ, n, D, DV, c, s,
                                     HAS_V: tl.constexpr, HAS_DLSE: tl.constexpr, ACCUMULATE: tl.constexpr,
                                     BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                                     PRECISION: tl.constexpr, SCALE_DS: tl.constexpr, X3: tl.constexpr,
                                     EVEN: tl.constexpr, FULL_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dvs = tl.arange(0, BLOCK_DV)
    row_ok = rows < n
    q = _rows_tile(Q, bh * n * D, rows, row_ok, dims, D, EVEN, FULL_D)
    q_b, q_s = _split(q, X3)
    lse_s = tl.load(LseSim + bh * n + rows, mask=row_ok, other=0.0)
    dls = tl.zeros([BLOCK_M], tl.float32)
    if HAS_DLSE:
        dls = tl.load(DLseSim + bh * n + rows, mask=row_ok, other=0.0)
    lse_a = tl.zeros([BLOCK_M], tl.float32)
    delta = tl.zeros([BLOCK_M], tl.float32)
    do_b, do_s = q_b, q_s  # placeholders when there is no V
    if HAS_V:
        lse_a = tl.load(LseAttn + bh * n + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + bh * n + rows, mask=row_ok, other=0.0)
        do_b, do_s = _split(_rows_tile(DOut, bh * n * DV, rows, row_ok, dvs, DV, EVEN, FULL_D), X3)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        k_b, k_s = _split(_rows_tile(K, bh * n * D, cols, col_ok, dims, D, EVEN, FULL_D), X3)
        logits = _mm(q_b, q_s, tl.trans(k_b), tl.trans(k_s), X3, X3, X3, PRECISION)
        p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        do_dot_v = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_V:
            p = _probs(logits, c, lse_a, False)
            v_b, v_s = _split(_rows_tile(V, bh * n * DV, cols, col_ok, dvs, DV, EVEN, FULL_D), X3)
            do_dot_v = _mm(do_b, do_s, tl.trans(v_b), tl.trans(v_s), X3, X3, X3, PRECISION)
        ds = _dlogits(logits, p, do_dot_v, delta, lse_s, dls, row_ok, col_ok, c, s, HAS_V, HAS_DLSE, EVEN, False)
        if SCALE_DS:
            rs = _fp16_scales(ds, 1)
            dq += tl.dot((ds * rs[:, None]).to(k_b.dtype), k_b, input_precision=PRECISION) / rs[:, None]
        else:
            ds_b, ds_s = _split(ds.to(k_b.dtype), X3)
            dq += _mm(ds_b, ds_s, k_b, k_s, X3, X3, X3, PRECISION)
    dq_ptr = DQ + bh * n * D + rows[:, None] * D + dims[None, :]
    dmask = row_ok[:, None] & (dims[None, :] < D)
    if ACCUMULATE:
        dq += tl.load(dq_ptr, mask=dmask, other=0.0).to(tl.float32)
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=dmask)


@triton.jit
def _spatial_attention_bwd_dkdv_kernel(Q, K, V, DOut, Delta, LseAttn, LseSim, DLseSim, DK, DV_, n, D, DV, c, s,
                                       HAS_V: tl.constexpr, HAS_DLSE: tl.constexpr, ACCUMULATE: tl.constexpr,
                                       BLOCK_M: tl.constexpr,
                                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                                       PRECISION: tl.constexpr, SCALE_DS: tl.constexpr, X3: tl.constexpr,
                                       EVEN: tl.constexpr, FULL_D: tl.constexpr):
    """The key block's dk, dv. Its tiles are transposed, (keys, queries): P^T = exp(c k q^T -
    lse_attn) comes out of the product in the layout that dv += P^T dout and dk += dLambda^T q
    take their first operand in, so nothing is transposed through shared memory."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dvs = tl.arange(0, BLOCK_DV)
    col_ok = cols < n
    k_b, k_s = _split(_rows_tile(K, bh * n * D, cols, col_ok, dims, D, EVEN, FULL_D), X3)
    v_b, v_s = k_b, k_s  # placeholders when there is no V
    if HAS_V:
        v_b, v_s = _split(_rows_tile(V, bh * n * DV, cols, col_ok, dvs, DV, EVEN, FULL_D), X3)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, n, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        q_b, q_s = _split(_rows_tile(Q, bh * n * D, rows, row_ok, dims, D, EVEN, FULL_D), X3)
        # the forward's logits, transposed, bit for bit (the small terms in its order: _mm_t)
        logits_t = _mm_t(k_b, k_s, tl.trans(q_b), tl.trans(q_s), X3, X3, X3, PRECISION)
        lse_s = tl.load(LseSim + bh * n + rows, mask=row_ok, other=0.0)
        dls = tl.zeros([BLOCK_M], tl.float32)
        if HAS_DLSE:
            dls = tl.load(DLseSim + bh * n + rows, mask=row_ok, other=0.0)
        p_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        do_dot_v_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        delta = tl.zeros([BLOCK_M], tl.float32)
        if HAS_V:
            lse_a = tl.load(LseAttn + bh * n + rows, mask=row_ok, other=0.0)
            delta = tl.load(Delta + bh * n + rows, mask=row_ok, other=0.0)
            do_b, do_s = _split(_rows_tile(DOut, bh * n * DV, rows, row_ok, dvs, DV, EVEN, FULL_D), X3)
            # rows past n: q and dout load as 0, so their P^T entries (finite) add nothing to dv
            p_t = _probs(logits_t, c, lse_a, True)
            p_b, p_s = _split(p_t.to(do_b.dtype), X3)
            dv += _mm(p_b, p_s, do_b, do_s, X3, X3, X3, PRECISION)
            do_dot_v_t = _mm_t(v_b, v_s, tl.trans(do_b), tl.trans(do_s), X3, X3, X3, PRECISION)  # dq's, transposed
        ds_t = _dlogits(logits_t, p_t, do_dot_v_t, delta, lse_s, dls, row_ok, col_ok, c, s, HAS_V, HAS_DLSE, EVEN,
                        True)
        if SCALE_DS:
            cs = _fp16_scales(ds_t, 1)
            dk += tl.dot((ds_t * cs[:, None]).to(q_b.dtype), q_b, input_precision=PRECISION) / cs[:, None]
        else:
            ds_b, ds_s = _split(ds_t.to(q_b.dtype), X3)
            dk += _mm(ds_b, ds_s, q_b, q_s, X3, X3, X3, PRECISION)
    dk_ptr = DK + bh * n * D + cols[:, None] * D + dims[None, :]
    dmask = col_ok[:, None] & (dims[None, :] < D)
    if ACCUMULATE:
        dk += tl.load(dk_ptr, mask=dmask, other=0.0).to(tl.float32)
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=dmask)
    if HAS_V:
        tl.store(DV_ + bh * n * DV + cols[:, None] * DV + dvs[None, :], dv.to(DV_.dtype.element_ty),
                 mask=col_ok[:, None] & (dvs[None, :] < DV))


def precision(x: torch.Tensor) -> str:
    """``tl.dot``'s input precision for x's operands: fp32 on a GPU with TF32 tensor cores (NVIDIA,
    compute capability >= 8.0) as ``backends.triton_fp32_dot`` says (tf32x3 by default, tf32 when
    torch allows TF32); "ieee" for fp32 on other GPUs, for 16-bit operands (their dots run on
    tensor cores with fp32 accumulation regardless) and in the interpreter (exact fp32 there)."""
    return fp32_precision(x) if x.dtype == torch.float32 else "ieee"


def fp32_precision(x: torch.Tensor) -> str:
    """``tl.dot``'s input precision for fp32 operands of a launch on x's device, whatever x's own
    dtype (kernels that widen their inputs to fp32 before a product)."""
    if _target.for_gpu(x):
        chosen = backends.triton_fp32_dot_precision()  # a bad setting is an error on every GPU
        return chosen if _target.tf32_tensor_cores(x) else "ieee"
    return "ieee"


def _tiles(block_m: int, block_n: int, num_warps: Optional[int] = None) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, **({} if num_warps is None else dict(num_warps=num_warps)))


def _configs(q: torch.Tensor, d: int, dv: int) -> tuple[dict, dict, dict]:
    """Launch parameters (tiles, warps, dot precision) of the forward, dq and dk/dv kernels for q's
    launch. BLOCK_M tiles the queries, BLOCK_N the keys: the forward and dq kernels hold a query
    tile and loop over key tiles, the dk/dv kernel the reverse.

    The register and spill figures below: these kernels compiled for sm_90 by tests/triton_sm90.py
    on the development machine (cuobjdump), fp32."""
    dot = precision(q)
    base = dict(BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                PRECISION=dot, X3=dot == "tf32x3")  # tf32x3: the kernels split their tiles (_tf32x3.py)
    base["FULL_D"] = d == base["BLOCK_D"] and dv == base["BLOCK_DV"]  # no column masks
    wide = max(base["BLOCK_D"], base["BLOCK_DV"]) > 64
    if not _target.for_gpu(q):  # the interpreter: fewer, larger tiles run faster
        tiles = (_tiles(32, 32),) * 3
    elif q.dtype == torch.float32 and base["PRECISION"] == "ieee":
        # fp32 dots without tensor cores (FMA loops): the 64-token tiles spill up to 14.8 KB of
        # registers per thread to the stack; 32 x 32 tiles over 8 warps spill none in the forward
        # kernel, at most 16 B in dq and 608 B in dk/dv
        tiles = (_tiles(32, 32, 8),) * 3
    elif q.dtype == torch.float32 and base["PRECISION"] == "tf32x3":
        # three tensor-core products per dot, each operand held twice (its two TF32 parts). At
        # D = Dv = 64 (sm_90 loops, thread-instructions per logit): forward 128 x 32 over 8
        # warps, 181 registers, 36 (64 x 32 over 4 warps: 41); dq 128 x 32 over 8 warps, 206
        # registers, 43 (64 x 32: 48); dk/dv 64 keys x 32 queries over 4 warps, one stage,
        # 66 with 144 B of stack (its two accumulators and the key block's four split tiles
        # fill the registers; 32 x 32 over 8 warps: 164, no stack). Wider heads: the 128-row
        # tiles exceed the shared memory; forward 64 x 32 over 4 warps (62, 8 B of stack), dq
        # 64 x 16 over 4 warps (110, 64 B), dk/dv 32 x 32 over 8 warps (290, 40 B).
        if wide:
            tiles = (_tiles(64, 32, 4), _tiles(64, 16, 4), _tiles(32, 32, 8))
        else:
            tiles = (_tiles(128, 32, 8), _tiles(128, 32, 8), dict(_tiles(32, 64, 4), num_stages=1))
    else:
        tiles = (_tiles(64, 32 if wide else 64),) * 3
    override = _tile_override()
    if override is not None and _target.for_gpu(q):
        tiles = override
    return tuple(dict(base, **t) for t in tiles)


TILES_VARIABLE = "ATTENSCRIBBLE_TRITON_ATTENTION_TILES"


def _tile_override() -> Optional[tuple[dict, dict, dict]]:
    """Tiles of the three kernels on a GPU from the environment, for tuning runs (the benchmarks
    on a lent GPU), e.g. ATTENSCRIBBLE_TRITON_ATTENTION_TILES="64x32x4,64x32x4,32x32x8x1":
    forward, dq, dk/dv, each BLOCK_M x BLOCK_N x warps [x pipeline stages]. Unset: the tiles above."""
    text = os.environ.get(TILES_VARIABLE)
    if not text:
        return None
    return _parse_tiles(text)


@functools.lru_cache(maxsize=8)
def _parse_tiles(text: str) -> tuple[dict, dict, dict]:
    specs = text.split(",")
    out = []
    for spec in specs:
        parts = spec.strip().split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(specs) != 3 or len(values) not in (3, 4) or any(v < 1 for v in values) or any(
                v & (v - 1) for v in values[:3]) or values[0] < 16 or values[1] < 16:
            raise ValueError(f"{TILES_VARIABLE} must be three comma-separated tiles BLOCK_MxBLOCK_Nxwarps[xstages] "
                             f"(powers of two, blocks >= 16), for the forward, dq and dk/dv kernels, e.g. "
                             f"'64x32x4,64x32x4,32x32x8x1'; got {text!r}")
        tile = _tiles(values[0], values[1], values[2])
        if len(values) == 4:
            tile["num_stages"] = values[3]
        out.append(tile)
    return tuple(out)


def _smaller_tiles(cfg: dict) -> list[dict]:
    """``cfg``, then variants that need less shared memory, for GPUs with less of it than the
    H100 the tiles were chosen on (sm_86 and sm_89 cards, 99 KiB a block, or 163 KiB on an A100,
    against 227 KiB): one pipeline stage, then the larger of the two blocks halved (down to
    16 x 16, at most 4 warps), each with its default stages and with one."""
    out = [cfg]

    def add(tile):
        if tile not in out:
            out.append(tile)

    add(dict(cfg, num_stages=1))
    tile = cfg
    while max(tile["BLOCK_M"], tile["BLOCK_N"]) > 16:
        larger = "BLOCK_M" if tile["BLOCK_M"] >= tile["BLOCK_N"] else "BLOCK_N"
        tile = dict(tile, **{larger: tile[larger] // 2}, num_warps=min(tile.get("num_warps", 4), 4))
        add(tile)
        add(dict(tile, num_stages=1))
    return out


_FITTED: dict = {}  # (kernel, device, preferred tiles) -> the tiles that fitted


def launch_fitting(kernel, device: torch.device, cfg: dict, launch):
    """``launch(tiles)`` with ``cfg``, or where the GPU cannot hold its compiled kernel, with the
    first of :func:`_smaller_tiles` that it can. Triton raises ``OutOfResources`` before launching
    a kernel that asks for more shared memory or threads than a block may have, so nothing has run
    when the next tiles are tried. The choice is remembered per kernel, device and ``cfg``."""
    key = (kernel, str(device), tuple(sorted(cfg.items())))
    known = _FITTED.get(key)
    if known is not None:
        return launch(known)
    candidates = _smaller_tiles(cfg)
    for i, tiles in enumerate(candidates):
        try:
            result = launch(tiles)
        except triton.OutOfResources:
            if i + 1 == len(candidates):
                raise
            continue
        _FITTED[key] = tiles
        return result


def _even(cfg: dict, n: int) -> bool:
    """Whether the tiles of a launch divide the tokens (no row or key masks)."""
    return n % cfg["BLOCK_M"] == 0 and n % cfg["BLOCK_N"] == 0


# CUDA's limit on grid axis 1 (the slices, or the batch of the similarity kernels): larger counts
# are launched in chunks of views.
MAX_GRID_Y = 65535


def grid_chunks(count: int) -> list[slice]:
    """The slices [b0, b1) of ``count`` launched one at a time, each at most MAX_GRID_Y long."""
    return [slice(b0, min(count, b0 + MAX_GRID_Y)) for b0 in range(0, count, MAX_GRID_Y)]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, n, D) -> contiguous (B * heads, n, D)."""
    return x.contiguous().view(-1, x.shape[2], x.shape[3])


def _forward(q, k, v, logit_scale):
    bh, n, d = q.shape[0] * q.shape[1], q.shape[2], q.shape[3]
    dv = v.shape[3] if v is not None else d
    qs, ks = _rows(q), _rows(k)
    vs = _rows(v) if v is not None else qs
    out = torch.empty((bh, n, dv), device=q.device, dtype=q.dtype) if v is not None else qs
    lse_attn = torch.empty((bh, n), device=q.device, dtype=torch.float32) if v is not None else None
    lse_sim = torch.empty((bh, n), device=q.device, dtype=torch.float32)
    la = lse_attn if lse_attn is not None else lse_sim

    def launch(cfg):
        for c in grid_chunks(bh):
            _spatial_attention_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), c.stop - c.start)](
                qs[c], ks[c], vs[c], out[c], la[c], lse_sim[c], n, d, dv, d ** -0.5, logit_scale,
                HAS_V=v is not None, EVEN=_even(cfg, n), SHARED_MAX=logit_scale > 0, **cfg)

    launch_fitting(_spatial_attention_fwd_kernel, q.device, _configs(q, d, dv)[0], launch)
    return out, lse_attn, lse_sim


def _backward(dout, delta, lse_attn, dlse_sim, lse_sim, q, k, v, logit_scale, accumulate_into=None):
    """(dq, dk, dv). ``accumulate_into``: (dq, dk) buffers (B, heads, n, D) the dense terms are added to."""
    bh, n, d = q.shape[0] * q.shape[1], q.shape[2], q.shape[3]
    dv_dim = v.shape[3] if v is not None else d
    qs, ks = _rows(q), _rows(k)
    vs = _rows(v) if v is not None else qs
    dos = _rows(dout) if dout is not None else qs
    if accumulate_into is None:
        dq, dk = torch.empty_like(qs), torch.empty_like(ks)
    else:
        dq, dk = (t.view(bh, n, d) for t in accumulate_into)
    dv = torch.empty_like(vs) if v is not None else dk
    lse_s = lse_sim.reshape(bh, n).float().contiguous()
    dls = dlse_sim.reshape(bh, n).float().contiguous() if dlse_sim is not None else lse_s
    lse_a = lse_attn.reshape(bh, n).float().contiguous() if v is not None else lse_s
    dlt = delta.reshape(bh, n).float().contiguous() if v is not None else lse_s
    _, dq_cfg, dkdv_cfg = _configs(q, d, dv_dim)
    flags = dict(HAS_V=v is not None, HAS_DLSE=dlse_sim is not None, ACCUMULATE=accumulate_into is not None,
                 SCALE_DS=q.dtype == torch.float16)
    args = (n, d, dv_dim, d ** -0.5, logit_scale)
    chunks = [(c, (qs[c], ks[c], vs[c], dos[c], dlt[c], lse_a[c], lse_s[c], dls[c])) for c in grid_chunks(bh)]

    def launch_dq(cfg):
        for c, inputs in chunks:
            _spatial_attention_bwd_dq_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), c.stop - c.start)](
                *inputs, dq[c], *args, **flags, EVEN=_even(cfg, n), **cfg)

    def launch_dkdv(cfg):
        for c, inputs in chunks:
            _spatial_attention_bwd_dkdv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), c.stop - c.start)](
                *inputs, dk[c], dv[c], *args, **flags, EVEN=_even(cfg, n), **cfg)

    launch_fitting(_spatial_attention_bwd_dq_kernel, q.device, dq_cfg, launch_dq)
    launch_fitting(_spatial_attention_bwd_dkdv_kernel, q.device, dkdv_cfg, launch_dkdv)
    return dq.view(q.shape), dk.view(k.shape), (dv.view(v.shape) if v is not None else None)


@torch.library.custom_op("attenscribble_ops::spatial_attention_forward_triton", mutates_args=())
@_target.on_tensor_device
def spatial_attention_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     logit_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse_attn, lse_sim = _forward(q, k, v, logit_scale)
    rows = q.shape[:3]
    return out.view(v.shape[:3] + (v.shape[3],)), lse_attn.view(rows), lse_sim.view(rows)


@torch.library.custom_op("attenscribble_ops::spatial_attention_backward_triton", mutates_args=())
@_target.on_tensor_device
def spatial_attention_backward_triton(dout: torch.Tensor, dlse_attn: Optional[torch.Tensor],
                                      dlse_sim: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                                      v: torch.Tensor, out: torch.Tensor, lse_attn: torch.Tensor,
                                      lse_sim: torch.Tensor,
                                      logit_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    delta = (dout.float() * out.float()).sum(-1)
    if dlse_attn is not None:
        delta = delta - dlse_attn.float()
    return _backward(dout, delta, lse_attn, dlse_sim, lse_sim, q, k, v, logit_scale)


@torch.library.custom_op("attenscribble_ops::spatial_attention_backward_accumulate_triton", mutates_args=("dq", "dk"))
@_target.on_tensor_device
def spatial_attention_backward_accumulate_triton(dout: torch.Tensor, dlse_attn: Optional[torch.Tensor],
                                                 dlse_sim: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                                                 v: torch.Tensor, out: torch.Tensor, lse_attn: torch.Tensor,
                                                 lse_sim: torch.Tensor, logit_scale: float, dq: torch.Tensor,
                                                 dk: torch.Tensor) -> torch.Tensor:
    """The backward adding dq, dk into the given fp32 buffers (shaped like q); returns dv."""
    delta = (dout.float() * out.float()).sum(-1)
    if dlse_attn is not None:
        delta = delta - dlse_attn.float()
    return _backward(dout, delta, lse_attn, dlse_sim, lse_sim, q, k, v, logit_scale, accumulate_into=(dq, dk))[2]


@torch.library.custom_op("attenscribble_ops::spatial_attention_lse_triton", mutates_args=())
@_target.on_tensor_device
def spatial_attention_lse_triton(q: torch.Tensor, k: torch.Tensor, logit_scale: float) -> torch.Tensor:
    return _forward(q, k, None, logit_scale)[2].view(q.shape[:3])


@torch.library.custom_op("attenscribble_ops::spatial_attention_lse_backward_triton", mutates_args=())
@_target.on_tensor_device
def spatial_attention_lse_backward_triton(dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                                          logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    dq, dk, _ = _backward(None, None, None, dlse, lse, q, k, None, logit_scale)
    return dq, dk


@spatial_attention_forward_triton.register_fake
@same_device_fake
def _forward_fake(q, k, v, logit_scale):
    rows = q.shape[:3]
    return q.new_empty(v.shape), q.new_empty(rows, dtype=torch.float32), q.new_empty(rows, dtype=torch.float32)


@spatial_attention_backward_triton.register_fake
@same_device_fake
def _backward_fake(dout, dlse_attn, dlse_sim, q, k, v, out, lse_attn, lse_sim, logit_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@spatial_attention_backward_accumulate_triton.register_fake
@same_device_fake
def _backward_accumulate_fake(dout, dlse_attn, dlse_sim, q, k, v, out, lse_attn, lse_sim, logit_scale, dq, dk):
    return v.new_empty(v.shape)


@spatial_attention_lse_triton.register_fake
@same_device_fake
def _lse_fake(q, k, logit_scale):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@spatial_attention_lse_backward_triton.register_fake
@same_device_fake
def _lse_backward_fake(dlse, q, k, lse, logit_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape)


(_fwd_bwd, _fwd_setup), (_lse_bwd, _lse_setup) = attention_autograd(
    spatial_attention_backward_triton, spatial_attention_lse_backward_triton)
spatial_attention_forward_triton.register_autograd(_fwd_bwd, setup_context=_fwd_setup)
spatial_attention_lse_triton.register_autograd(_lse_bwd, setup_context=_lse_setup)
_forward_op = with_formula(spatial_attention_forward_triton, _fwd_bwd, _fwd_setup)  # what the backend calls
_vmap.register_attention(spatial_attention_forward_triton, spatial_attention_backward_triton,
                         spatial_attention_lse_triton, spatial_attention_lse_backward_triton)

MAX_HEAD_DIM = 128  # one register tile per head dimension


def check(meta: backends.Meta) -> Optional[str]:
    """Why the Triton kernels cannot run inputs described by ``meta`` (None: they can)."""
    if meta.dtype == torch.float64:
        return "the Triton kernels compute in fp32 (tensor-core dots); use 'cpu', 'cuda' or 'reference' for float64"
    if meta.dtype == torch.bfloat16 and meta.device_type == "cpu":
        return "the Triton interpreter has no bfloat16 (numpy lacks it); use float16 or float32"
    if "head_dim>128" in meta.options:
        return f"the Triton kernels support head dims up to {MAX_HEAD_DIM}"
    if "slice>=2**31" in meta.options:
        return ("the Triton kernels index inside one (batch, head) slice in int32: tokens x head dim (and "
                "tokens x classes for the loss) must stay below 2**31; use 'cuda' or 'cpu'")
    return None


@backends.register("spatial_attention", "triton", check=check)
def spatial_attention_triton(q, k, v, logit_scale, tie_qk=False):
    return attention(q, k, v, logit_scale, tie_qk, _forward_op, spatial_attention_backward_accumulate_triton,
                     spatial_attention_backward_triton)
