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
Decomposition: one program per (block of BLOCK_T consecutive tokens, sample); a program loops
over the window offsets (a neighbour block is the token block shifted by dy * w + dx, so loads
stay contiguous) and, in the backward, over heads outermost so one head's dq/dk accumulators
suffice. Each program writes only its own tokens' outputs: no atomics, deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import backends
from . import _target
from .._composite import fused_loss, fused_similarity_autograd
from .spatial_attention import _backward as _attention_backward
from .spatial_attention import _forward as _attention_forward
from .spatial_attention import check as _attention_check
from .spatial_attention import grid_chunks


@triton.jit
def _window_logit(Q, K, Lse, qk_base, lse_base, t, u, t_ok, u_ok, dims, n, D, s):
    """exp(s q_t.k_u - lse_t) and exp(s q_u.k_t - lse_u) for one head; 0 on invalid lanes."""
    dmask = dims[None, :] < D
    q_t = tl.load(Q + qk_base + t[:, None] * D + dims[None, :], mask=t_ok[:, None] & dmask, other=0.0).to(tl.float32)
    k_t = tl.load(K + qk_base + t[:, None] * D + dims[None, :], mask=t_ok[:, None] & dmask, other=0.0).to(tl.float32)
    q_u = tl.load(Q + qk_base + u[:, None] * D + dims[None, :], mask=u_ok[:, None] & dmask, other=0.0).to(tl.float32)
    k_u = tl.load(K + qk_base + u[:, None] * D + dims[None, :], mask=u_ok[:, None] & dmask, other=0.0).to(tl.float32)
    lse_t = tl.load(Lse + lse_base + t, mask=t_ok, other=0.0)
    lse_u = tl.load(Lse + lse_base + u, mask=u_ok, other=0.0)
    # exponents of invalid lanes are forced to 0 so no inf can reach a later product
    a_tu = tl.exp(tl.where(u_ok, s * tl.sum(q_t * k_u, 1) - lse_t, 0.0))
    a_ut = tl.exp(tl.where(u_ok, s * tl.sum(q_u * k_t, 1) - lse_u, 0.0))
    return a_tu, a_ut, q_u, k_u


@triton.jit
def _window_pair(Q, K, Lse, P, HW, head_bias, b, t, u, t_ok, u_ok, dims, cls, n, D, C, HEADS, s):
    """Mixed logit z over all heads, 1 - p_t.p_u, and p_u."""
    z = tl.zeros(t.shape, tl.float32) + head_bias
    for m in range(HEADS):
        row = (b * HEADS + m).to(tl.int64)
        a_tu, a_ut, _, _ = _window_logit(Q, K, Lse, row * n * D, row * n, t, u, t_ok, u_ok, dims, n, D, s)
        z += tl.load(HW + m) * (a_tu + a_ut)
    cmask = cls[None, :] < C
    p_base = b.to(tl.int64) * C * n
    p_t = tl.load(P + p_base + cls[None, :] * n + t[:, None], mask=t_ok[:, None] & cmask, other=0.0)
    p_u = tl.load(P + p_base + cls[None, :] * n + u[:, None], mask=u_ok[:, None] & cmask, other=0.0)
    diss = 1.0 - tl.sum(p_t * p_u, 1)
    return z, diss, p_u


@triton.jit
def _attentive_similarity_fwd_kernel(Q, K, Lse, P, HW, HB, G, Rows, n, h, w, D, C, HEADS, RY, RX, s, neg_c,
                                     HAS_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                                     BLOCK_C: tl.constexpr):
    b = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n
    row, col = t // w, t % w
    dims = tl.arange(0, BLOCK_D)
    cls = tl.arange(0, BLOCK_C)
    head_bias = tl.load(HB)
    acc = tl.zeros([BLOCK_T], tl.float32)
    for dy in range(-RY, RY + 1):
        for dx in range(-RX, RX + 1):
            u = t + dy * w + dx
            u_ok = t_ok & (row + dy >= 0) & (row + dy < h) & (col + dx >= 0) & (col + dx < w) & ((dy != 0) | (dx != 0))
            z, diss, _ = _window_pair(Q, K, Lse, P, HW, head_bias, b, t, u, t_ok, u_ok, dims, cls, n, D, C, HEADS, s)
            decay = tl.exp(tl.zeros([BLOCK_T], tl.float32) + neg_c * (dy * dy + dx * dx))
            acc += tl.where(u_ok, decay * tl.sigmoid(z) * diss, 0.0)
    if HAS_G:
        acc = acc * tl.load(G + b)
    tl.store(Rows + b.to(tl.int64) * n + t, acc, mask=t_ok)


@triton.jit
def _attentive_similarity_bwd_kernel(Q, K, Lse, P, HW, HB, G, Gamma, DQ, DK, DLse, DP, DAlpha, DBeta,
                                     n, h, w, D, C, HEADS, RY, RX, s, neg_c, HAS_G: tl.constexpr,
                                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n
    row, col = t // w, t % w
    dims = tl.arange(0, BLOCK_D)
    cls = tl.arange(0, BLOCK_C)
    head_bias = tl.load(HB)
    g = 1.0
    if HAS_G:
        g = tl.load(G + b)
    gamma_t = tl.load(Gamma + b.to(tl.int64) * n + t, mask=t_ok, other=0.0)
    dbeta = tl.zeros([BLOCK_T], tl.float32)
    dp = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for m in range(HEADS):
        alpha = tl.load(HW + m)
        hrow = (b * HEADS + m).to(tl.int64)
        dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        dk = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        rho = tl.zeros([BLOCK_T], tl.float32)
        dalpha = tl.zeros([BLOCK_T], tl.float32)
        for dy in range(-RY, RY + 1):
            for dx in range(-RX, RX + 1):
                u = t + dy * w + dx
                u_ok = t_ok & (row + dy >= 0) & (row + dy < h) & (col + dx >= 0) & (col + dx < w) & \
                    ((dy != 0) | (dx != 0))
                z, diss, p_u = _window_pair(Q, K, Lse, P, HW, head_bias, b, t, u, t_ok, u_ok, dims, cls, n, D, C,
                                            HEADS, s)
                a_tu, a_ut, q_u, k_u = _window_logit(Q, K, Lse, hrow * n * D, hrow * n, t, u, t_ok, u_ok, dims, n,
                                                     D, s)
                decay = tl.exp(tl.zeros([BLOCK_T], tl.float32) + neg_c * (dy * dy + dx * dx))
                wgt = tl.sigmoid(z)
                gam = gamma_t + tl.load(Gamma + b.to(tl.int64) * n + u, mask=u_ok, other=0.0)
                dz = tl.where(u_ok, g * decay * diss * wgt * (1.0 - wgt) * gam, 0.0)
                e = alpha * dz
                dq += (s * a_tu * e)[:, None] * k_u
                dk += (s * a_ut * e)[:, None] * q_u
                rho += a_tu * e
                dalpha += 0.5 * dz * (a_tu + a_ut)
                first = m == 0
                dbeta += tl.where(first, 0.5 * dz, 0.0)
                dp += tl.where(first & u_ok, -g * decay * wgt * gam, 0.0)[:, None] * p_u
        dmask = t_ok[:, None] & (dims[None, :] < D)
        tl.store(DQ + hrow * n * D + t[:, None] * D + dims[None, :], dq, mask=dmask)
        tl.store(DK + hrow * n * D + t[:, None] * D + dims[None, :], dk, mask=dmask)
        tl.store(DLse + hrow * n + t, -rho, mask=t_ok)
        tl.store(DAlpha + hrow * n + t, dalpha, mask=t_ok)
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
        self.scalars = (self.n, self.h, self.w, self.dim, self.classes, self.heads, min(radius, self.h - 1),
                        min(radius, self.w - 1), float(logit_scale), -0.5 / float(sigma) ** 2)
        block_t = 64 if _target.for_gpu(q) else 32
        self.tiles = triton.cdiv(self.n, block_t)
        self.meta = dict(HAS_G=sample_weight is not None, BLOCK_T=block_t,
                         BLOCK_D=max(16, triton.next_power_of_2(self.dim)),
                         BLOCK_C=max(2, triton.next_power_of_2(self.classes)))

    def launch(self, kernel, *per_sample: torch.Tensor) -> None:
        """``kernel[(token tiles, batch)](inputs, *per_sample, scalars)``; per_sample: tensors with
        the batch first (rows, gradients). A batch past the grid's limit runs in chunks of views."""
        for c in grid_chunks(self.batch):
            g = self.sample_weight[c] if self.sample_weight is not None else self.head_bias
            kernel[(self.tiles, c.stop - c.start)](self.q[c], self.k[c], self.lse[c], self.probs[c], self.head_weight,
                                                   self.head_bias, g, *(t[c] for t in per_sample), *self.scalars,
                                                   **self.meta)


@torch.library.custom_op("attenscribble_ops::attentive_similarity_forward_triton", mutates_args=())
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
def _forward_fake(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32)


@attentive_similarity_backward_triton.register_fake
def _backward_fake(grad_rows, q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), lse.new_empty(lse.shape), probs.new_empty(probs.shape),
            head_weight.new_empty(head_weight.shape), head_bias.new_empty(head_bias.shape))


def _setup(ctx, inputs, output):
    q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale = inputs
    ctx.save_for_backward(q, k, lse, probs, head_weight, head_bias, sample_weight)
    ctx.options = (radius, sigma, logit_scale)


def _grad(ctx, grad_rows):
    q, k, lse, probs, head_weight, head_bias, sample_weight = ctx.saved_tensors
    grads = attentive_similarity_backward_triton(grad_rows, q, k, lse, probs, head_weight, head_bias, sample_weight,
                                                 *ctx.options)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:6])) + (None,) * 4


attentive_similarity_forward_triton.register_autograd(_grad, setup_context=_setup)


@attentive_similarity_fused_forward_triton.register_fake
def _fused_forward_fake(q, k, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32), q.new_empty(q.shape[:3], dtype=torch.float32)


@attentive_similarity_fused_backward_triton.register_fake
def _fused_backward_fake(grad_rows, grad_lse, q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma,
                         logit_scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), probs.new_empty(probs.shape),
            head_weight.new_empty(head_weight.shape), head_bias.new_empty(head_bias.shape))


_fused_grad, _fused_setup = fused_similarity_autograd(attentive_similarity_fused_backward_triton)
attentive_similarity_fused_forward_triton.register_autograd(_fused_grad, setup_context=_fused_setup)


@backends.register("attentive_similarity", "triton", check=_attention_check)
def attentive_similarity_triton(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, grid, radius, sigma,
                                logit_scale):
    return fused_loss(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, radius, sigma, logit_scale,
                      attentive_similarity_fused_forward_triton, attentive_similarity_forward_triton)
