"""Cases and helpers shared by the masked CRF tests (test_masked_crf*.py)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import attenscribble_ops as ops
from attenscribble_ops import _crf_params, functional
from attenscribble_ops._checks import accumulate_dtype
from attenscribble_ops.testing import TOLERANCES, make_crf_inputs


@dataclasses.dataclass(frozen=True)
class Case:
    """One masked CRF problem. ``masks``: which of "dst"/"src" are given."""

    shape: tuple = (5, 7)
    batch: int = 2
    classes: int = 3
    channels: int = 1
    radius: object = 1
    padding: str = "zeros"
    masks: tuple = ("dst",)
    compat: bool = False
    kernels: Optional[tuple] = None  # descriptors instead of the default (1, 6, 0.1)
    no_image: bool = False           # pure-xy descriptor, image=None
    image_factor: int = 1
    spacing: Optional[tuple] = None
    sigma_xy: float = 6.0
    sigma_image: object = 0.1

    def id(self) -> str:
        parts = [f"{'x'.join(map(str, self.shape))}", f"B{self.batch}", f"C{self.classes}", f"r{self.radius}"]
        parts += [f"F{self.channels}"] if self.channels != 1 else []
        parts += [self.padding] if self.padding != "zeros" else []
        parts += ["m-" + "+".join(self.masks) if self.masks else "nomask"]
        parts += ["compat"] if self.compat else []
        parts += [f"K{len(self.kernels)}"] if self.kernels else []
        parts += ["xy"] if self.no_image else []
        parts += [f"up{self.image_factor}"] if self.image_factor != 1 else []
        parts += [f"sp{self.spacing}"] if self.spacing else []
        return "-".join(parts)


def make(case: Case, dtype=torch.float64, device="cpu", seed=0) -> tuple[dict, dict]:
    """(tensors, keyword options) for masked_crf_loss."""
    inp = make_crf_inputs(case.batch, case.classes, case.shape, channels=case.channels,
                          image_factor=case.image_factor, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {"probs": inp["probs"], "image": None if case.no_image else inp["image"]}
    big = tuple(s * case.image_factor for s in case.shape)
    if "dst" in case.masks:
        tensors["mask_dst"] = (torch.rand((case.batch, 1) + big, generator=g) < 0.8).to(device)
    if "src" in case.masks:
        tensors["mask_src"] = (torch.rand((case.batch, 1) + big, generator=g) < 0.7).to(device)
    options = dict(radius=case.radius, padding=case.padding, spacing=case.spacing, sigma_xy=case.sigma_xy,
                   sigma_image=None if case.no_image else case.sigma_image)
    if case.kernels is not None:
        options["kernels"] = list(case.kernels)
    if case.compat:
        mat = torch.rand(case.classes, case.classes, generator=g, dtype=torch.float64)
        options["compatibility"] = mat.fill_diagonal_(0)
    return tensors, options


def loss_and_grad(backend: str, tensors: dict, options: dict, upstream: float, dtype=None):
    """Loss and d(upstream * loss)/d probs for one backend; probs cast to ``dtype`` if given."""
    probs = tensors["probs"] if dtype is None else tensors["probs"].to(dtype)
    probs = probs.detach().clone().requires_grad_()
    rest = {k: v for k, v in tensors.items() if k != "probs"}
    loss = ops.masked_crf_loss(probs, backend=backend, **rest, **options)
    (loss * upstream).backward()
    return loss.detach(), probs.grad


def assert_matches_reference(backend: str, case: Case, dtype=torch.float64, device="cpu", seed=0):
    """Value and gradient (random upstream scale) of ``backend`` in ``dtype`` against the
    float64 reference; low precision: error <= 2x the reference's own error in that dtype."""
    tensors, options = make(case, torch.float64, device, seed)
    upstream = float(torch.empty(()).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(seed)))
    ref_loss, ref_grad = loss_and_grad("reference", tensors, options, upstream)
    loss, grad = loss_and_grad(backend, tensors, options, upstream, dtype)
    assert loss.dtype == accumulate_dtype(dtype) and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == ref_grad.shape
    if dtype in (torch.float64, torch.float32):
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=rtol)
        torch.testing.assert_close(grad.double(), ref_grad, atol=atol, rtol=rtol)
        return
    low_loss, low_grad = loss_and_grad("reference", tensors, options, upstream, dtype)
    for got, low, ref in ((loss, low_loss, ref_loss), (grad, low_grad, ref_grad)):
        err = (got.double() - ref).abs().max()
        ref_err = (low.double() - ref).abs().max()
        assert err <= 2 * ref_err + 1e-6 * ref.abs().max(), (err, ref_err)


def op_arguments(case: Case, dtype=torch.float64, device="cpu", seed=0) -> tuple:
    """The arguments of the compiled/Triton operators for a case, prepared as masked_crf_loss does."""
    tensors, options = make(case, dtype, device, seed)
    probs = tensors["probs"]
    acc = accumulate_dtype(dtype)
    nd = probs.dim() - 2
    image = tensors["image"]
    params = _crf_params.canonical(nd=nd, radius=options["radius"], spacing=options["spacing"],
                                   padding=options["padding"], kernels=options.get("kernels"), weight=1.0,
                                   sigma_xy=options["sigma_xy"], sigma_image=options["sigma_image"],
                                   channels=None if image is None else image.shape[1])
    image = functional._area_downsample(image.to(acc), probs.shape[2:]) if params.uses_image else None
    mask_dst = functional._prepare_mask(tensors.get("mask_dst"), "mask_dst", probs, acc)
    mask_src = functional._prepare_mask(tensors.get("mask_src"), "mask_src", probs, acc)
    compat = functional._prepare_compat(options.get("compatibility"), probs.shape[1], acc, probs.device)
    return probs, image, mask_dst, mask_src, compat, params
