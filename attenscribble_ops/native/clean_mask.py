"""attenscribble_ops::clean_mask: a mask with NaN -> 0 and values < 1 -> 0, cast to a float dtype.
The helper every backend's mask path goes through (no gradient: masks are constants)."""
from __future__ import annotations

import torch

from .. import _extension, _vmap
from .._checks import same_device_fake


@torch.library.register_fake("attenscribble_ops::clean_mask")
@same_device_fake
def _clean_mask_fake(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.new_empty(mask.shape, dtype=dtype)


_vmap.register_elementwise(torch.ops.attenscribble_ops.clean_mask.default)


def compiled_for(device_type: str) -> bool:
    return _extension.why_no_kernel("clean_mask", device_type) is None
