"""Glue of the compiled window kernels of the attentive similarity loss
(csrc/cpu/attentive_similarity.cpp, csrc/cuda/attentive_similarity.cu): fake kernels, autograd, and
the fused "cpu" / "cuda" backends of "attentive_similarity".

Two paths, no n x n tensor in either:
* an LSE handed over by the attention block: the window op alone. Its backward returns the window
  terms of dq, dk and dlse = -rho, which autograd routes into the attention's backward (the dense
  flash-style sweep that completes dq, dk).
* no LSE: the fused op computes the LSE itself; its backward runs the window kernel and then the
  dense sweep into the same dq, dk buffers (one pair of gradient buffers instead of two).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension, _vmap, backends
from .._checks import same_device_fake
from .._composite import acc_dtype, fused_loss, fused_similarity_autograd, window_similarity_autograd, with_formula
from .spatial_attention import CUDA_MAX_HEAD_DIM

_OPS = torch.ops.attenscribble_ops
_WHY = {d: _extension.why_no_kernel("attentive_similarity_forward", d)
        or _extension.why_no_kernel("attentive_similarity_fused_forward", d) for d in ("cpu", "cuda")}


@torch.library.register_fake("attenscribble_ops::attentive_similarity_forward")
@same_device_fake
def _forward_fake(q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=acc_dtype(q.dtype))


@torch.library.register_fake("attenscribble_ops::attentive_similarity_backward")
@same_device_fake
def _backward_fake(grad_rows, q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    contiguous = dict(memory_format=torch.contiguous_format)
    return (torch.empty_like(q, **contiguous), torch.empty_like(k, **contiguous), torch.empty_like(lse, **contiguous),
            torch.empty_like(probs, **contiguous), torch.empty_like(head_weight, **contiguous),
            torch.empty_like(head_bias, **contiguous))


_backward, _setup = window_similarity_autograd(_OPS.attentive_similarity_backward)
torch.library.register_autograd("attenscribble_ops::attentive_similarity_forward", _backward, setup_context=_setup)


@torch.library.register_fake("attenscribble_ops::attentive_similarity_fused_forward")
@same_device_fake
def _fused_forward_fake(q, k, probs, head_weight, head_bias, sample_weight, radius, sigma, logit_scale):
    acc = acc_dtype(q.dtype)
    return q.new_empty((q.shape[0], q.shape[2]), dtype=acc), q.new_empty(q.shape[:3], dtype=acc)


@torch.library.register_fake("attenscribble_ops::attentive_similarity_fused_backward")
@same_device_fake
def _fused_backward_fake(grad_rows, grad_lse, q, k, lse, probs, head_weight, head_bias, sample_weight, radius, sigma,
                         logit_scale):
    contiguous = dict(memory_format=torch.contiguous_format)
    return (torch.empty_like(q, **contiguous), torch.empty_like(k, **contiguous), torch.empty_like(probs, **contiguous),
            torch.empty_like(head_weight, **contiguous), torch.empty_like(head_bias, **contiguous))


_fused_backward, _fused_setup = fused_similarity_autograd(_OPS.attentive_similarity_fused_backward)
torch.library.register_autograd("attenscribble_ops::attentive_similarity_fused_forward", _fused_backward,
                                setup_context=_fused_setup)
# what the backend calls (torch.func transforms work through these)
_window = with_formula(_OPS.attentive_similarity_forward, _backward, _setup)
_fused = with_formula(_OPS.attentive_similarity_fused_forward, _fused_backward, _fused_setup)
_vmap.register_similarity(_OPS.attentive_similarity_forward.default, _OPS.attentive_similarity_backward.default,
                          _OPS.attentive_similarity_fused_forward.default,
                          _OPS.attentive_similarity_fused_backward.default)


def _check(device_type: str):
    def check(meta: backends.Meta) -> Optional[str]:
        why = _WHY[device_type]
        if why is None and device_type == "cuda" and "head_dim>128" in meta.options:
            why = f"the CUDA kernels support head dims up to {CUDA_MAX_HEAD_DIM}"
        return why

    return check


def _native(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, grid, radius, sigma, logit_scale):
    return fused_loss(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, radius, sigma, logit_scale,
                      _fused, _window)


backends.register("attentive_similarity", "cpu", check=_check("cpu"))(_native)
backends.register("attentive_similarity", "cuda", check=_check("cuda"))(_native)
