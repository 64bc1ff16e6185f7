"""Masked CRF loss: providers x shapes x modes.

Providers: "reference" (the unfold implementation of the original, eager), "reference-compile"
(the same under torch.compile), and the fused backends "cpu", "cuda", "triton" (Triton is timed on
a GPU only: the CPU interpreter is a correctness tool). Shapes: the official AttenScribble size
(B=12, C=4, 256^2, r=5) and series over the image size, the radius and a 3-D volume.

    python -m benchmarks --suite masked_crf [--quick] [--device cuda]
"""
from __future__ import annotations

import math

import torch

import attenscribble_ops as ao
from attenscribble_ops import backends
from attenscribble_ops.testing import make_crf_inputs

from .common import Suite, Unavailable, Workload

PROVIDERS = ("reference", "reference-compile", "cpu", "cuda", "triton")
# The unfold reference holds ~2.5 window-sized copies of probs; past this it is not attempted.
REFERENCE_LIMIT_BYTES = {"cpu": 8 << 30, "cuda": 60 << 30}


def cases(quick: bool, device_type: str) -> list[dict]:
    base = dict(B=12, C=4, depth=1, radius=5)
    if quick:
        return [dict(base, B=2, size=64, series="size"), dict(base, B=2, size=64, radius=2, series="radius")]
    if device_type == "cpu":
        return [dict(base, size=256, series=["size", "radius"]), dict(base, size=512, series="size"),
                dict(base, size=256, radius=10, series="radius"),
                dict(base, B=1, size=128, depth=32, radius=(2, 5, 5), series=None),
                dict(base, B=1, size=128, depth=128, radius=(2, 5, 5), series=None)]
    return ([dict(base, size=s, series=["size", "radius"] if s == 256 else "size") for s in (128, 256, 512)]
            + [dict(base, size=256, radius=r, series="radius") for r in (2, 10)]
            + [dict(base, B=2, size=128, depth=128, radius=(2, 5, 5), series=None)])


def providers(device_type: str) -> list[str]:
    return list(PROVIDERS)


def _shape(case: dict) -> tuple:
    side = (case["size"], case["size"])
    return side if case["depth"] == 1 else (case["depth"],) + side


def reference_bytes(case: dict) -> int:
    shape = _shape(case)
    radius = case["radius"] if isinstance(case["radius"], tuple) else (case["radius"],) * len(shape)
    window = math.prod(2 * r + 1 for r in radius)
    return int(2.5 * 4 * case["B"] * case["C"] * math.prod(shape) * window)


def build(provider: str, case: dict, device: torch.device) -> Workload:
    backend = "reference" if provider.startswith("reference") else provider
    if provider == "triton" and device.type != "cuda":
        raise Unavailable("Triton is timed on a GPU only (the CPU interpreter is a correctness tool)")
    if backend == "reference":
        need = reference_bytes(case)
        if need > REFERENCE_LIMIT_BYTES.get(device.type, 8 << 30):
            raise Unavailable(f"the unfold reference would need about {need / 2**30:.0f} GiB")
    else:
        reason = backends.why_not("masked_crf", backend, backends.Meta(device.type, torch.float32, 2 + len(_shape(case))))
        if reason:
            raise Unavailable(reason)
    d = make_crf_inputs(case["B"], case["C"], _shape(case), device=device)
    probs = d["probs"].requires_grad_()
    image, mask = d["image"], d["mask_dst"]
    radius = case["radius"]

    def loss(p):
        return ao.masked_crf_loss(p, image, radius=radius, mask_dst=mask, backend=backend)

    fn = torch.compile(loss) if provider == "reference-compile" else loss
    return Workload(lambda: fn(probs), [probs])


SUITE = Suite("masked_crf", cases, providers, build)
