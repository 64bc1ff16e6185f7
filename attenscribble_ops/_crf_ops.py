"""What the fused masked CRF operators share, whichever language implements them (C++/CUDA in
native/masked_crf.py, Triton in triton/masked_crf.py): the argument list, the fake kernel and
the autograd formula.

Every such operator has the schema

    op(probs, image?, mask_dst?, mask_src?, compat?, table: float[], radius: int[], spacing: float[],
       zero_padding: bool, with_grad: bool) -> (raw, grad)

raw: the 0-d un-normalised loss in the accumulate dtype. grad: with ``with_grad``, d raw / d probs
from the same pass over the window (the loss and its gradient need the same window sums, so
computing them together halves the work of a training step), accumulate dtype, shape of probs;
without, an empty (0,) tensor. Autograd saves that gradient (and, for a double backward, probs and
the operator's other tensor arguments: :class:`_Gradient`) and scales it by the upstream gradient:
nothing window-sized is ever kept.

The backends call an operator through :func:`loss`. In eager mode with a gradient to compute, it
runs the operator inside an ``autograd.Function`` of its own (:class:`_EagerLoss`, in the form
torch.func's transforms take: ``_composite.two_forms``) with the same formula as the one
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

from . import _vmap
from ._checks import accumulate_dtype, same_device_fake
from ._composite import two_forms
from ._crf_params import CRFParams


def op_arguments(probs: torch.Tensor, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
                 mask_src: Optional[torch.Tensor], compat: Optional[torch.Tensor], params: CRFParams) -> tuple:
    """The operator arguments for a backend call; the gradient is computed when autograd will
    need it (read from metadata, so torch.compile traces it as a constant)."""
    channels = 0 if image is None else image.shape[1]
    with_grad = torch.is_grad_enabled() and probs.requires_grad
    return (probs, image, mask_dst, mask_src, compat, params.table(channels), list(params.radius),
            list(params.spacing), params.zero_padding, with_grad)


def _scaled_gradient(grad_raw: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, op, rest: tuple
                     ) -> torch.Tensor:
    """d loss / d probs from the upstream gradient of the raw loss and the saved d raw / d probs.
    Under create_graph it is differentiable again, in both (see :class:`_Gradient`)."""
    if torch.is_grad_enabled():
        if rest is None:  # a compiled graph's backward
            raise RuntimeError("double backward through a compiled masked CRF loss is not supported; call it "
                               "eagerly for a gradient penalty or Hessian-vector products")
        grad = _Gradient.call(probs, grad, op, rest)
    return (grad_raw.to(grad.dtype) * grad).to(probs.dtype)


@two_forms
class _Gradient(torch.autograd.Function):
    """g(p) = d raw / d probs at p, given its value ``grad`` there, as a differentiable function of
    p (for double backward: gradient penalties, Hessian-vector products); ``op(probs, *rest)`` is
    the operator.

    raw is a quadratic form in probs: the kernel, the masks, the compatibility matrix and the
    zero-padding border term do not depend on them. So g is linear, g(p) = H p with H the
    (symmetric) Hessian, and the derivative of <u, g(p)> in p is H u = g(u): the operator's own
    gradient with u in place of the probabilities, differentiable again the same way. u comes in
    the accumulate dtype (``grad``'s), which the operator takes probs in as well (its other tensor
    arguments are in that dtype whatever the probabilities' own)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(p, grad, op, rest):
        return grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, _, op, rest = inputs
        ctx.op, ctx.rest, ctx.p_dtype = op, rest, p.dtype

    @staticmethod
    def backward(ctx, u):
        if u is None or not ctx.needs_input_grad[0]:
            return (None,) * 4
        with torch.no_grad():
            hu = ctx.op(u, *ctx.rest)[1]
        if torch.is_grad_enabled():
            hu = _Gradient.call(u, hu, ctx.op, ctx.rest)
        return (hu.to(ctx.p_dtype),) + (None,) * 3


_TENSORS = 4  # image, mask_dst, mask_src, compat: the tensor arguments after probs


@two_forms
class _EagerLoss(torch.autograd.Function):
    """The registered autograd formula of the operators without torch.library's per-call argument
    handling (module docstring), in the form torch.func's transforms take (forward without ctx,
    setup_context; torch.library's own wrapper has the old form, which they refuse).
    forward(op, *operator arguments) -> (raw, grad), grad not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op, probs, *rest):
        return op(probs, *rest)  # grad mode is off here: the operator's no-gradient path

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, probs, *rest = inputs
        ctx.op, ctx.options = op, tuple(rest[_TENSORS:])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        # image, masks and compat only for a double backward; saved (not attributes) so that
        # autograd frees them with the graph's buffers and saved-tensor hooks see them
        ctx.save_for_backward(output[1], probs, *rest[:_TENSORS])

    @staticmethod
    def backward(ctx, grad_raw, _):
        if grad_raw is None:
            return (None,) * 11
        grad, probs, *tensors = ctx.saved_tensors
        rest = tuple(tensors) + ctx.options
        return (None, _scaled_gradient(grad_raw, grad, probs, ctx.op, rest)) + (None,) * 9


def loss(op, probs: torch.Tensor, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
         mask_src: Optional[torch.Tensor], compat: Optional[torch.Tensor], params: CRFParams) -> torch.Tensor:
    """The un-normalised loss from the operator ``op`` (a backend's), differentiable in probs."""
    args = op_arguments(probs, image, mask_dst, mask_src, compat, params)
    if args[-1] and not torch.compiler.is_compiling():
        return _EagerLoss.call(op, *args)[0]
    return op(*args)[0]


def register_fake_and_autograd(name: str) -> None:
    """The fake kernel, the autograd formula and the vmap rule (a loop: the loss is a sum over the
    batch) of the operator ``name``."""

    @torch.library.register_fake(name)
    @same_device_fake
    def _fake(probs, image, mask_dst, mask_src, compat, table, radius, spacing, zero_padding, with_grad):
        acc = accumulate_dtype(probs.dtype)
        return probs.new_empty((), dtype=acc), probs.new_empty(probs.shape if with_grad else (0,), dtype=acc)

    namespace, op_name = name.split("::")
    op = getattr(getattr(torch.ops, namespace), op_name)

    def setup_context(ctx, inputs, output):
        ctx.with_grad = inputs[-1]
        ctx.options = tuple(inputs[1 + _TENSORS:])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else autograd allocates a zero gradient for output[1]
        if ctx.needs_input_grad[0] and ctx.with_grad:
            # the other tensor arguments only for a double backward, which compiled graphs do not
            # support: a compiled graph does not keep them for its backward
            extra = () if torch.compiler.is_compiling() else tuple(inputs[1:1 + _TENSORS])
            ctx.save_for_backward(output[1], inputs[0], *extra)

    def backward(ctx, grad_raw, _):
        if grad_raw is None or not ctx.needs_input_grad[0]:
            return (None,) * 10
        if not ctx.with_grad:
            raise RuntimeError(f"{name} was called with with_grad=False, so it has no gradient to give; call it "
                               "with with_grad=True (masked_crf_loss does when probs requires grad)")
        grad, probs, *tensors = ctx.saved_tensors
        rest = tuple(tensors) + ctx.options if tensors else None
        return (_scaled_gradient(grad_raw, grad, probs, op, rest),) + (None,) * 9

    torch.library.register_autograd(name, backward, setup_context=setup_context)
    _vmap.register_looped(op.default)
