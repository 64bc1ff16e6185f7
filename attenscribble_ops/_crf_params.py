"""Kernel descriptors of the masked CRF loss, canonicalised once for every backend.

A descriptor is one Gaussian term of the pairwise kernel,

    K_ij = sum_k weight_k * exp(-1/2 * (|dpos_ij|^2 / sigma_xy_k^2 + sum_f (I_if - I_jf)^2 / sigma_img_kf^2))

with dpos in physical units (voxel index times spacing). A term without sigma_xy has no spatial
part; a term without sigma_image is a pure-xy kernel. Users give descriptors as
:class:`CRFKernel` tuples, plain ``(weight, sigma_xy, sigma_image)`` tuples, or dicts in the
original Gated CRF format (``{"weight": 1, "xy": 6, "rgb": 0.1}``: any key but "weight" and "xy"
names the image).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import _checks


class CRFKernel(NamedTuple):
    """One Gaussian term of the masked CRF kernel.

    Args:
        weight: multiplier of this term.
        sigma_xy: spatial bandwidth in pixels (in physical units when a spacing is given), or None
            for a term without a spatial part.
        sigma_image: intensity bandwidth, one value for every image channel or one per channel
            (None in a per-channel sequence leaves that channel out), or None for a pure-xy term.
    """

    weight: float = 1.0
    sigma_xy: Optional[float] = 6.0
    sigma_image: Optional[Union[float, Sequence[Optional[float]]]] = 0.1


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Everything a backend needs besides tensors. Hashable and value-free (no tensors)."""

    radius: tuple[int, ...]          # per spatial axis, (rh, rw) or (rd, rh, rw)
    spacing: tuple[float, ...]       # per spatial axis
    zero_padding: bool               # True: the original's border term; False: "valid"
    weights: tuple[float, ...]       # per descriptor
    sigma_xy: tuple[Optional[float], ...]               # per descriptor
    sigma_image: tuple[Optional[tuple[Optional[float], ...]], ...]  # per descriptor, per channel

    @property
    def num_kernels(self) -> int:
        return len(self.weights)

    @property
    def uses_image(self) -> bool:
        return any(s is not None and any(c is not None for c in s) for s in self.sigma_image)

    def table(self, channels: int) -> list[float]:
        """Row-major (K, 2 + channels) table [weight, 1/sigma_xy, 1/sigma_img_f ...], 0 = unused,
        as the compiled kernels take it."""
        rows = []
        for w, sxy, simg in zip(self.weights, self.sigma_xy, self.sigma_image):
            rows.append(w)
            rows.append(0.0 if sxy is None else 1.0 / sxy)
            for f in range(channels):
                s = None if simg is None else simg[f]
                rows.append(0.0 if s is None else 1.0 / s)
        return rows


def _sigma(x, name):
    return None if x is None else _checks.number(x, name, positive=True, invertible=True)


def _descriptor(desc, i: Optional[int]):
    """(weight, sigma_xy, sigma_image) of one descriptor; i None = the default kernel given by the
    weight / sigma_xy / sigma_image arguments (errors then name those arguments)."""
    if i is None:
        weight, sxy, simg = desc
        return _finish(weight, sxy, simg, "weight", "sigma_xy", "sigma_image", "the default kernel")
    where = f"kernels[{i}]"
    if isinstance(desc, dict):
        unknown_weight = "weight" not in desc
        if unknown_weight:
            raise ValueError(f"{where} must have a 'weight' key (original Gated CRF format), got keys {sorted(desc)}")
        image_keys = [k for k in desc if k not in ("weight", "xy")]
        if len(image_keys) > 1:
            raise ValueError(f"{where} names several modalities {image_keys}; masked_crf_loss takes one image "
                             "tensor (concatenate modalities along channels and give per-channel sigmas, or use "
                             "compat.ModelLossSemsegGatedCRF with a dict sample)")
        weight = desc["weight"]
        sxy = desc.get("xy")
        simg = desc[image_keys[0]] if image_keys else None
    elif isinstance(desc, (tuple, list)) and len(desc) == 3:
        weight, sxy, simg = desc
    else:
        raise TypeError(f"{where} must be a CRFKernel, a (weight, sigma_xy, sigma_image) tuple or a dict "
                        f"like {{'weight': 1, 'xy': 6, 'image': 0.1}}, got {desc!r}")
    return _finish(weight, sxy, simg, f"{where}.weight", f"{where}.sigma_xy", f"{where}.sigma_image", where)


def _finish(weight, sxy, simg, weight_name, sxy_name, simg_name, where):
    weight = _checks.number(weight, weight_name)
    sxy = _sigma(sxy, sxy_name)
    if isinstance(simg, (tuple, list)):
        simg = tuple(_sigma(s, f"{simg_name}[{f}]") for f, s in enumerate(simg))
        if all(s is None for s in simg):
            simg = None
    else:
        simg = _sigma(simg, simg_name)
    if sxy is None and simg is None:
        raise ValueError(f"{where} has neither sigma_xy nor sigma_image: a kernel needs at least one feature")
    return weight, sxy, simg


def canonical(*, nd: int, radius, spacing, padding: str, kernels, weight, sigma_xy, sigma_image,
              channels: Optional[int]) -> CRFParams:
    """Validate the CRF options and resolve per-channel image sigmas (``channels`` = image channels,
    None when no image was given). Options made only of ints, floats, strings, None and tuples of
    them (a training loop's, every step) are validated once and remembered by value and type."""
    options = dict(nd=nd, radius=radius, spacing=spacing, padding=padding, kernels=kernels, weight=weight,
                   sigma_xy=sigma_xy, sigma_image=sigma_image, channels=channels)
    key = None if torch.compiler.is_compiling() else _typed_key(tuple(options.values()))  # dynamo: no cache
    if key is None:
        return _canonical(**options)
    return _canonical_cached(key, **options)


_PLAIN = (int, float, str, type(None))


def _typed_key(x):
    """A hashable key that tells 1, 1.0 and True apart (so a remembered result never answers for an
    input that validation would refuse), or None for anything but plain values and tuples of them."""
    if type(x) in _PLAIN or type(x) is bool:
        return (type(x), x)
    if type(x) is tuple:
        parts = tuple(_typed_key(v) for v in x)
        return None if any(p is None for p in parts) else (tuple, parts)
    return None


@functools.lru_cache(maxsize=256)
def _canonical_cached(key, **options) -> CRFParams:
    return _canonical(**options)


def _canonical(*, nd: int, radius, spacing, padding: str, kernels, weight, sigma_xy, sigma_image,
               channels: Optional[int]) -> CRFParams:
    radius = _checks.radius(radius, nd)
    spacing = (1.0,) * nd if spacing is None else _checks.per_axis(
        spacing, "spacing", nd, lambda v, n: _checks.number(v, n, positive=True, invertible=True))
    padding = _checks.choice(padding, "padding", ("zeros", "valid"))
    if kernels is None:
        descs = [_descriptor((weight, sigma_xy, sigma_image), None)]
    else:
        if isinstance(kernels, (dict, CRFKernel)) or not isinstance(kernels, (list, tuple)) or len(kernels) == 0:
            raise TypeError(f"kernels must be a non-empty list of descriptors, got {kernels!r}")
        descs = [_descriptor(d, i) for i, d in enumerate(kernels)]
    per_channel = []
    for i, (_, _, simg) in enumerate(descs):
        if simg is None:
            per_channel.append(None)
            continue
        if channels is None:
            raise ValueError(f"image is None, but kernel descriptor {i} uses it (sigma_image={simg!r}); pass the "
                             "image, or sigma_image=None for a pure-xy kernel")
        if isinstance(simg, tuple):
            if len(simg) != channels:
                raise ValueError(f"kernel descriptor {i} gives {len(simg)} per-channel image sigmas but image "
                                 f"has {channels} channels")
            per_channel.append(simg)
        else:
            per_channel.append((simg,) * channels)
    return CRFParams(
        radius=radius,
        spacing=spacing,
        zero_padding=padding == "zeros",
        weights=tuple(d[0] for d in descs),
        sigma_xy=tuple(d[1] for d in descs),
        sigma_image=tuple(per_channel),
    )


def check_float_range(params: CRFParams, dtype: torch.dtype, shape: tuple, named_kernels: bool) -> None:
    """The kernels compute the Gaussian's exponent factors in ``dtype`` (the accumulate dtype): the
    inverse squared sigmas, the squared spacings and the squared window extent (clipped to the
    image of spatial ``shape``) must be normal numbers there, with a margin of 4. Outside, a factor
    overflows (inf * 0 = NaN at a zero offset or an equal intensity) or is flushed to zero (the
    Gaussian read as 1): ValueError, naming the argument."""
    key = (params, dtype, tuple(min(r, n - 1) for r, n in zip(params.radius, shape)), named_kernels)
    if torch.compiler.is_compiling():
        _check_float_range(*key)
    else:
        _check_float_range_cached(*key)


@functools.lru_cache(maxsize=256)
def _check_float_range_cached(params, dtype, extent, named_kernels) -> None:
    _check_float_range(params, dtype, extent, named_kernels)


def _check_float_range(params: CRFParams, dtype: torch.dtype, extent: tuple, named_kernels: bool) -> None:
    info = torch.finfo(dtype)
    lo, hi = 4 * info.tiny, info.max / 4
    kind = str(dtype).replace("torch.", "")
    inputs = "float16, bfloat16 or float32" if dtype == torch.float32 else "float64"
    advice = "; pass float64 probabilities for a wider range" if dtype != torch.float64 else ""

    def check(name: str, value: float, square: float, what: str, bounds: tuple) -> None:
        if not lo <= square <= hi:
            raise ValueError(f"{name} = {value:g} is out of range for {inputs} probabilities: the kernels need "
                             f"{what} to be a normal {kind} number with margin ({name} between {bounds[0]:.1e} "
                             f"and {bounds[1]:.1e}){advice}")

    sigma_bounds = (1 / math.sqrt(hi), 1 / math.sqrt(lo))
    for i, (sxy, simg) in enumerate(zip(params.sigma_xy, params.sigma_image)):
        prefix = f"kernels[{i}]." if named_kernels else ""
        if sxy is not None:
            inv = 1.0 / sxy
            check(f"{prefix}sigma_xy", sxy, inv * inv, "1/sigma_xy**2", sigma_bounds)
        for f, s in enumerate(simg or ()):
            if s is not None:
                inv = 1.0 / s
                name = f"{prefix}sigma_image" + (f"[{f}]" if len(simg) > 1 else "")
                check(name, s, inv * inv, "1/sigma_image**2", sigma_bounds)
    nd = len(params.spacing)
    for a, sp in enumerate(params.spacing):
        check(f"spacing[{a}]" if nd > 1 else "spacing", sp, sp * sp, "spacing**2",
              (math.sqrt(lo), math.sqrt(hi)))
    reach = sum((e * sp) ** 2 for e, sp in zip(extent, params.spacing))
    if reach > hi:
        raise ValueError(f"spacing {params.spacing} is out of range for {inputs} probabilities: the window's "
                         f"farthest offset inside the image, radius {tuple(extent)} times the spacing, squared "
                         f"({reach:.1e}) must be a {kind} number with margin (at most {hi:.1e}){advice}")
