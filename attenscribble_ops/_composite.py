"""Compositions of the fused ops shared by the compiled ("cpu", "cuda") and Triton backends. Plain
PyTorch: importing it registers nothing, so either backend family loads without the other.

* :func:`fused_loss`: the attentive similarity loss from a fused op (no LSE handed over) or the
  window op (an LSE from the attention).
* :func:`attention` / :class:`TiedAttention`: the spatial attention; with ``tie_qk=True`` it also
  returns q and k as views owned by its autograd node, for the similarity loss. The loss's window
  terms of dq, dk then arrive in the attention's backward as the gradients of those views, and an
  accumulate op adds the attention's own dq, dk into a copy of them in its sweep (no separate
  dq, dk pair to add afterwards). Not into the incoming tensors themselves: autograd may hand
  one tensor to both views, or the caller's own ``grad_outputs``.
* :func:`first_order`: the backwards of the attention and the similarity loss are not themselves
  differentiable; under ``create_graph=True`` their gradients raise if a second backward reaches
  them, instead of silently missing terms.
* :func:`with_formula` / :func:`two_forms`: torch.func. torch.library differentiates a registered
  operator through an ``autograd.Function`` of the old form (forward with ctx), which torch.func's
  transforms refuse. The backends therefore call their operators through functions of the new
  form (forward without ctx, setup_context, a generated vmap rule), applied in the old form
  outside a transform, where autograd applies it faster.
"""
from __future__ import annotations

from typing import Optional

import torch

SECOND_ORDER_MESSAGE = (
    "the fused {what} has no second derivative: a backward through its backward (create_graph=True, as in a "
    "gradient penalty or a Hessian-vector product) would miss terms. Use backend='reference' for it (the "
    "masked CRF's fused backends are exact to any order)")


def two_forms(cls):
    """Class decorator for an autograd.Function written in the form torch.func's transforms take
    (``forward`` without ctx, ``setup_context``): adds ``cls.call(*args)``, which applies that form
    while a transform (grad, vjp, jacrev, vmap) is active or under torch.compile, and otherwise
    the same functions in the old form (``forward(ctx, ...)`` running forward and setup_context),
    which autograd applies about 13 us faster per call on the development CPU: for the new form
    it binds the arguments to forward's signature on every call."""

    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    body = {"forward": staticmethod(forward), "backward": staticmethod(cls.backward)}
    if "jvp" in vars(cls):
        body["jvp"] = staticmethod(cls.jvp)
    eager = type(cls.__name__ + "Eager", (torch.autograd.Function,), body)
    transforms_active = torch._C._are_functorch_transforms_active

    def call(*args):
        if torch.compiler.is_compiling() or transforms_active():
            return cls.apply(*args)
        return eager.apply(*args)

    cls.call = staticmethod(call)
    return cls


@two_forms
class _NoSecondOrder(torch.autograd.Function):
    """forward(what, count, *grads, *inputs) -> grads: identity on the ``count`` first-order
    gradients of a fused op, with the tensors they were computed from as inputs, so that every
    second-order path from the gradients to those tensors meets this node. Its backward (and its
    forward-mode derivative) raises."""

    generate_vmap_rule = True  # torch.func.vmap over a per-sample gradient

    @staticmethod
    def forward(what, count, *tensors):
        return tensors[:count]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.what = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(SECOND_ORDER_MESSAGE.format(what=ctx.what))

    @staticmethod
    def jvp(ctx, *_):
        raise RuntimeError(SECOND_ORDER_MESSAGE.format(what=ctx.what))


def first_order(what: str, compute, inputs):
    """``compute()``: the tuple of gradients a fused backward returns; ``inputs``: what they depend
    on (the saved tensors and the upstream gradients). Under create_graph (grad mode on inside a
    backward) the gradients are computed without a graph (the compiled ops have no autograd
    kernel for their backward: the call would warn and give no second-order terms) and routed
    through a node, connected to ``inputs``, that raises when a second backward reaches it. Unlike
    ``once_differentiable`` it raises also where only the saved tensors require grad, and in
    ``torch.autograd.grad`` with ``inputs``, which skips nodes not connected to them."""
    if not torch.is_grad_enabled():
        return tuple(compute())
    with torch.no_grad():
        grads = tuple(compute())
    linked = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    where = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor) and g.is_floating_point()]
    if not linked or not where:
        return grads
    marked = _NoSecondOrder.call(what, len(where), *(grads[i] for i in where), *linked)
    out = list(grads)
    for i, g in zip(where, marked):
        out[i] = g
    return tuple(out)


class _Formula:
    """An operator with its registered autograd formula (``setup(ctx, inputs, output)``,
    ``backward(ctx, *grads)``), for :class:`_Registered`."""

    __slots__ = ("op", "setup", "backward")

    def __init__(self, op, setup, backward):
        self.op, self.setup, self.backward = op, setup, backward


@two_forms
class _Registered(torch.autograd.Function):
    """forward(*operator arguments, formula) -> the operator's outputs, differentiated by the
    formula registered for it. torch.library wraps a registered formula in an autograd.Function
    of the old form (forward with ctx), which torch.func's transforms refuse; this one has the
    form they take (forward without ctx, setup_context) and a generated vmap rule, so that
    torch.func.grad, vjp, jacrev and vmap over them run the fused kernels."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return args[-1].op(*args[:-1])  # grad mode is off here: the operator's no-gradient path

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.formula = inputs[-1]
        ctx.formula.setup(ctx, inputs[:-1], output)

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]  # the formula indexes the operator's own arguments
        try:
            result = ctx.formula.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*result, None) if isinstance(result, tuple) else (result, None)


def with_formula(op, backward, setup):
    """``op`` (an operator whose autograd is registered as ``backward``, ``setup``) as the backends
    call it: in eager mode through :class:`_Registered` (torch.func transforms work), under
    torch.compile as registered (the compiler traces the operator and its formula itself)."""
    formula = _Formula(op, setup, backward)

    def call(*args):
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return op(*args)
        return _Registered.call(*args, formula)

    return call


def attention_autograd(backward_op, lse_backward_op):
    """Autograd of the attention ops, shared by the compiled and Triton backends: returns
    ``((forward_backward, forward_setup), (lse_backward, lse_setup))`` for
    ``register_autograd(backward, setup_context=setup)`` of the ``(q, k, v, s) -> (out, lse_attn,
    lse_sim)`` and ``(q, k, s) -> lse`` ops, given their backward ops."""

    def forward_setup(ctx, inputs, output):
        q, k, v, logit_scale = inputs
        out, lse_attn, lse_sim = output
        ctx.save_for_backward(q, k, v, out, lse_attn, lse_sim)
        ctx.logit_scale = logit_scale

    def forward_backward(ctx, dout, dlse_attn, dlse_sim):
        q, k, v, out, lse_attn, lse_sim = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        return first_order("spatial attention", lambda: backward_op(
            dout, dlse_attn, dlse_sim, q, k, v, out, lse_attn, lse_sim, ctx.logit_scale),
            (q, k, v, dout, dlse_attn, dlse_sim)) + (None,)

    def lse_setup(ctx, inputs, output):
        q, k, logit_scale = inputs
        ctx.save_for_backward(q, k, output)
        ctx.logit_scale = logit_scale

    def lse_backward(ctx, dlse):
        q, k, lse = ctx.saved_tensors
        return first_order("spatial attention", lambda: lse_backward_op(dlse, q, k, lse, ctx.logit_scale),
                           (q, k, dlse)) + (None,)

    return (forward_backward, forward_setup), (lse_backward, lse_setup)


def fused_similarity_autograd(backward_op):
    """Autograd of the fused similarity op ``(q, k, probs, hw, hb, sw, r, sigma, s) -> (rows, lse)``,
    shared by the compiled and Triton backends: ``(backward, setup)`` for ``register_autograd``."""

    def setup(ctx, inputs, output):
        q, k, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale = inputs
        ctx.save_for_backward(q, k, output[1], probs, head_weight, head_bias, sample_weight)
        ctx.options = (radius, sigma, logit_scale)

    def backward(ctx, grad_rows, grad_lse):
        q, k, lse, probs, head_weight, head_bias, sample_weight = ctx.saved_tensors
        if grad_rows is None:
            grad_rows = q.new_zeros((q.shape[0], q.shape[2]), dtype=lse.dtype)
        grads = first_order("attentive similarity loss", lambda: backward_op(
            grad_rows, grad_lse, q, k, lse, probs, head_weight, head_bias, sample_weight, *ctx.options),
            (q, k, probs, head_weight, head_bias, grad_rows, grad_lse))
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])) + (None,) * 4

    return backward, setup


def window_similarity_autograd(backward_op):
    """Autograd of the similarity window op ``(q, k, lse, probs, hw, hb, sw, r, sigma, s) -> rows``,
    shared by the compiled and Triton backends: ``(backward, setup)`` for ``register_autograd``."""

    def setup(ctx, inputs, output):
        q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale = inputs
        ctx.save_for_backward(q, k, lse, probs, head_weight, head_bias, sample_weight)
        ctx.options = (radius, sigma, logit_scale)

    def backward(ctx, grad_rows):
        q, k, lse, probs, head_weight, head_bias, sample_weight = ctx.saved_tensors
        grads = first_order("attentive similarity loss", lambda: backward_op(
            grad_rows, q, k, lse, probs, head_weight, head_bias, sample_weight, *ctx.options),
            (q, k, lse, probs, head_weight, head_bias, grad_rows))
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:6])) + (None,) * 4

    return backward, setup


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_loss(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, radius, sigma, logit_scale,
               fused_op, window_op) -> torch.Tensor:
    """The un-normalised loss: ``fused_op(q, k, probs, hw, hb, sw, r, sigma, s) -> (rows, lse)``
    without an LSE, else ``window_op(q, k, lse, ...) -> rows``. Shared by the compiled and the
    Triton backends."""
    if lse is None:
        rows, _ = fused_op(q, k, probs_grid, head_weight, head_bias, sample_weight, radius, sigma, logit_scale)
    else:
        rows = window_op(q, k, lse.to(acc_dtype(q.dtype)), probs_grid, head_weight, head_bias, sample_weight, radius,
                         sigma, logit_scale)
    return rows.sum()


def _accumulator(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A buffer the accumulate op adds into: a contiguous copy of the incoming gradient in the
    accumulation type, or zeros. Never the incoming tensor itself: autograd may hand one tensor to
    both q_view and k_view (``(q_view + k_view).sum()``), or the caller's own ``grad_outputs``, and
    a backward must not write into either. The copy is one pass over a (B, heads, n, D) tensor."""
    acc = acc_dtype(like.dtype)
    if grad is None:
        return torch.zeros(like.shape, dtype=acc, device=like.device)
    return grad.detach().to(acc, copy=True, memory_format=torch.contiguous_format)


@two_forms
class TiedAttention(torch.autograd.Function):
    """(out, lse_sim, q_view, k_view, lse_attn) from a forward op (lse_attn, not differentiable, is
    returned for the backward only); the backward adds the attention's dq, dk into the gradients
    of q_view, k_view with an accumulate op (see the module docstring). In the form torch.func
    needs (forward without ctx, setup_context)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, logit_scale, forward_op, accumulate_op, backward_op):
        out, lse_attn, lse_sim = forward_op(q, k, v, logit_scale)
        return out, lse_sim, q.view_as(q), k.view_as(k), lse_attn

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, logit_scale, _, accumulate_op, backward_op = inputs
        out, lse_sim, _, _, lse_attn = output
        ctx.mark_non_differentiable(lse_attn)
        ctx.save_for_backward(q, k, v, out, lse_attn, lse_sim)
        ctx.logit_scale, ctx.accumulate_op, ctx.backward_op = logit_scale, accumulate_op, backward_op

    @staticmethod
    def backward(ctx, dout, dlse_sim, dq, dk, _):
        q, k, v, out, lse_attn, lse_sim = ctx.saved_tensors

        def compute():
            dout_ = torch.zeros_like(out) if dout is None else dout
            args = (dout_, None, dlse_sim, q, k, v, out, lse_attn, lse_sim, ctx.logit_scale)
            if torch._C._are_functorch_transforms_active():
                # torch.func: vmap has no rule for an operator that writes into its arguments (its
                # per-sample fallback refuses one), so the backward op and an addition instead
                dq_attn, dk_attn, dv = ctx.backward_op(*args)
                return _added(dq, dq_attn, q.dtype), _added(dk, dk_attn, k.dtype), dv
            dq_acc, dk_acc = _accumulator(dq, q), _accumulator(dk, k)
            dv = ctx.accumulate_op(*args, dq_acc, dk_acc)
            return dq_acc.to(q.dtype), dk_acc.to(k.dtype), dv

        return first_order("spatial attention", compute, (q, k, v, dout, dlse_sim, dq, dk)) + (None,) * 4


def _added(grad: Optional[torch.Tensor], attention_grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad + attention_grad``, summed in the accumulation type, as the accumulate op sums."""
    if grad is None:
        return attention_grad.to(dtype)
    acc = acc_dtype(dtype)
    return (grad.to(acc) + attention_grad.to(acc)).to(dtype)


def attention(q, k, v, logit_scale, tie_qk, forward_op, accumulate_op, backward_op):
    """``forward_op(q, k, v, s) -> (out, lse_attn, lse_sim)`` (an op with registered autograd);
    ``accumulate_op``: its backward adding dq, dk into given buffers, returning dv;
    ``backward_op``: the backward returning (dq, dk, dv), for torch.func's transforms."""
    if tie_qk:
        return TiedAttention.call(q, k, v, logit_scale, forward_op, accumulate_op, backward_op)[:4]
    out, _, lse_sim = forward_op(q, k, v, logit_scale)
    return out, lse_sim
