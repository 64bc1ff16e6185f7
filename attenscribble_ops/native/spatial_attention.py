"""Glue of the compiled attention ops (csrc/cpu/spatial_attention.cpp, csrc/cuda/spatial_attention.cu):
fake kernels, autograd, and registration as the "cpu" and "cuda" backends of "spatial_attention".

Two op pairs:
* ``spatial_attention_forward(q, k, v, logit_scale) -> (out, lse_attn, lse_sim)`` and its backward,
  which accepts the gradients of all three outputs (flash-attention style, O(n) memory). The
  gradient of ``lse_sim`` is what the attentive similarity loss hands back (dlse = -rho).
* ``spatial_attention_lse(q, k, logit_scale) -> lse_sim`` and its backward: the same sweep without
  values, used by the loss when no attention block handed it the LSE.
* ``spatial_attention_backward_accumulate``: the backward adding dq, dk into given buffers, for
  ``tie_qk=True`` (see attenscribble_ops/_composite.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension, _vmap, backends
from .._checks import same_device_fake
from .._composite import acc_dtype, attention, attention_autograd, with_formula

_OPS = torch.ops.attenscribble_ops
# Why each device has no kernel (None: it has one), computed once at import so that the registry
# check stays a pure function of metadata, traceable by torch.compile.
_WHY = {d: _extension.why_no_kernel("spatial_attention_forward", d) for d in ("cpu", "cuda")}
# The CUDA kernels keep a query row's accumulators in registers sized for D <= 128.
CUDA_MAX_HEAD_DIM = 128


@torch.library.register_fake("attenscribble_ops::spatial_attention_forward")
@same_device_fake
def _forward_fake(q, k, v, logit_scale):
    rows = q.shape[:3]
    acc = acc_dtype(q.dtype)
    return q.new_empty(v.shape), q.new_empty(rows, dtype=acc), q.new_empty(rows, dtype=acc)


@torch.library.register_fake("attenscribble_ops::spatial_attention_backward")
@same_device_fake
def _backward_fake(dout, dlse_attn, dlse_sim, q, k, v, out, lse_attn, lse_sim, logit_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.register_fake("attenscribble_ops::spatial_attention_backward_accumulate")
@same_device_fake
def _backward_accumulate_fake(dout, dlse_attn, dlse_sim, q, k, v, out, lse_attn, lse_sim, logit_scale, dq, dk):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.register_fake("attenscribble_ops::spatial_attention_lse")
@same_device_fake
def _lse_fake(q, k, logit_scale):
    return q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


@torch.library.register_fake("attenscribble_ops::spatial_attention_lse_backward")
@same_device_fake
def _lse_backward_fake(dlse, q, k, lse, logit_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)


(_fwd_bwd, _fwd_setup), (_lse_bwd, _lse_setup) = attention_autograd(
    _OPS.spatial_attention_backward, _OPS.spatial_attention_lse_backward)
torch.library.register_autograd("attenscribble_ops::spatial_attention_forward", _fwd_bwd, setup_context=_fwd_setup)
torch.library.register_autograd("attenscribble_ops::spatial_attention_lse", _lse_bwd, setup_context=_lse_setup)
_forward = with_formula(_OPS.spatial_attention_forward, _fwd_bwd, _fwd_setup)  # what the backends call
_vmap.register_attention(_OPS.spatial_attention_forward.default, _OPS.spatial_attention_backward.default,
                         _OPS.spatial_attention_lse.default, _OPS.spatial_attention_lse_backward.default)


def _check(device_type: str):
    def check(meta: backends.Meta) -> Optional[str]:
        if _WHY[device_type] is not None:
            return _WHY[device_type]
        if device_type == "cuda" and "head_dim>128" in meta.options:
            return f"the CUDA kernels support head dims up to {CUDA_MAX_HEAD_DIM}"
        return None

    return check


@backends.register("spatial_attention", "cpu", check=_check("cpu"))
def spatial_attention_cpu(q, k, v, logit_scale, tie_qk=False):
    return attention(q, k, v, logit_scale, tie_qk, _forward, _OPS.spatial_attention_backward_accumulate,
                     _OPS.spatial_attention_backward)


@backends.register("spatial_attention", "cuda", check=_check("cuda"))
def spatial_attention_cuda(q, k, v, logit_scale, tie_qk=False):
    return attention(q, k, v, logit_scale, tie_qk, _forward, _OPS.spatial_attention_backward_accumulate,
                     _OPS.spatial_attention_backward)
