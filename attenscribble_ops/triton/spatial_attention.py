"""Attention of the spatial self-attention block in Triton, with the similarity normaliser.

Forward (one sweep over the keys, two running max/sum pairs), per (b, head), c = D^-1/2,
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

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import backends
from . import _target
from .._composite import attention, attention_autograd


@triton.jit
def _spatial_attention_fwd_kernel(Q, K, V, Out, LseAttn, LseSim, n, D, DV, c, s,
                                  HAS_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    q = tl.load(Q + bh * n * D + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D),
                other=0.0)
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    m_a = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_a = tl.zeros([BLOCK_M], tl.float32)
    dvs = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # the first block always holds key 0, so every running maximum is finite after it
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        k = tl.load(K + bh * n * D + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D),
                    other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        xs = tl.where(col_ok[None, :], logits * s, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(xs, 1))
        l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(xs - m_new[:, None]), 1)
        m_s = m_new
        if HAS_V:
            xa = tl.where(col_ok[None, :], logits * c, float("-inf"))
            m_new = tl.maximum(m_a, tl.max(xa, 1))
            alpha = tl.exp(m_a - m_new)
            p = tl.exp(xa - m_new[:, None])
            l_a = l_a * alpha + tl.sum(p, 1)
            v = tl.load(V + bh * n * DV + cols[:, None] * DV + dvs[None, :],
                        mask=col_ok[:, None] & (dvs[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_a = m_new
    tl.store(LseSim + bh * n + rows, m_s + tl.log(l_s), mask=row_ok)
    if HAS_V:
        tl.store(LseAttn + bh * n + rows, m_a + tl.log(l_a), mask=row_ok)
        out = acc / l_a[:, None]
        tl.store(Out + bh * n * DV + rows[:, None] * DV + dvs[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (dvs[None, :] < DV))


@triton.jit
def _dlogits(logits, p, do_dot_v, delta, lse_s, dls, row_ok, col_ok, c, s, HAS_V: tl.constexpr,
             HAS_DLSE: tl.constexpr):
    """dLambda for one tile; zero outside the valid rows and columns."""
    ok = row_ok[:, None] & col_ok[None, :]
    ds = tl.zeros(logits.shape, tl.float32)
    if HAS_V:
        ds = c * p * (do_dot_v - delta[:, None])
    if HAS_DLSE:
        ds += (s * dls)[:, None] * tl.exp(logits * s - lse_s[:, None])
    return tl.where(ok, ds, 0.0)


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
                                     PRECISION: tl.constexpr, SCALE_DS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dvs = tl.arange(0, BLOCK_DV)
    row_ok = rows < n
    q = tl.load(Q + bh * n * D + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D),
                other=0.0)
    lse_s = tl.load(LseSim + bh * n + rows, mask=row_ok, other=0.0)
    dls = tl.zeros([BLOCK_M], tl.float32)
    if HAS_DLSE:
        dls = tl.load(DLseSim + bh * n + rows, mask=row_ok, other=0.0)
    lse_a = tl.zeros([BLOCK_M], tl.float32)
    delta = tl.zeros([BLOCK_M], tl.float32)
    do = tl.zeros([BLOCK_M, BLOCK_DV], q.dtype)
    if HAS_V:
        lse_a = tl.load(LseAttn + bh * n + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + bh * n + rows, mask=row_ok, other=0.0)
        do = tl.load(DOut + bh * n * DV + rows[:, None] * DV + dvs[None, :],
                     mask=row_ok[:, None] & (dvs[None, :] < DV), other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        k = tl.load(K + bh * n * D + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D),
                    other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        do_dot_v = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_V:
            p = tl.exp(logits * c - lse_a[:, None])
            v = tl.load(V + bh * n * DV + cols[:, None] * DV + dvs[None, :],
                        mask=col_ok[:, None] & (dvs[None, :] < DV), other=0.0)
            do_dot_v = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = _dlogits(logits, p, do_dot_v, delta, lse_s, dls, row_ok, col_ok, c, s, HAS_V, HAS_DLSE)
        if SCALE_DS:
            rs = _fp16_scales(ds, 1)
            dq += tl.dot((ds * rs[:, None]).to(k.dtype), k, input_precision=PRECISION) / rs[:, None]
        else:
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
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
                                       PRECISION: tl.constexpr, SCALE_DS: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dvs = tl.arange(0, BLOCK_DV)
    col_ok = cols < n
    k = tl.load(K + bh * n * D + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D),
                other=0.0)
    v = tl.zeros([BLOCK_N, BLOCK_DV], k.dtype)
    if HAS_V:
        v = tl.load(V + bh * n * DV + cols[:, None] * DV + dvs[None, :], mask=col_ok[:, None] & (dvs[None, :] < DV),
                    other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, n, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        q = tl.load(Q + bh * n * D + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D),
                    other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        lse_s = tl.load(LseSim + bh * n + rows, mask=row_ok, other=0.0)
        dls = tl.zeros([BLOCK_M], tl.float32)
        if HAS_DLSE:
            dls = tl.load(DLseSim + bh * n + rows, mask=row_ok, other=0.0)
        p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        do_dot_v = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        delta = tl.zeros([BLOCK_M], tl.float32)
        if HAS_V:
            lse_a = tl.load(LseAttn + bh * n + rows, mask=row_ok, other=0.0)
            delta = tl.load(Delta + bh * n + rows, mask=row_ok, other=0.0)
            do = tl.load(DOut + bh * n * DV + rows[:, None] * DV + dvs[None, :],
                         mask=row_ok[:, None] & (dvs[None, :] < DV), other=0.0)
            p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(logits * c - lse_a[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            do_dot_v = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = _dlogits(logits, p, do_dot_v, delta, lse_s, dls, row_ok, col_ok, c, s, HAS_V, HAS_DLSE)
        if SCALE_DS:
            cs = _fp16_scales(ds, 0)
            dk += tl.dot(tl.trans((ds * cs[None, :]).to(q.dtype)), q, input_precision=PRECISION) / cs[:, None]
        else:
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
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
    base = dict(BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                PRECISION=precision(q))
    wide = max(base["BLOCK_D"], base["BLOCK_DV"]) > 64
    if not _target.for_gpu(q):  # the interpreter: fewer, larger tiles run faster
        tiles = (_tiles(32, 32),) * 3
    elif q.dtype == torch.float32 and base["PRECISION"] == "ieee":
        # fp32 dots without tensor cores (FMA loops): the 64-token tiles spill up to 14.8 KB of
        # registers per thread to the stack; 32 x 32 tiles over 8 warps spill none in the forward
        # kernel, at most 16 B in dq and 608 B in dk/dv
        tiles = (_tiles(32, 32, 8),) * 3
    elif q.dtype == torch.float32 and base["PRECISION"] == "tf32x3":
        # three tensor-core products per dot, and each operand held twice (its two TF32 parts).
        # At D = Dv = 64, 64 x 32 forward and dq tiles over 4 warps (wgmma) take 168-189 and 214
        # registers and spill nothing; dk/dv, with two accumulators and two resident key-side
        # tiles, spills 704-992 B at 64-token tiles and 8-16 B at 32 x 32 over 8 warps. Wider
        # heads: dq at 64 x 32 spills 344-400 B, so it takes 32 x 32 over 8 warps too.
        tiles = (_tiles(64, 32, 4), _tiles(32, 32, 8) if wide else _tiles(64, 32, 4), _tiles(32, 32, 8))
    else:
        tiles = (_tiles(64, 32 if wide else 64),) * 3
    return tuple(dict(base, **t) for t in tiles)


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
    cfg = _configs(q, d, dv)[0]
    la = lse_attn if lse_attn is not None else lse_sim
    for c in grid_chunks(bh):
        _spatial_attention_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), c.stop - c.start)](
            qs[c], ks[c], vs[c], out[c], la[c], lse_sim[c], n, d, dv, d ** -0.5, logit_scale, HAS_V=v is not None,
            **cfg)
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
    for c in grid_chunks(bh):
        inputs = (qs[c], ks[c], vs[c], dos[c], dlt[c], lse_a[c], lse_s[c], dls[c])
        _spatial_attention_bwd_dq_kernel[(triton.cdiv(n, dq_cfg["BLOCK_M"]), c.stop - c.start)](
            *inputs, dq[c], *args, **flags, **dq_cfg)
        _spatial_attention_bwd_dkdv_kernel[(triton.cdiv(n, dkdv_cfg["BLOCK_N"]), c.stop - c.start)](
            *inputs, dk[c], dv[c], *args, **flags, **dkdv_cfg)
    return dq.view(q.shape), dk.view(k.shape), (dv.view(v.shape) if v is not None else None)


@torch.library.custom_op("attenscribble_ops::spatial_attention_forward_triton", mutates_args=())
def spatial_attention_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     logit_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse_attn, lse_sim = _forward(q, k, v, logit_scale)
    rows = q.shape[:3]
    return out.view(v.shape[:3] + (v.shape[3],)), lse_attn.view(rows), lse_sim.view(rows)


@torch.library.custom_op("attenscribble_ops::spatial_attention_backward_triton", mutates_args=())
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
def spatial_attention_lse_triton(q: torch.Tensor, k: torch.Tensor, logit_scale: float) -> torch.Tensor:
    return _forward(q, k, None, logit_scale)[2].view(q.shape[:3])


@torch.library.custom_op("attenscribble_ops::spatial_attention_lse_backward_triton", mutates_args=())
def spatial_attention_lse_backward_triton(dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                                          logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    dq, dk, _ = _backward(None, None, None, dlse, lse, q, k, None, logit_scale)
    return dq, dk


@spatial_attention_forward_triton.register_fake
def _forward_fake(q, k, v, logit_scale):
    rows = q.shape[:3]
    return q.new_empty(v.shape), q.new_empty(rows, dtype=torch.float32), q.new_empty(rows, dtype=torch.float32)


@spatial_attention_backward_triton.register_fake
def _backward_fake(dout, dlse_attn, dlse_sim, q, k, v, out, lse_attn, lse_sim, logit_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@spatial_attention_backward_accumulate_triton.register_fake
def _backward_accumulate_fake(dout, dlse_attn, dlse_sim, q, k, v, out, lse_attn, lse_sim, logit_scale, dq, dk):
    return v.new_empty(v.shape)


@spatial_attention_lse_triton.register_fake
def _lse_fake(q, k, logit_scale):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@spatial_attention_lse_backward_triton.register_fake
def _lse_backward_fake(dlse, q, k, lse, logit_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape)


(_fwd_bwd, _fwd_setup), (_lse_bwd, _lse_setup) = attention_autograd(
    spatial_attention_backward_triton, spatial_attention_lse_backward_triton)
spatial_attention_forward_triton.register_autograd(_fwd_bwd, setup_context=_fwd_setup)
spatial_attention_lse_triton.register_autograd(_lse_bwd, setup_context=_lse_setup)

MAX_HEAD_DIM = 128  # one register tile per head dimension


def check(meta: backends.Meta) -> Optional[str]:
    """Why the Triton kernels cannot run inputs described by ``meta`` (None: they can)."""
    if meta.dtype == torch.float64:
        return "the Triton kernels compute in fp32 (tensor-core dots); use 'cpu', 'cuda' or 'reference' for float64"
    if meta.dtype == torch.bfloat16 and meta.device_type == "cpu":
        return "the Triton interpreter has no bfloat16 (numpy lacks it); use float16 or float32"
    if "head_dim>128" in meta.options:
        return f"the Triton kernels support head dims up to {MAX_HEAD_DIM}"
    return None


@backends.register("spatial_attention", "triton", check=check)
def spatial_attention_triton(q, k, v, logit_scale, tie_qk=False):
    return attention(q, k, v, logit_scale, tie_qk, spatial_attention_forward_triton,
                     spatial_attention_backward_accumulate_triton)
