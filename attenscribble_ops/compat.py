"""Drop-in replacements with the original signatures and return dicts: existing training code
changes only its import.

* :class:`ModelLossSemsegGatedCRF`: the Gated CRF loss class (Obukhov et al.), as copied by WSL4MIS
  and AttenScribble. ``sample`` may be the original dict of modalities or the image tensor itself;
  the compatibility-matrix branch works as intended (the original raises AttributeError); the
  caller's tensors are never mutated (the original zeroes NaNs of a full-resolution mask in place).
* :class:`AttnGatedCRF`: AttenScribble's attentive-similarity loss on a dense kernel, reading only
  the window entries of the mask (no per-call identity matrix, float64 mask upload or n x n
  temporaries).
* :func:`pre_compute_xy_mask`: the same float64 array as the original, vectorised.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from . import _checks, _crf_params, functional
from ._window_pairs import WindowStructure, window_pairs_loss
from .reference.attentive_similarity import window_decay_numpy
from .reference.masked_crf import dense_kernels


def pre_compute_xy_mask(h: int, w: int, radius: int, sigma: float) -> np.ndarray:
    """Dense (h*w, h*w) float64 Gaussian distance mask inside the (2r+1)^2 window, zero diagonal:
    bitwise the array of the original per-pair loop, computed vectorised."""
    h = _checks.integer(h, "h", minimum=1)
    w = _checks.integer(w, "w", minimum=1)
    radius = _checks.integer(radius, "radius", minimum=0)
    sigma = _checks.bandwidth(sigma, "sigma")
    return window_decay_numpy(h, w, radius, sigma)


class ModelLossSemsegGatedCRF(torch.nn.Module):
    """Gated CRF loss with the original interface; computed by the fused backends.

    Args:
        backend: "auto" (default), "reference", "cpu", "cuda" or "triton".

    ``forward`` returns ``{"loss": loss}`` (plus ``"kernels_vis"`` when asked), loss values and
    gradients equal to the original's to float rounding, border term included.
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = _checks.choice(backend, "backend", ("auto", "reference", "cpu", "cuda", "triton"))

    def forward(self, y_hat_softmax, kernels_desc, kernels_radius, sample, height_input, width_input,
                mask_src=None, mask_dst=None, compatibility=None, custom_modality_downsamplers=None,
                out_kernels_vis=False):
        probs = _checks.floating_tensor(y_hat_softmax, "y_hat_softmax", (4,), "(N, C, H, W)")
        n, _, height, width = probs.shape
        height_input = _checks.integer(height_input, "height_input", minimum=1)
        width_input = _checks.integer(width_input, "width_input", minimum=1)
        if width_input % width or height_input % height or width_input * height != height_input * width:
            raise ValueError(f"height_input x width_input ({height_input}x{width_input}) must be the same integer "
                             f"multiple of the prediction's {height}x{width}")
        if not isinstance(kernels_desc, (list, tuple)) or not kernels_desc or \
                not all(isinstance(d, dict) for d in kernels_desc):
            raise TypeError(f"kernels_desc must be a non-empty list of dicts like "
                            f"[{{'weight': 1, 'xy': 6, 'rgb': 0.1}}], got {kernels_desc!r}")
        downsamplers = custom_modality_downsamplers or {}
        if not isinstance(downsamplers, Mapping) or not all(callable(f) for f in downsamplers.values()):
            raise TypeError(f"custom_modality_downsamplers must be a dict of callables f(x, (height, width)) by "
                            f"modality (or 'mask'), got {custom_modality_downsamplers!r}")
        modalities = []
        for desc in kernels_desc:
            modalities += [key for key in desc if key not in ("weight", "xy") and key not in modalities]
        images, owner = [], []
        for name in modalities:
            feature = self._modality(sample, name)
            _checks.same_device(f"sample[{name!r}]", feature, "y_hat_softmax", probs)
            if feature.shape[0] != n:
                raise ValueError(f"sample[{name!r}] has batch size {feature.shape[0]} but y_hat_softmax has {n}")
            if name in downsamplers:  # called whatever the size, as the original does
                feature = self._downsampled(downsamplers[name], name, feature, n, height, width)
            elif tuple(feature.shape[2:]) != (height, width):
                feature = F.adaptive_avg_pool2d(feature.detach(), (height, width))
            images.append(feature)
            owner += [name] * feature.shape[1]
        image = torch.cat(images, dim=1) if images else None
        kernels = []
        for desc in kernels_desc:
            per_channel = tuple(desc.get(name) for name in owner)
            kernels.append(_crf_params.CRFKernel(desc.get("weight"), desc.get("xy"),
                                                 per_channel if any(s is not None for s in per_channel) else None))
        masks = {}
        for name, mask in (("mask_src", mask_src), ("mask_dst", mask_dst)):
            if mask is not None:
                mask = _checks.real_tensor(mask, name, f"({n}, 1, H, W)")
                if mask.dim() != 4 or tuple(mask.shape[:2]) != (n, 1):
                    raise ValueError(f"{name} must be an (N, 1, H, W) batch with N={n}, got {tuple(mask.shape)}")
                if tuple(mask.shape[2:]) != (height, width) and "mask" in downsamplers:
                    mask = self._downsampled(downsamplers["mask"], "mask", mask.detach().float(), n, height, width)
            masks[name] = mask
        with _named_after_kernels_desc(owner):
            loss = functional.masked_crf_loss(probs, image, radius=kernels_radius, kernels=kernels,
                                              compatibility=compatibility, padding="zeros", backend=self.backend,
                                              **masks)
            out = {"loss": loss}
            if out_kernels_vis:
                out["kernels_vis"] = self._visualize(probs, image, kernels, kernels_radius, masks, height_input,
                                                     width_input)
        return out

    @staticmethod
    def _downsampled(f, name: str, x: torch.Tensor, n: int, height: int, width: int) -> torch.Tensor:
        out = f(x.detach(), (height, width))
        where = f"custom_modality_downsamplers[{name!r}]"
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[2:]) != (height, width) \
                or out.shape[0] != n:
            raise ValueError(f"{where} must return an ({n}, F, {height}, {width}) tensor, got "
                             f"{_checks._describe(out)}")
        return out

    @staticmethod
    def _modality(sample, name: str) -> torch.Tensor:
        if isinstance(sample, dict):
            if name not in sample:
                raise ValueError(f"modality {name!r} is listed in kernels_desc but not present in sample "
                                 f"(keys: {', '.join(sorted(map(repr, sample)))})")
            feature = sample[name]
        else:
            feature = sample
        return _checks.floating_tensor(feature, f"sample[{name!r}]" if isinstance(sample, dict) else "sample",
                                       (4,), "(N, F, H_in, W_in)")

    @staticmethod
    def _visualize(probs, image, kernels, radius, masks, height_input, width_input) -> torch.Tensor:
        """Every diameter-th window laid out as a tile (the original's ``kernels_vis``)."""
        n, _, height, width = probs.shape
        dtype = _checks.accumulate_dtype(probs.dtype)
        params = _crf_params.canonical(nd=2, radius=radius, spacing=None, padding="zeros", kernels=kernels,
                                       weight=None, sigma_xy=None, sigma_image=None,
                                       channels=None if image is None else image.shape[1])
        m_src = functional._prepare_mask(masks.get("mask_src"), "mask_src", probs, dtype)
        m_dst = functional._prepare_mask(masks.get("mask_dst"), "mask_dst", probs, dtype)
        img = None if image is None else image.detach().to(dtype)
        k = dense_kernels(params, img, m_dst, m_src, n, (height, width), dtype, probs.device)
        k = k.permute(0, 1, 4, 5, 2, 3)  # (N, 1, d, d, H, W), the original's layout
        rh, rw = params.radius
        dh, dw = 2 * rh + 1, 2 * rw + 1
        vis = k[:, :, :, :, rh::dh, rw::dw]
        vh, vw = vis.shape[-2:]
        vis = vis.permute(0, 1, 4, 2, 5, 3).reshape(n, 1, dh * vh, dw * vw)[:, :, :height, :width]
        vis = F.pad(vis, [0, width - vis.shape[3], 0, height - vis.shape[2]])
        return F.interpolate(vis, (height_input, width_input), mode="nearest")


_KERNEL_FIELD = re.compile(r"(?<![\w.])kernels\[(\d+)\](?:\.(weight|sigma_xy|sigma_image)(?:\[(\d+)\])?)?")


@contextlib.contextmanager
def _named_after_kernels_desc(owner: list):
    """Errors about the CRF kernels name the caller's kernels_desc entries: kernels[i].sigma_xy as
    kernels_desc[i]['xy'], kernels[i].sigma_image[c] as kernels_desc[i][<modality of channel c>]
    (``owner``: the modality of each image channel; a one-channel image's error has no [c]),
    kernels[i].weight as kernels_desc[i]['weight'], kernels[i] as kernels_desc[i]. The exception
    keeps its type and traceback."""
    def name(match):
        i, field, channel = match.group(1), match.group(2), match.group(3)
        if field is None:
            return f"kernels_desc[{i}]"
        if field == "sigma_image":
            c = 0 if channel is None else int(channel)
            key = owner[c] if c < len(owner) else "image"
        else:
            key = {"weight": "weight", "sigma_xy": "xy"}[field]
        return f"kernels_desc[{i}][{key!r}]"

    try:
        yield
    except (ValueError, TypeError) as e:
        if len(e.args) == 1 and isinstance(e.args[0], str) and _KERNEL_FIELD.search(e.args[0]):
            e.args = (_KERNEL_FIELD.sub(name, e.args[0]),)
        raise


class AttnGatedCRF(torch.nn.Module):
    """AttenScribble's loss on a dense similarity kernel, with the original interface.

    ``forward`` returns ``{"loss": (sum L - sum_i p_i . (L p)_i) / (B n)}`` with
    L = kernel * kernel_xy_mask, diagonal zero, as the original. The mask's non-zero structure is
    turned once per (array, device, dtype) into neighbour lists; when it is sparse (the official
    (2r+1)^2 window: 121 of 4096 entries per row) the loss reads only those kernel entries and
    allocates no n x n temporary beyond the input's own gradient (see ``_window_pairs``).
    A mask with more than a quarter of its entries non-zero takes the dense path. The mask array
    must not be modified in place between calls (it is cached by identity).
    """

    def __init__(self):
        super().__init__()
        self._masks: dict = {}

    def _structure(self, mask, n: int, device, dtype):
        """(WindowStructure on device, or None for the dense path, dense mask or None)."""
        key = (id(mask), str(device), dtype)
        hit = self._masks.get(key)
        if hit is not None and hit[0] is mask:
            return hit[1], hit[2]
        if isinstance(mask, np.ndarray):
            if mask.dtype.kind not in "biuf":
                raise TypeError(f"kernel_xy_mask must be a real floating, integer or bool array, got {mask.dtype}")
            # native byte order and positive strides (flipped or big-endian arrays), as torch needs
            tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=mask.dtype.newbyteorder("=")))
        elif isinstance(mask, torch.Tensor):
            tensor = mask.detach()
        else:
            raise TypeError(f"kernel_xy_mask must be an (n, n) numpy array or tensor, got {type(mask).__name__}")
        if tuple(tensor.shape) != (n, n):
            raise ValueError(f"kernel_xy_mask must have shape (n, n) = ({n}, {n}), got {tuple(tensor.shape)}")
        if tensor.is_complex():
            raise TypeError(f"kernel_xy_mask must be a real floating, integer or bool array, got {tensor.dtype}")
        if tensor.dtype == torch.bool:  # the original converts it to float
            tensor = tensor.to(torch.float32)
        structure = WindowStructure(tensor)
        if 4 * structure.width <= n:
            lean, dense = structure.to(device, dtype), None
        else:
            lean = None
            dense = tensor.to(device=device, dtype=dtype, copy=True)
            dense.diagonal().zero_()
        if len(self._masks) >= 4:
            self._masks.pop(next(iter(self._masks)))
        self._masks[key] = (mask, lean, dense)
        return lean, dense

    def forward(self, y_hat_softmax, kernel, kernel_xy_mask, kernel_h, kernel_w, is_y_grad=True, is_k_grad=True,
                is_exclude_sc=False, batch_is_sc=None):
        is_y_grad, is_k_grad = bool(is_y_grad), bool(is_k_grad)  # the original takes any truthy flag
        if not (is_y_grad or is_k_grad):
            raise ValueError("is_y_grad and is_k_grad are both False: the loss would have no gradient")
        probs = _checks.floating_tensor(y_hat_softmax, "y_hat_softmax", (4,), "(B, C, H, W)")
        b = probs.shape[0]
        kernel_h = _checks.integer(kernel_h, "kernel_h", minimum=1)
        kernel_w = _checks.integer(kernel_w, "kernel_w", minimum=1)
        n = kernel_h * kernel_w
        kernel = _checks.floating_tensor(kernel, "kernel", (3,), f"(B, n, n) = ({b}, {n}, {n})")
        if tuple(kernel.shape) != (b, n, n):
            raise ValueError(f"kernel must have shape (B, kernel_h*kernel_w, kernel_h*kernel_w) = ({b}, {n}, {n}), "
                             f"got {tuple(kernel.shape)}")
        _checks.same_device("kernel", kernel, "y_hat_softmax", probs)
        if not is_y_grad:
            probs = probs.detach()
        if not is_k_grad:
            kernel = kernel.detach()
        gate = None
        if is_k_grad and is_exclude_sc and batch_is_sc is not None:
            try:
                flags = torch.as_tensor(batch_is_sc)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"batch_is_sc must be one flag per sample (bools or numbers), got "
                                f"{batch_is_sc!r}: {exc}") from None
            if flags.is_complex():
                raise TypeError(f"batch_is_sc must be one real flag per sample, got {flags.dtype}")
            single = flags.to(device=kernel.device, dtype=torch.bool)
            if tuple(single.shape) != (b,):
                raise ValueError(f"batch_is_sc must give one flag per sample ({b}), got shape {tuple(single.shape)}")
            gate = (~single).to(torch.promote_types(kernel.dtype, torch.float32))
        probs = functional._resize_to_grid(probs, (kernel_h, kernel_w))
        dtype = torch.promote_types(kernel.dtype, torch.float32)
        p = probs.flatten(2).transpose(1, 2).to(dtype)
        lean, dense = self._structure(kernel_xy_mask, n, kernel.device, dtype)
        if lean is not None and _checks.forward_ad_option(kernel, p):
            # forward-mode AD (torch.func.jvp): the window-pairs function has reverse mode only
            dense = lean.dense_mask(kernel.device, dtype)
            lean = None
        if lean is not None:
            loss = window_pairs_loss(kernel, p, gate, lean) / (b * n)
            # the original multiplies the whole kernel by the mask: a NaN or inf anywhere (inf * 0
            # outside the window, inf - inf inside) makes its loss and the probabilities' gradient
            # NaN. The lean path reads only the window, so it checks the rest with one reduction
            # in the accumulation dtype (no host sync) and multiplies the loss by 1 or NaN.
            finite = torch.isfinite(kernel.detach().sum(dtype=dtype))
            return {"loss": loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)}
        if gate is not None:
            kernel = kernel * gate.view(b, 1, 1)
        pairs = kernel * dense
        return {"loss": (pairs.sum() - (torch.bmm(pairs, p) * p).sum()) / (b * n)}
