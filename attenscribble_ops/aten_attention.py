"""The "aten" backend of "spatial_attention": the block's attention through torch's own fused SDPA
kernels (ATen's memory-efficient attention on CUDA, its flash attention on the CPU), which return
the row log-sum-exp next to the output.

Why: on an H100 in fp32 (benchmarks/results, 2026-11-27) torch's memory-efficient SDPA took 5.5 ms
forward + backward at B = 12, 64 x 64 tokens, against 27.2 ms for our CUDA attention kernel.

The op returns ``out = softmax(c q k^T) v`` (c = D**-0.5) and ``lse_sim = logsumexp(s q k^T)``
(s = logit_scale), as the other backends do. Two passes, since the scales differ:

* the output pass: SDPA at scale c, with its own backward for ``dout``;
* the LSE pass: SDPA at scale s with a zero V; only its log-sum-exp is kept.

The gradient of ``lse_sim`` goes through the LSE pass's backward. That backward forms
``dS = P * (dO V^T - delta)`` with ``delta = rowsum(dO * out)``, from the ``out`` it is given.
With V = 0 and an ``out`` whose row dot with ``dO`` is ``-dlse``, it yields ``dS = P * dlse``: the
logits' gradient of ``sum(dlse * lse)``. dq and dk then follow with the kernel's own scale s.
In 16-bit, ``-dlse`` is carried as hi + lo in two columns, each scaled by a power of two per row:
22 bits in fp16, 16 in bf16. All of ``dlse`` is first scaled by one power of two (divided out
of dq, dk afterwards) that brings its largest entry near 1, so that a uniformly tiny gradient (a
loss averaged over many tokens) does not become fp16 subnormals inside the kernel. Rows whose
gradient is 2**10 or more below the largest still round to fp16 subnormals in dS, as in any fp16
attention backward (GradScaler keeps that range in use).

The carrier tensors have the memory layout of the kernel's own output, (B, n, heads, W) viewed as
(B, heads, n, W): torch's CUDA backward reads ``out`` with the row stride heads * W it implies.

Head dims: q, k and v are zero-padded to one width W = max(D, Dv), a multiple of 8 on CUDA (the
kernels' alignment); zero columns change neither the logits nor the output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import backends
from ._composite import acc_dtype, first_order, two_forms
from .reference.spatial_attention import spatial_attention_reference


def _width(q: torch.Tensor, d: int, dv: int) -> int:
    w = max(d, dv)
    return -(-w // 8) * 8 if q.device.type == "cuda" else w


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    x = x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))
    return x.contiguous()


def nan_rows_kept(out: torch.Tensor, q: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``out`` (one row per token of q, with or without a last axis) NaN where q's row holds a NaN,
    as the reference and the fused kernels give. torch's CPU flash kernel returns 0 there (its row
    maximum skips the NaN): the backends built on SDPA would otherwise differ from the others.
    ``inplace``: into ``out`` itself (a kernel's fresh output that autograd has not saved)."""
    rows = torch.isnan(q).any(-1)
    rows = rows[..., None] if out.dim() == q.dim() else rows
    return out.masked_fill_(rows, float("nan")) if inplace else out.masked_fill(rows, float("nan"))


def _sdpa_forward(q, k, v, scale):
    """(out, lse, state): lse is (B, heads, >= n), fp32 (fp64 for fp64 on the CPU); state is what
    the backward needs besides q, k, v, out and lse."""
    if q.device.type == "cuda":
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale)
        return out, lse, (seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse, ()


def _sdpa_backward(dout, q, k, v, out, lse, state, scale):
    """(dq, dk, dv) of SDPA given its saved forward."""
    if q.device.type == "cuda":
        seed, offset = state
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], False, scale=scale)
        return dq, dk, dv
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, scale=scale)


def _pow2_floor(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """2**floor(log2|x|) clamped to [2**low, 2**high] (2**low where x == 0), in x's dtype."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** low))).clamp(low, high)
    return torch.exp2(exponent)


def _lse_carrier(dlse: torch.Tensor, width: int, dtype: torch.dtype) -> tuple:
    """(dout, out, factor) for the LSE pass's backward: rowsum(dout * out) = -dlse * factor in
    the kernel's fp32 arithmetic, with ``factor`` a power of two that brings max|dlse| near 1."""
    g = dlse.to(acc_dtype(dtype))
    biggest = g.abs().amax()
    factor = 1.0 / _pow2_floor(biggest, -126, 126) if dtype in (torch.float16, torch.bfloat16) else None
    if factor is not None:
        g = g * factor
    def carrier(*columns):
        # (B, heads, n, width) in the layout of the kernel's output ((B, n, heads, width) transposed):
        # the given per-row columns, then zeros; built without writing into a tensor, so that
        # torch.func.vmap can batch it (jacrev)
        cols = torch.stack([c.to(dtype).transpose(1, 2) for c in columns], -1)
        rest = cols.new_zeros(cols.shape[:-1] + (width - len(columns),))
        return torch.cat([cols, rest], -1).transpose(1, 2)

    if dtype in (torch.float16, torch.bfloat16):
        low, high = (-14, 15) if dtype == torch.float16 else (-126, 126)
        sigma = _pow2_floor(g, low, high)  # per row: -g / sigma lies in [1, 2) where it can
        hi = (-g / sigma).to(dtype)
        lo = (-g / sigma - hi.to(g.dtype)).to(dtype)
        pairs = ((sigma, hi), (sigma, lo))[:min(width, 2)]
        dout, out = carrier(*(d for d, _ in pairs)), carrier(*(o for _, o in pairs))
    else:
        dout, out = carrier(torch.ones_like(g)), carrier(-g)
    return dout, out, factor


def _like(x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """x in the memory layout of ``layout`` (a kernel's output: (B, n, heads, W) transposed, or
    contiguous), without writing into a tensor, so that torch.func.vmap can batch it."""
    if layout.transpose(1, 2).is_contiguous():
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout.is_contiguous():
        return x.contiguous()
    return torch.empty_like(layout).copy_(x)


def _gradients(ctx, saved, dout, dlse):
    """dq, dk, dv of _AtenAttention (None where nothing flows) from its saved tensors."""
    q, k, v, out_p, lse_a, lse_s, *state = saved
    d, dv, width, c, s, n_state = ctx.meta
    qp, kp, vp = _pad(q, width), _pad(k, width), _pad(v, width)  # as the forward's
    state_a, state_s = tuple(state[:n_state]), tuple(state[n_state:])
    acc = acc_dtype(qp.dtype)
    dq = dk = dvp = None
    if dout is not None:  # in the layout of the kernel's output, as the carrier below
        dout_p = _like(dout if width == dv else F.pad(dout, (0, width - dv)), out_p)
        dq, dk, dvp = _sdpa_backward(dout_p, qp, kp, vp, out_p, lse_a, state_a, c)
    if dlse is not None:
        carrier_dout, carrier_out, factor = _lse_carrier(dlse, width, qp.dtype)
        zero_v = torch.zeros_like(vp)
        dq2, dk2, _ = _sdpa_backward(carrier_dout, qp, kp, zero_v, carrier_out, lse_s, state_s, s)
        dq2, dk2 = dq2.to(acc), dk2.to(acc)
        if factor is not None:
            dq2, dk2 = dq2 / factor, dk2 / factor
        dq = dq2 if dq is None else dq.to(acc) + dq2
        dk = dk2 if dk is None else dk.to(acc) + dk2
    dq = None if dq is None else dq[..., :d].to(qp.dtype)
    dk = None if dk is None else dk[..., :d].to(kp.dtype)
    dv_out = None if dvp is None else dvp[..., :dv].to(vp.dtype)  # None: v had no effect
    return dq, dk, dv_out


@two_forms
class _AtenAttention(torch.autograd.Function):
    """forward(q, k, v, logit_scale) -> (out, lse_sim, *saved): ``saved`` (not differentiable) is
    what the backward needs besides the inputs, returned rather than kept on a ctx so that the
    function has the form torch.func's transforms take (forward without ctx, setup_context)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, logit_scale):
        d, dv = q.shape[-1], v.shape[-1]
        width = _width(q, d, dv)
        qp, kp, vp = _pad(q, width), _pad(k, width), _pad(v, width)
        c = d ** -0.5
        out_p, lse_a, state_a = _sdpa_forward(qp, kp, vp, c)
        _, lse_s, state_s = _sdpa_forward(qp, kp, torch.zeros_like(vp), logit_scale)
        out = nan_rows_kept(out_p[..., :dv].contiguous() if width != dv else out_p, q, inplace=True)
        lse = nan_rows_kept(lse_s[..., :q.shape[2]].to(acc_dtype(q.dtype), copy=True), q, inplace=True)
        # the kernel's padded output where it is not ``out`` itself (tensors only: torch.compile)
        return (out, lse, out.new_empty(0) if out is out_p else out_p, lse_a, lse_s, *state_a, *state_s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, logit_scale = inputs
        out, _, out_p, lse_a, lse_s, *state = output
        ctx.mark_non_differentiable(*output[2:])
        d, dv = q.shape[-1], v.shape[-1]
        width = _width(q, d, dv)
        ctx.save_for_backward(q, k, v, out if width == dv else out_p, lse_a, lse_s, *state)
        ctx.meta = (d, dv, width, d ** -0.5, logit_scale, len(state) // 2)  # the two passes' states
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its pass is skipped

    @staticmethod
    def backward(ctx, dout, dlse, *_):
        saved = ctx.saved_tensors  # unpacked once (non-reentrant checkpointing allows no second unpack)
        return first_order("spatial attention", lambda: _gradients(ctx, saved, dout, dlse),
                           (*saved[:3], dout, dlse)) + (None,)


def check(meta: backends.Meta) -> Optional[str]:
    """Why torch's fused attention cannot run inputs described by ``meta`` (None: it can)."""
    if meta.device_type == "cuda" and meta.dtype == torch.float64:
        return "torch's memory-efficient attention has no float64 kernel; use 'cuda' or 'reference' for float64"
    if meta.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"torch's fused attention does not take {meta.dtype}"
    return None


@backends.register("spatial_attention", "aten", check=check, deterministic=False)
def spatial_attention_aten(q, k, v, logit_scale, tie_qk=False):
    """``tie_qk``: also return q and k themselves, as the reference does (autograd adds the loss's
    gradients to the attention's)."""
    if q.numel() == 0 or v.numel() == 0:  # nothing to launch: the reference's empty results
        return spatial_attention_reference(q, k, v, logit_scale, tie_qk)
    out, lse = _AtenAttention.call(q, k, v, float(logit_scale))[:2]
    return (out, lse, q, k) if tie_qk else (out, lse)
