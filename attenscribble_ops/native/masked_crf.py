"""attenscribble_ops::masked_crf_forward (csrc/cpu/masked_crf.cpp, csrc/cuda/masked_crf.cu): the
fused masked CRF loss, registered as the "cpu" and "cuda" backends.

One pass over the window gives the loss and, when autograd will need it, the gradient (a
deterministic gather); memory O(inputs). See attenscribble_ops/_crf_ops.py for the schema.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _crf_ops, _extension, backends
from .._crf_params import CRFParams

# Looked up once at import: the dispatcher query is not something torch.compile should trace.
_NO_KERNEL = {d: _extension.why_no_kernel("masked_crf_forward", d) for d in ("cpu", "cuda")}

_crf_ops.register_fake_and_autograd("attenscribble_ops::masked_crf_forward")


def _check(meta: backends.Meta) -> Optional[str]:
    return _NO_KERNEL.get(meta.device_type, f"no compiled masked_crf kernel for {meta.device_type} tensors")


def _masked_crf_compiled(probs: torch.Tensor, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
                         mask_src: Optional[torch.Tensor], compat: Optional[torch.Tensor],
                         params: CRFParams) -> torch.Tensor:
    """Un-normalised loss from the compiled kernels; the dispatcher picks CPU or CUDA."""
    return _crf_ops.loss(torch.ops.attenscribble_ops.masked_crf_forward, probs, image, mask_dst, mask_src, compat,
                         params)


backends.register("masked_crf", "cpu", check=_check)(_masked_crf_compiled)
backends.register("masked_crf", "cuda", check=_check)(_masked_crf_compiled)
