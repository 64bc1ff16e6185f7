"""Local-window kernels of the attentive similarity loss in Triton (the same math as
csrc/attentive_similarity.h), registered with the Triton LSE op as the "triton" backend.

Per sample b, head m, token t and neighbour u in t's (2r+1)^2 window (u != t), s = logit_scale:
    a_tu = exp(s q_t.k_u - lse_t),  W_tu = sigmoid(sum_m alpha_m (a_tu + a_ut) + beta)
    row_t = g_b sum_u M_tu W_tu (1 - p_t.p_u),  M_tu = exp(-(dy^2 + dx^2) / (2 sigma^2))
Backward for per-row upstream gradients gamma:
    D_tu = g_b M_tu (1 - p_t.p_u) W_tu (1 - W_tu) (gamma_t + gamma_u),   E^m_tu = alpha_m D_tu
    dq^m_t = s sum_u a_tu E k^m_u,  dk^m_t = s sum_u a_ut E q^m_u,  dlse^m_t = -sum_u a_tu E
    dalpha_m, dbeta: per-token halves of sum_u D_tu S^m_tu and sum_u D_tu (reduced in PyTorch)
    dp_t = -g_b sum_u M_tu W_tu (gamma_t + gamma_u) p_u
dlse completes dq, dk through the backward of whatever produced the LSE; the fused op (no LSE handed
over) runs the dense LSE sweep itself, adding into the window terms' dq, dk buffers.

Layout: q, k (B, heads, n, D), lse (B, heads, n) fp32, probs (B, C, n); every tensor contiguous.
Decomposition: one program per (block of BLOCK_T consecutive tokens, sample). For each window row
offset dy, the neighbours of the block lie in a band of BLOCK_T + 2 rx consecutive tokens (the
block shifted by dy * w); the program walks that band in tiles of BLOCK_N tokens, gets the
logits of the whole (block x tile) from two tensor-core products (q_t k_u^T and k_t q_u^T), and
keeps the entries that are window pairs (|dx| <= rx, inside the grid, not the token itself). The
backward's dq, dk are products of the masked coefficient tiles with the band's k_u, q_u rows, and
loops over heads outermost so one head's dq/dk accumulators suffice. fp32 products run as 3xTF32
(tf32x3) by default on a GPU, with each tile split into its TF32 parts once (`_split`). Each
program writes only its own tokens' outputs: no atomics, deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _vmap, backends
from .._checks import same_device_fake
from . import _target
from ._tf32x3 import mm as _mm
from ._tf32x3 import mm_t as _mm_t
from ._tf32x3 import split as _split
from .._composite import fused_loss, fused_similarity_autograd, window_similarity_autograd, with_formula
from .spatial_attention import LOG2E, mul_rn
from .spatial_attention import _backward as _attention_backward
from .spatial_attention import _rows_tile
from .spatial_attention import _forward as _attention_forward
from .spatial_attention import check as _attention_check
from .spatial_attention import fp32_precision
from .spatial_attention import grid_chunks


@triton.jit
def _sigmoid(z):
    """1 / (1 + exp(-z)) with the GPU's approximate division (2 ulp): z is a sum of positive
    exponentials plus a bias, never NaN unless an input is. Exponentials here are exp2 of a
    product (one instruction each on the GPU; exp compiles to six)."""
    return tl.fdiv(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.exp2(z * -LOG2E), ieee_rounding=False)


@triton.jit
def _band(t0, i, jt, dy, c_lo, c_hi, row_ok, n, w, RX, BLOCK_N: tl.constexpr):
    """One band tile of the window at row offset dy: columns c = jt .. jt + BLOCK_N - 1 of the token
    band u = t0 + dy * w - RX + c, which holds the neighbour (dy, dx) of the block's token t0 + i at
    c = i + dx + RX. Returns u, whether u is a token, dx per (i, c), and which (i, c) are window
    pairs: c in the token's clipped window [c_lo, c_hi] (row_ok: its row + dy is in the grid), and
    not the token itself."""
    c = jt + tl.arange(0, BLOCK_N)
    u = t0 + dy * w - RX + c
    u_in = (u >= 0) & (u < n)
    cc = c[None, :]
    pair = (cc >= c_lo[:, None]) & (cc <= c_hi[:, None]) & row_ok[:, None]
    if dy == 0:
        pair = pair & (cc != (i + RX)[:, None])
    return u, u_in, cc - (i + RX)[:, None], pair


@triton.jit
def _window_columns(i, col, t_ok, w, RX):
    """Per token: the band columns of its window clipped to its grid row (empty for padding tokens)."""
    c_lo = i + RX + tl.maximum(-RX, -col)
    c_hi = tl.where(t_ok, i + RX + tl.minimum(RX, w - 1 - col), -1)
    return c_lo, c_hi


@triton.jit
def _tiles(X, base, rows, ok, dims, D, SPLIT: tl.constexpr):
    """Rows ``rows`` of one head's (n, D) matrix at ``base``, fp32, split for tf32x3."""
    return _split(_rows_tile(X, base, rows, ok, dims, D, False, False).to(tl.float32), SPLIT)


@triton.jit
def _token_tiles(Q, K, Lse, hrow, t, t_ok, dims, n, D, SPLIT: tl.constexpr):
    """The token block's q and k rows of one head (split) and its LSE."""
    qt_b, qt_s = _tiles(Q, hrow * n * D, t, t_ok, dims, D, SPLIT)
    kt_b, kt_s = _tiles(K, hrow * n * D, t, t_ok, dims, D, SPLIT)
    return qt_b, qt_s, kt_b, kt_s, tl.load(Lse + hrow * n + t, mask=t_ok, other=0.0)


@triton.jit
def _band_exps(qt_b, qt_s, kt_b, kt_s, qu_b, qu_s, ku_b, ku_s, lse_t, lse_u, pair, s, SPLIT: tl.constexpr,
               X3: tl.constexpr, PRECISION: tl.constexpr):
    """exp(s q_t.k_u - lse_t) and exp(s q_u.k_t - lse_u) of one head on a band tile, from two products
    of the token block with the band; exponents outside the window pairs are forced to 0 so no
    inf reaches a later product. Each exponent is the rounded product s x (mul_rn) minus the LSE,
    then scaled to base 2 (as the attention's backward does, triton/spatial_attention.py: _probs).
    The logits round as the LSE pass's forward rounds q_t.k_u and q_u.k_t (k_t q_u^T: _mm_t)."""
    logit_tu = _mm(qt_b, qt_s, tl.trans(ku_b), tl.trans(ku_s), SPLIT, SPLIT, X3, PRECISION)
    logit_ut = _mm_t(kt_b, kt_s, tl.trans(qu_b), tl.trans(qu_s), SPLIT, SPLIT, X3, PRECISION)
    a_tu = tl.exp2(tl.where(pair, (mul_rn(logit_tu, s) - lse_t[:, None]) * LOG2E, 0.0))
    a_ut = tl.exp2(tl.where(pair, (mul_rn(logit_ut, s) - lse_u[None, :]) * LOG2E, 0.0))
    return a_tu, a_ut


@triton.jit
def _head_band(Q, K, Lse, hrow, t, t_ok, u, u_in, pair, dims, n, D, s, qt_b, qt_s, kt_b, kt_s, lse_t,
               LOAD_T: tl.constexpr, SPLIT: tl.constexpr, X3: tl.constexpr, PRECISION: tl.constexpr):
    """One head on a band tile: a_tu, a_ut and the band's q_u, k_u rows (split). The token block's
    tiles are given (one head: loaded once per program) or, with LOAD_T, loaded here."""
    base = hrow * n * D
    if LOAD_T:
        qt_b, qt_s, kt_b, kt_s, lse_t = _token_tiles(Q, K, Lse, hrow, t, t_ok, dims, n, D, SPLIT)
    qu_b, qu_s = _tiles(Q, base, u, u_in, dims, D, SPLIT)
    ku_b, ku_s = _tiles(K, base, u, u_in, dims, D, SPLIT)
    lse_u = tl.load(Lse + hrow * n + u, mask=u_in, other=0.0)
    a_tu, a_ut = _band_exps(qt_b, qt_s, kt_b, kt_s, qu_b, qu_s, ku_b, ku_s, lse_t, lse_u, pair, s, SPLIT, X3,
                            PRECISION)
    return a_tu, a_ut, qu_b, qu_s, ku_b, ku_s


@triton.jit
def _dissimilarity(P, p_base, t, t_ok, u, u_in, n, C):
    """1 - p_t.p_u on a band tile (exact fp32, one outer product per class)."""
    dot = tl.zeros([t.shape[0], u.shape[0]], tl.float32)
    for c in range(C):
        p_t = tl.load(P + p_base + c * n + t, mask=t_ok, other=0.0)
        p_u = tl.load(P + p_base + c * n + u, mask=u_in, other=0.0)
        dot += p_t[:, None] * p_u[None, :]
    return 1.0 - dot


@triton.jit
def _attentive_similarity_fwd_kernel(Q, K, Lse, P, HW, HB, G, Rows, n, h, w, D, C, RY, RX, s, neg_c,
                                     HEADS: tl.constexpr, HAS_G: tl.constexpr, BLOCK_T: tl.constexpr,
                                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                                     QK_TF32: tl.constexpr):
    X3: tl.constexpr = PRECISION == "tf32x3"
    SPLIT: tl.constexpr = X3 and not QK_TF32  # q, k tiles split (16-bit q, k are exact in TF32)
    b = tl.program_id(1)
    t0 = tl.program_id(0) * BLOCK_T
    i = tl.arange(0, BLOCK_T)
    t = t0 + i
    t_ok = t < n
    row, col = t // w, t % w
    dims = tl.arange(0, BLOCK_D)
    head_bias = tl.load(HB)
    p_base = b.to(tl.int64) * C * n
    c_lo, c_hi = _window_columns(i, col, t_ok, w, RX)
    if HEADS == 1:  # the token block's tiles, loaded and split once
        qt_b, qt_s, kt_b, kt_s, lse_t = _token_tiles(Q, K, Lse, b.to(tl.int64), t, t_ok, dims, n, D, SPLIT)
    acc = tl.zeros([BLOCK_T], tl.float32)
    for dy in range(-RY, RY + 1):
        row_ok = (row + dy >= 0) & (row + dy < h)
        for jt in range(0, BLOCK_T + 2 * RX, BLOCK_N):
            u, u_in, dx, pair = _band(t0, i, jt, dy, c_lo, c_hi, row_ok, n, w, RX, BLOCK_N)
            z = tl.zeros([BLOCK_T, BLOCK_N], tl.float32) + head_bias
            if HEADS == 1:
                a_tu, a_ut, _, _, _, _ = _head_band(Q, K, Lse, b.to(tl.int64), t, t_ok, u, u_in, pair, dims, n, D, s,
                                                    qt_b, qt_s, kt_b, kt_s, lse_t, False, SPLIT, X3, PRECISION)
                z += tl.load(HW) * (a_tu + a_ut)
            else:  # a loop, not unrolled: one set of staging buffers for every head
                for m in range(HEADS):
                    a_tu, a_ut, _, _, _, _ = _head_band(Q, K, Lse, b.to(tl.int64) * HEADS + m, t, t_ok, u, u_in, pair,
                                                        dims, n, D, s, z, z, z, z, z, True, SPLIT, X3, PRECISION)
                    z += tl.load(HW + m) * (a_tu + a_ut)
            decay = tl.exp2(neg_c * LOG2E * (dy * dy + dx * dx).to(tl.float32))
            diss = _dissimilarity(P, p_base, t, t_ok, u, u_in, n, C)
            acc += tl.sum(tl.where(pair, decay * _sigmoid(z) * diss, 0.0), 1)
    if HAS_G:
        acc = acc * tl.load(G + b)
    tl.store(Rows + b.to(tl.int64) * n + t, acc, mask=t_ok)


@triton.jit
def _attentive_similarity_bwd_kernel(Q, K, Lse, P, HW, HB, G, Gamma, DQ, DK, DLse, DP, DAlpha, DBeta,
                                     n, h, w, D, C, RY, RX, s, neg_c, HEADS: tl.constexpr, HAS_G: tl.constexpr,
                                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                     BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, QK_TF32: tl.constexpr):
    X3: tl.constexpr = PRECISION == "tf32x3"
    SPLIT: tl.constexpr = X3 and not QK_TF32  # q, k tiles split (16-bit q, k are exact in TF32)
    b = tl.program_id(1)
    t0 = tl.program_id(0) * BLOCK_T
    i = tl.arange(0, BLOCK_T)
    t = t0 + i
    t_ok = t < n
    row, col = t // w, t % w
    dims = tl.arange(0, BLOCK_D)
    cls = tl.arange(0, BLOCK_C)
    head_bias = tl.load(HB)
    g = 1.0
    if HAS_G:
        g = tl.load(G + b)
    p_base = b.to(tl.int64) * C * n
    gamma_t = tl.load(Gamma + b.to(tl.int64) * n + t, mask=t_ok, other=0.0)
    c_lo, c_hi = _window_columns(i, col, t_ok, w, RX)
    if HEADS == 1:  # the token block's tiles, loaded and split once
        qt_b, qt_s, kt_b, kt_s, lse_t = _token_tiles(Q, K, Lse, b.to(tl.int64), t, t_ok, dims, n, D, SPLIT)
    dbeta = tl.zeros([BLOCK_T], tl.float32)
    dp = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    # heads outermost, so that one head's dq, dk accumulators suffice; the mixed logit over every
    # head is recomputed for each
    for m in range(HEADS):
        alpha = tl.load(HW + m)
        hrow_m = b.to(tl.int64) * HEADS + m
        dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        dk = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        rho = tl.zeros([BLOCK_T], tl.float32)
        dalpha = tl.zeros([BLOCK_T], tl.float32)
        for dy in range(-RY, RY + 1):
            row_ok = (row + dy >= 0) & (row + dy < h)
            for jt in range(0, BLOCK_T + 2 * RX, BLOCK_N):
                u, u_in, dx, pair = _band(t0, i, jt, dy, c_lo, c_hi, row_ok, n, w, RX, BLOCK_N)
                z = tl.zeros([BLOCK_T, BLOCK_N], tl.float32) + head_bias
                if HEADS == 1:
                    a_tu, a_ut, qu_b, qu_s, ku_b, ku_s = _head_band(Q, K, Lse, hrow_m, t, t_ok, u, u_in, pair, dims, n,
                                                                    D, s, qt_b, qt_s, kt_b, kt_s, lse_t, False, SPLIT,
                                                                    X3, PRECISION)
                    z += alpha * (a_tu + a_ut)
                else:  # a loop, not unrolled: one set of staging buffers for every head
                    a_tu = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
                    a_ut = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
                    for mm in range(HEADS):
                        a_tu_mm, a_ut_mm, _, _, _, _ = _head_band(Q, K, Lse, b.to(tl.int64) * HEADS + mm, t, t_ok, u,
                                                                  u_in, pair, dims, n, D, s, z, z, z, z, z, True, SPLIT,
                                                                  X3, PRECISION)
                        z += tl.load(HW + mm) * (a_tu_mm + a_ut_mm)
                        a_tu = tl.where(mm == m, a_tu_mm, a_tu)
                        a_ut = tl.where(mm == m, a_ut_mm, a_ut)
                    # head m's band rows
                    qu_b, qu_s = _tiles(Q, hrow_m * n * D, u, u_in, dims, D, SPLIT)
                    ku_b, ku_s = _tiles(K, hrow_m * n * D, u, u_in, dims, D, SPLIT)
                decay = tl.exp2(neg_c * LOG2E * (dy * dy + dx * dx).to(tl.float32))
                wgt = _sigmoid(z)
                diss = _dissimilarity(P, p_base, t, t_ok, u, u_in, n, C)
                gamma_u = tl.load(Gamma + b.to(tl.int64) * n + u, mask=u_in, other=0.0)
                gam = gamma_t[:, None] + gamma_u[None, :]
                dz = tl.where(pair, g * decay * diss * wgt * (1.0 - wgt) * gam, 0.0)
                e = alpha * dz
                wq_b, wq_s = _split(s * a_tu * e, X3)
                dq += _mm(wq_b, wq_s, ku_b, ku_s, X3, SPLIT, X3, PRECISION)
                wk_b, wk_s = _split(s * a_ut * e, X3)
                dk += _mm(wk_b, wk_s, qu_b, qu_s, X3, SPLIT, X3, PRECISION)
                rho += tl.sum(a_tu * e, 1)
                dalpha += tl.sum(0.5 * dz * (a_tu + a_ut), 1)
                if m == 0:
                    dbeta += tl.sum(0.5 * dz, 1)
                    pu_b, pu_s = _split(tl.load(P + p_base + cls[None, :] * n + u[:, None],
                                                mask=u_in[:, None] & (cls[None, :] < C), other=0.0), X3)
                    wp_b, wp_s = _split(tl.where(pair, -g * decay * wgt * gam, 0.0), X3)
                    dp += _mm(wp_b, wp_s, pu_b, pu_s, X3, X3, X3, PRECISION)
        dmask = t_ok[:, None] & (dims[None, :] < D)
        tl.store(DQ + hrow_m * n * D + t[:, None] * D + dims[None, :], dq, mask=dmask)
        tl.store(DK + hrow_m * n * D + t[:, None] * D + dims[None, :], dk, mask=dmask)
        tl.store(DLse + hrow_m * n + t, -rho, mask=t_ok)
        tl.store(DAlpha + hrow_m * n + t, dalpha, mask=t_ok)
    tl.store(DBeta + b.to(tl.int64) * n + t, dbeta, mask=t_ok)
    tl.store(DP + b.to(tl.int64) * C * n + cls[None, :] * n + t[:, None], dp,
             mask=t_ok[:, None] & (cls[None, :] < C))


class _Prepared:
    """Contiguous fp32 views of the window op's inputs and the launch configuration."""

    def __init__(self, q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
        self.batch, self.heads, self.n, self.dim = q.shape
        self.classes, self.h, self.w = probs.shape[1], probs.shape[2], probs.shape[3]
        self.q, self.k = q.contiguous(), k.contiguous()
        self.lse = lse.float().contiguous()
        self.probs = probs.float().contiguous()
        self.head_weight = head_weight.float().reshape(self.heads).contiguous()
        self.head_bias = head_bias.float().reshape(1).contiguous()
        self.sample_weight = None if sample_weight is None else sample_weight.float().reshape(self.batch).contiguous()
        self.scalars = (self.n, self.h, self.w, self.dim, self.classes, min(radius, self.h - 1),
                        min(radius, self.w - 1), float(logit_scale), -0.5 / float(sigma) ** 2)
        gpu = _target.for_gpu(q)
        # A program is BLOCK_T consecutive tokens; for each window row dy it multiplies them with
        # the band of BLOCK_T + 2 rx tokens holding their neighbours, in tiles of BLOCK_N, on tensor
        # cores (fp32 operands, whatever q's dtype, in the dot precision of fp32: tf32x3 by default
        # on a GPU, exact in the interpreter). Only 2 rx + 1 entries of a tile row are window pairs,
        # so small tiles waste least: on a GPU 16 tokens x 16 band columns on one warp (compiled for
        # sm_90 at D = 64: about 348 thread-instructions per window pair in the forward window loop
        # and 860 in the backward, against 1340 and 1680 for the 64-token tiles of per-pair dot
        # products these kernels replaced); the interpreter takes 32 tokens.
        block_t = 16 if gpu else 32
        self.tiles = triton.cdiv(self.n, block_t)
        common = dict(HEADS=self.heads, HAS_G=sample_weight is not None, BLOCK_T=block_t, BLOCK_N=16,
                      BLOCK_D=max(16, triton.next_power_of_2(self.dim)), PRECISION=fp32_precision(q),
                      QK_TF32=q.dtype in (torch.float16, torch.bfloat16),
                      **(dict(num_warps=1) if gpu else {}))
        block_c = max(16, triton.next_power_of_2(self.classes))  # dprobs is a product: 16 columns at least
        self.meta = {_attentive_similarity_fwd_kernel: common,
                     _attentive_similarity_bwd_kernel: dict(common, BLOCK_C=block_c)}

    def launch(self, kernel, *per_sample: torch.Tensor) -> None:
        """``kernel[(token tiles, batch)](inputs, *per_sample, scalars)``; per_sample: tensors with
        the batch first (rows, gradients). A batch past the grid's limit runs in chunks of views."""
        for c in grid_chunks(self.batch):
            g = self.sample_weight[c] if self.sample_weight is not None else self.head_bias
            kernel[(self.tiles, c.stop - c.start)](self.q[c], self.k[c], self.lse[c], self.probs[c], self.head_weight,
                                                   self.head_bias, g, *(t[c] for t in per_sample), *self.scalars,
                                                   **self.meta[kernel])


@torch.library.custom_op("attenscribble_ops::attentive_similarity_forward_triton", mutates_args=())
@_target.on_tensor_device
def attentive_similarity_forward_triton(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, probs: torch.Tensor,
                                        head_weight: torch.Tensor, head_bias: torch.Tensor,
                                        sample_weight: Optional[torch.Tensor], radius: int, sigma: float,
                                        logit_scale: float) -> torch.Tensor:
    p = _Prepared(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale)
    rows = torch.empty((p.batch, p.n), device=q.device, dtype=torch.float32)
    p.launch(_attentive_similarity_fwd_kernel, rows)
    return rows


def _window_backward(grad_rows, p: _Prepared):
    """Window-kernel gradients in fp32: dq, dk, dlse, dprobs, dalpha and dbeta partials."""
    f32 = dict(device=p.q.device, dtype=torch.float32)
    dq, dk = torch.empty(p.q.shape, **f32), torch.empty(p.k.shape, **f32)
    dlse, dalpha = torch.empty(p.lse.shape, **f32), torch.empty(p.lse.shape, **f32)
    dprobs = torch.empty(p.probs.shape, **f32)
    dbeta = torch.empty((p.batch, p.n), **f32)
    p.launch(_attentive_similarity_bwd_kernel, grad_rows.float().contiguous(), dq, dk, dlse, dprobs, dalpha, dbeta)
    return dq, dk, dlse, dprobs, dalpha, dbeta


def _finish(q, k, probs, head_weight, head_bias, dq, dk, dprobs, dalpha, dbeta):
    return (dq.to(q.dtype), dk.to(k.dtype), dprobs.to(probs.dtype),
            dalpha.sum((0, 2)).to(head_weight.dtype).reshape(head_weight.shape),
            dbeta.sum().to(head_bias.dtype).reshape(head_bias.shape))


@torch.library.custom_op("attenscribble_ops::attentive_similarity_backward_triton", mutates_args=())
@_target.on_tensor_device
def attentive_similarity_backward_triton(
        grad_rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, probs: torch.Tensor,
        head_weight: torch.Tensor, head_bias: torch.Tensor, sample_weight: Optional[torch.Tensor], radius: int,
        sigma: float, logit_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _Prepared(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale)
    dq, dk, dlse, dprobs, dalpha, dbeta = _window_backward(grad_rows, p)
    dq, dk, dprobs, dhw, dhb = _finish(q, k, probs, head_weight, head_bias, dq, dk, dprobs, dalpha, dbeta)
    return dq, dk, dlse.to(lse.dtype), dprobs, dhw, dhb


@torch.library.custom_op("attenscribble_ops::attentive_similarity_fused_forward_triton", mutates_args=())
@_target.on_tensor_device
def attentive_similarity_fused_forward_triton(q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor,
                                              head_weight: torch.Tensor, head_bias: torch.Tensor,
                                              sample_weight: Optional[torch.Tensor], radius: int, sigma: float,
                                              logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    lse = _attention_forward(q, k, None, logit_scale)[2].view(q.shape[:3])
    p = _Prepared(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale)
    rows = torch.empty((p.batch, p.n), device=q.device, dtype=torch.float32)
    p.launch(_attentive_similarity_fwd_kernel, rows)
    return rows, lse


@torch.library.custom_op("attenscribble_ops::attentive_similarity_fused_backward_triton", mutates_args=())
@_target.on_tensor_device
def attentive_similarity_fused_backward_triton(
        grad_rows: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
        lse: torch.Tensor, probs: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor,
        sample_weight: Optional[torch.Tensor], radius: int, sigma: float, logit_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _Prepared(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale)
    dq, dk, dlse, dprobs, dalpha, dbeta = _window_backward(grad_rows, p)
    if grad_lse is not None:
        dlse += grad_lse.float()
    # the dense part, d lse / d q and d lse / d k, added into the window terms' fp32 buffers
    _attention_backward(None, None, None, dlse, lse, q, k, None, logit_scale, accumulate_into=(dq, dk))
    return _finish(q, k, probs, head_weight, head_bias, dq, dk, dprobs, dalpha, dbeta)


@attentive_similarity_forward_triton.register_fake
@same_device_fake
def _forward_fake(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32)


@attentive_similarity_backward_triton.register_fake
@same_device_fake
def _backward_fake(grad_rows, q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), lse.new_empty(lse.shape), probs.new_empty(probs.shape),
            head_weight.new_empty(head_weight.shape), head_bias.new_empty(head_bias.shape))


_grad, _setup = window_similarity_autograd(attentive_similarity_backward_triton)
attentive_similarity_forward_triton.register_autograd(_grad, setup_context=_setup)


@attentive_similarity_fused_forward_triton.register_fake
@same_device_fake
def _fused_forward_fake(q, k, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32), q.new_empty(q.shape[:3], dtype=torch.float32)


@attentive_similarity_fused_backward_triton.register_fake
@same_device_fake
def _fused_backward_fake(grad_rows, grad_lse, q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma,
                         logit_scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), probs.new_empty(probs.shape),
            head_weight.new_empty(head_weight.shape), head_bias.new_empty(head_bias.shape))


_fused_grad, _fused_setup = fused_similarity_autograd(attentive_similarity_fused_backward_triton)
attentive_similarity_fused_forward_triton.register_autograd(_fused_grad, setup_context=_fused_setup)
# what the backend calls (torch.func transforms work through these)
_window_op = with_formula(attentive_similarity_forward_triton, _grad, _setup)
_fused_op = with_formula(attentive_similarity_fused_forward_triton, _fused_grad, _fused_setup)
_vmap.register_similarity(attentive_similarity_forward_triton, attentive_similarity_backward_triton,
                          attentive_similarity_fused_forward_triton, attentive_similarity_fused_backward_triton)


@backends.register("attentive_similarity", "triton", check=_attention_check)
def attentive_similarity_triton(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, grid, radius, sigma,
                                logit_scale):
    return fused_loss(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, radius, sigma, logit_scale,
                      _fused_op, _window_op)
