"""Glue of the compiled window kernels of the attentive similarity loss
(csrc/cpu/attentive_similarity.cpp, csrc/cuda/attentive_similarity.cu): fake kernels, autograd, and
the fused "cpu" / "cuda" backends of "attentive_similarity".

The fused loss is two ops: the similarity LSE (handed over by the attention block, or computed by
``spatial_attention_lse``) and the window op. The window op's backward returns dlse = -rho, which
autograd routes into whatever produced the LSE, whose dense flash-style backward completes dq, dk.
No n x n tensor exists at any point.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension, backends
from .spatial_attention import CUDA_MAX_HEAD_DIM, acc_dtype, similarity_lse

_OPS = torch.ops.attenscribble_ops
_WHY = {d: _extension.why_no_kernel("attentive_similarity_forward", d) for d in ("cpu", "cuda")}
_WHY_LSE = {d: _extension.why_no_kernel("spatial_attention_lse", d) for d in ("cpu", "cuda")}


@torch.library.register_fake("attenscribble_ops::attentive_similarity_forward")
def _forward_fake(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=acc_dtype(q.dtype))


@torch.library.register_fake("attenscribble_ops::attentive_similarity_backward")
def _backward_fake(grad_rows, q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    contiguous = dict(memory_format=torch.contiguous_format)
    return (torch.empty_like(q, **contiguous), torch.empty_like(k, **contiguous), torch.empty_like(lse, **contiguous),
            torch.empty_like(probs, **contiguous), torch.empty_like(head_weight, **contiguous),
            torch.empty_like(head_bias, **contiguous))


def _setup(ctx, inputs, output):
    q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale = inputs
    ctx.save_for_backward(q, k, lse, probs, head_weight, head_bias, sample_weight)
    ctx.options = (radius, sigma, logit_scale)


def _backward(ctx, grad_rows):
    q, k, lse, probs, head_weight, head_bias, sample_weight = ctx.saved_tensors
    grads = _OPS.attentive_similarity_backward(grad_rows, q, k, lse, probs, head_weight, head_bias, sample_weight,
                                               *ctx.options)
    needs = ctx.needs_input_grad
    return tuple(g if need else None for g, need in zip(grads, needs[:6])) + (None,) * 4


torch.library.register_autograd("attenscribble_ops::attentive_similarity_forward", _backward, setup_context=_setup)


def _check(device_type: str):
    def check(meta: backends.Meta) -> Optional[str]:
        why = _WHY[device_type] or _WHY_LSE[device_type]
        if why is None and device_type == "cuda" and "head_dim>128" in meta.options:
            why = f"the CUDA kernels support head dims up to {CUDA_MAX_HEAD_DIM}"
        return why

    return check


def fused_loss(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, radius, sigma, logit_scale,
               lse_op, window_op) -> torch.Tensor:
    """The un-normalised loss from an LSE op (q, k, logit_scale) -> lse and a window op (the
    forward of this module's op, or Triton's). Shared by the compiled and the Triton backends."""
    if lse is None:
        lse = lse_op(q, k, logit_scale)
    lse = lse.to(acc_dtype(q.dtype))
    rows = window_op(q, k, lse, probs_grid, head_weight, head_bias, sample_weight, radius, sigma, logit_scale)
    return rows.sum()


def _native(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, grid, radius, sigma, logit_scale):
    return fused_loss(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, radius, sigma, logit_scale,
                      similarity_lse, _OPS.attentive_similarity_forward)


backends.register("attentive_similarity", "cpu", check=_check("cpu"))(_native)
backends.register("attentive_similarity", "cuda", check=_check("cuda"))(_native)
