"""Masked CRF loss in plain PyTorch: the executable spec, the test oracle, the fallback.

It follows the original Gated CRF loss (Obukhov et al. 2019) step for step: features are divided
by their sigmas, the (2r+1)^d window is unfolded with zero padding, so an out-of-image neighbour
has features 0 and probability 0 (the border term: it adds weight*exp(-|f_i|^2/2) to the loss and
nothing to the gradient), the centre of each window is zeroed, the source mask gates neighbours,
the destination mask gates centres, and

    Potts:          raw = sum K - sum_{i,c} P_ic sum_j K_ij P_jc
    compatibility:  raw = sum_{c,c'} mu_cc' sum_i P_ic sum_j K_ij P_jc'

It generalises the 2-D unfold to N-D (``Tensor.unfold`` per spatial axis), with spacing. Memory
is that of the original: a (B, C, *S, (2r+1)^d) tensor. The caller divides by the denominator.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends
from .._crf_params import CRFParams


def window_view(x: torch.Tensor, radius: tuple[int, ...]) -> torch.Tensor:
    """(B, F, *S) -> (B, F, *S, *(2r+1)) zero-padded sliding windows (a view of a padded copy)."""
    pad = []
    for r in reversed(radius):
        pad += [r, r]
    x = F.pad(x, pad)
    for axis, r in enumerate(radius):
        x = x.unfold(2 + axis, 2 * r + 1, 1)
    return x


def _centre(x: torch.Tensor, nd: int) -> torch.Tensor:
    """(B, F, *S) -> (B, F, *S, 1, ..., 1) to broadcast against window_view."""
    return x.reshape(x.shape + (1,) * nd)


def _coordinates(shape, spacing, dtype, device) -> torch.Tensor:
    """(1, d, *S) pixel/voxel coordinates times spacing: x (last axis) first, as the original mesh."""
    axes = [torch.arange(n, dtype=dtype, device=device) * sp for n, sp in zip(shape, spacing)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids[::-1]).unsqueeze(0)


def dense_kernels(params: CRFParams, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
                  mask_src: Optional[torch.Tensor], batch: int, shape, dtype, device) -> torch.Tensor:
    """The masked kernel as the original materialises it: (B, 1, *S, *(2r+1)), centre zeroed."""
    nd = len(shape)
    radius = params.radius
    coords = None
    kernels = None
    for weight, sxy, simg in zip(params.weights, params.sigma_xy, params.sigma_image):
        features = []
        if sxy is not None:
            if coords is None:
                coords = _coordinates(shape, params.spacing, dtype, device)
            features.append((coords / sxy).expand(batch, *coords.shape[1:]))
        if simg is not None:
            keep = [f for f, s in enumerate(simg) if s is not None]
            sig = torch.tensor([simg[f] for f in keep], dtype=dtype, device=device)
            features.append(image[:, keep] / sig.view(1, -1, *(1,) * nd))
        feats = torch.cat(features, dim=1)
        diff = window_view(feats, radius) - _centre(feats, nd)
        kernel = weight * torch.exp(-0.5 * diff.square().sum(dim=1, keepdim=True))
        kernels = kernel if kernels is None else kernels + kernel
    kernels[(Ellipsis,) + tuple(radius)] = 0
    if not params.zero_padding:
        inside = torch.ones((1, 1) + tuple(shape), dtype=dtype, device=device)
        kernels = kernels * window_view(inside, radius)
    if mask_src is not None:
        kernels = kernels * window_view(mask_src, radius)
    if mask_dst is not None:
        kernels = kernels * _centre(mask_dst, nd)
    return kernels


@backends.register("masked_crf", "reference")
def masked_crf_reference(probs: torch.Tensor, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
                         mask_src: Optional[torch.Tensor], compat: Optional[torch.Tensor],
                         params: CRFParams) -> torch.Tensor:
    """Un-normalised loss (the caller divides by the denominator); differentiable in ``probs``.

    Shapes: probs (B, C, *S); image (B, F, *S) already at prediction resolution or None; masks
    (B, 1, *S) already cleaned; compat (C, C) already normalised (mu-hat) or None.
    """
    batch, classes = probs.shape[:2]
    shape = probs.shape[2:]
    nd = len(shape)
    dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    p = probs.to(dtype)
    kernels = dense_kernels(params, image, mask_dst, mask_src, batch, shape, dtype, probs.device)
    win_dims = tuple(range(2 + nd, 2 + 2 * nd))
    product = (kernels * window_view(p, params.radius)).sum(dim=win_dims)  # (B, C, *S)
    if compat is None:
        return kernels.sum() - (product * p).sum()
    p_cn = p.transpose(0, 1).reshape(classes, -1)
    prod_nc = product.movedim(1, -1).reshape(-1, classes)
    return (compat.to(dtype) * (p_cn @ prod_nc)).sum()
