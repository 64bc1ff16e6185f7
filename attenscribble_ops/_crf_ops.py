"""What the fused masked CRF operators share, whichever language implements them (C++/CUDA in
native/masked_crf.py, Triton in triton/masked_crf.py): the argument list, the fake kernel and
the autograd formula.

Every such operator has the schema

    op(probs, image?, mask_dst?, mask_src?, compat?, table: float[], radius: int[], spacing: float[],
       zero_padding: bool, with_grad: bool) -> (raw, grad)

raw: the 0-d un-normalised loss in the accumulate dtype. grad: with ``with_grad``, d raw / d probs
from the same pass over the window (the loss and its gradient need the same window sums, so
computing them together halves the work of a training step), accumulate dtype, shape of probs;
without, an empty (0,) tensor. Autograd saves only that gradient and scales it by the upstream
gradient: nothing window-sized is ever kept.

The backends call an operator through :func:`loss`. In eager mode with a gradient to compute, it
runs the operator inside a plain ``torch.autograd.Function`` with the same formula as the one
registered with ``torch.library``. The registered path rebuilds the argument list from the schema
(``fill_defaults``) and wraps the call in a generated ``autograd.Function`` on every call. On the
development machine (Triton's launches compiled for sm_90 and not run, both paths in one process)
this path took a masked CRF forward from 200 to 161 us, forward + backward from 321 to 230 us.
The operator itself is still dispatched (its no-gradient path), so dispatch modes, fake tensors
and tensor subclasses see it; under torch.compile the operator is called as registered.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import accumulate_dtype
from ._crf_params import CRFParams


def op_arguments(probs: torch.Tensor, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
                 mask_src: Optional[torch.Tensor], compat: Optional[torch.Tensor], params: CRFParams) -> tuple:
    """The operator arguments for a backend call; the gradient is computed when autograd will
    need it (read from metadata, so torch.compile traces it as a constant)."""
    channels = 0 if image is None else image.shape[1]
    with_grad = torch.is_grad_enabled() and probs.requires_grad
    return (probs, image, mask_dst, mask_src, compat, params.table(channels), list(params.radius),
            list(params.spacing), params.zero_padding, with_grad)


def _scaled_gradient(grad_raw: torch.Tensor, grad: torch.Tensor, probs_dtype: torch.dtype) -> torch.Tensor:
    """d loss / d probs from the upstream gradient of the raw loss and the saved d raw / d probs."""
    return (grad_raw.to(grad.dtype) * grad).to(probs_dtype)


class _EagerLoss(torch.autograd.Function):
    """The registered autograd formula of the operators without torch.library's per-call argument
    handling (module docstring). forward(op, *operator arguments) -> raw."""

    @staticmethod
    def forward(ctx, op, probs, *rest):
        raw, grad = op(probs, *rest)  # grad mode is off here: the operator's no-gradient path
        ctx.probs_dtype = probs.dtype
        ctx.save_for_backward(grad)
        return raw

    @staticmethod
    def backward(ctx, grad_raw):
        (grad,) = ctx.saved_tensors
        return (None, _scaled_gradient(grad_raw, grad, ctx.probs_dtype)) + (None,) * 9


def loss(op, probs: torch.Tensor, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
         mask_src: Optional[torch.Tensor], compat: Optional[torch.Tensor], params: CRFParams) -> torch.Tensor:
    """The un-normalised loss from the operator ``op`` (a backend's), differentiable in probs."""
    args = op_arguments(probs, image, mask_dst, mask_src, compat, params)
    if args[-1] and not torch.compiler.is_compiling():
        return _EagerLoss.apply(op, *args)
    return op(*args)[0]


def register_fake_and_autograd(name: str) -> None:
    """The fake kernel and the autograd formula of the operator ``name``."""

    @torch.library.register_fake(name)
    def _fake(probs, image, mask_dst, mask_src, compat, table, radius, spacing, zero_padding, with_grad):
        acc = accumulate_dtype(probs.dtype)
        return probs.new_empty((), dtype=acc), probs.new_empty(probs.shape if with_grad else (0,), dtype=acc)

    def setup_context(ctx, inputs, output):
        ctx.with_grad = inputs[-1]
        ctx.probs_dtype = inputs[0].dtype
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else autograd allocates a zero gradient for output[1]
        if ctx.needs_input_grad[0] and ctx.with_grad:
            ctx.save_for_backward(output[1])

    def backward(ctx, grad_raw, _):
        if grad_raw is None or not ctx.needs_input_grad[0]:
            return (None,) * 10
        if not ctx.with_grad:
            raise RuntimeError(f"{name} was called with with_grad=False, so it has no gradient to give; call it "
                               "with with_grad=True (masked_crf_loss does when probs requires grad)")
        (grad,) = ctx.saved_tensors
        return (_scaled_gradient(grad_raw, grad, ctx.probs_dtype),) + (None,) * 9

    torch.library.register_autograd(name, backward, setup_context=setup_context)
