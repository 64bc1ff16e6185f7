"""vmap rules of the operators (``torch.library.register_vmap``), for ``torch.func.vmap`` and the
transforms built on it (``jacrev``, ``jacfwd``'s batching, per-sample gradients).

Without a rule, vmap runs a custom operator once per sample through torch's fallback, which warns
"please file us an issue" on every call. Three kinds of rule here:

* **fold** (``register_folded``): operators whose tensor arguments and outputs all lead with the
  batch B of the op (the attention: (B, heads, n, D) and (B, heads, n); the similarity window
  forward: its rows (B, n)). The vmapped dimension V joins B: one call on V * B samples, then the
  outputs are split back into (V, B, ...). Arguments that are not vmapped are expanded V times.
  Where an argument that does not lead with B is vmapped (a per-sample head weight, a batched
  float table), the rule loops instead.
* **elementwise** (``register_elementwise``): ``clean_mask``, on the whole batched tensor.
* **loop** (``register_looped``): operators with an output summed over the batch (the masked CRF's
  loss, the similarity backward's head-weight gradients), which one call on V * B samples cannot
  split. The rule calls the operator once per vmapped index, as torch's fallback does, without its
  warning.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _batched(arg, in_dim) -> bool:
    """Whether ``arg`` is vmapped (the in_dims of a list argument is a list of Nones)."""
    return isinstance(arg, torch.Tensor) and in_dim is not None


def _slice_call(op, in_dims, args, index: int):
    return op(*(a.select(d, index) if _batched(a, d) else a for a, d in zip(args, in_dims)))


def _looped(op, info, in_dims, args):
    """``op`` once per vmapped index; the outputs stacked along dim 0."""
    if info.batch_size == 0:
        return _empty(op, in_dims, args)
    outs = [_slice_call(op, in_dims, args, i) for i in range(info.batch_size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = tuple(torch.stack(parts) for parts in zip(*outs))
    return stacked, (0,) * len(stacked)


def _empty(op, in_dims, args):
    """vmap over a dimension of size 0: outputs with no sample, shaped from one call on a zero
    sample (the kernels take no empty batch)."""
    def zero_sample(a, d):
        return a.new_zeros(a.shape[:d] + a.shape[d + 1:]) if _batched(a, d) else a

    out = op(*(zero_sample(a, d) for a, d in zip(args, in_dims)))
    if isinstance(out, torch.Tensor):
        return out.new_empty((0,) + tuple(out.shape)), 0
    return tuple(t.new_empty((0,) + tuple(t.shape)) for t in out), (0,) * len(out)


def register_looped(op) -> None:
    """The loop rule for ``op`` (an ``OpOverload`` or a ``torch.library.custom_op``)."""

    def rule(info, in_dims, *args):
        return _looped(op, info, in_dims, args)

    torch.library.register_vmap(op, rule)


def register_folded(op, leading: Sequence[int]) -> None:
    """The fold rule for ``op``: the arguments at the positions ``leading`` lead with the op's batch,
    as every output does (module docstring)."""
    leading = frozenset(leading)

    def rule(info, in_dims, *args):
        size = info.batch_size
        if size == 0 or any(_batched(a, d) and i not in leading for i, (a, d) in enumerate(zip(args, in_dims))):
            return _looped(op, info, in_dims, args)
        folded, batch = list(args), None
        for i in leading:
            a, d = args[i], in_dims[i]
            if a is None:
                continue
            a = a.movedim(d, 0) if d is not None else a.unsqueeze(0).expand((size,) + tuple(a.shape))
            batch = a.shape[1]
            folded[i] = a.reshape((size * batch,) + tuple(a.shape[2:])).contiguous()
        out = op(*folded)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape((size, batch) + tuple(t.shape[1:]))

        if isinstance(out, torch.Tensor):
            return split(out), 0
        return tuple(split(t) for t in out), (0,) * len(out)

    torch.library.register_vmap(op, rule)


def register_attention(forward, backward, lse, lse_backward) -> None:
    """The attention operators of one backend (every tensor argument leads with the batch)."""
    register_folded(forward, (0, 1, 2))
    register_folded(backward, range(9))
    register_folded(lse, (0, 1))
    register_folded(lse_backward, (0, 1, 2, 3))


def register_similarity(window_forward, window_backward, fused_forward, fused_backward) -> None:
    """The similarity operators of one backend: the forwards fold where the head weight and bias
    are not vmapped (q, k, lse, probs and sample_weight lead with the batch); the backwards loop
    (their head-weight gradients are sums over the batch)."""
    register_folded(window_forward, (0, 1, 2, 3, 6))
    register_folded(fused_forward, (0, 1, 2, 5))
    register_looped(window_backward)
    register_looped(fused_backward)


def register_elementwise(op) -> None:
    """The rule for ``op(x, *options)``, elementwise in its one tensor argument: the operator on the
    whole batched tensor, whose layout the output keeps."""

    def rule(info, in_dims, x, *options):
        return op(x, *options), in_dims[0]

    torch.library.register_vmap(op, rule)
