"""What the fused masked CRF operators share, whichever language implements them (C++/CUDA in
native/masked_crf.py, Triton in triton/masked_crf.py): the argument list, the fake kernels and
the autograd formula.

Every such operator pair has the schema

    forward(probs, image?, mask_dst?, mask_src?, compat?, table: float[], radius: int[],
            spacing: float[], zero_padding: bool) -> raw            (0-d, accumulate dtype)
    backward(grad, <the same arguments>) -> d raw / d probs * grad  (shape and dtype of probs)

The forward keeps nothing: the backward recomputes the window from the inputs, so autograd saves
only the input tensors (no activation the size of a window or of probs).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._checks import accumulate_dtype
from ._crf_params import CRFParams


def op_arguments(probs: torch.Tensor, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
                 mask_src: Optional[torch.Tensor], compat: Optional[torch.Tensor], params: CRFParams) -> tuple:
    """The operator arguments for a backend call (see the module docstring)."""
    channels = 0 if image is None else image.shape[1]
    return (probs, image, mask_dst, mask_src, compat, params.table(channels), list(params.radius),
            list(params.spacing), params.zero_padding)


def register_fake_and_autograd(forward_name: str, backward_name: str, backward_op: Callable) -> None:
    """Fake kernels for both operators and the autograd formula of ``forward_name``."""

    @torch.library.register_fake(forward_name)
    def _forward_fake(probs, image, mask_dst, mask_src, compat, table, radius, spacing, zero_padding):
        return probs.new_empty((), dtype=accumulate_dtype(probs.dtype))

    @torch.library.register_fake(backward_name)
    def _backward_fake(grad, probs, image, mask_dst, mask_src, compat, table, radius, spacing, zero_padding):
        return torch.empty(probs.shape, dtype=probs.dtype, device=probs.device)

    def setup_context(ctx, inputs, output):
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*inputs[:5])
            ctx.options = inputs[5:]

    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        grad_probs = backward_op(grad, *ctx.saved_tensors, *ctx.options)
        return (grad_probs,) + (None,) * 8

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
