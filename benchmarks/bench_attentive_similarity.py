"""Attentive similarity loss from given q, k (the official "ASL from given Q, K"): providers x
shapes x modes.

Providers: "reference" (the dense official semantics, eager), "reference-compile" (the same under
torch.compile), and the fused backends "cpu", "cuda", "triton" (Triton is timed on a GPU only).
Shapes: B = 12, D = 64 per head, 64 x 64 and 128 x 128 grids, 1 and 4 heads, probabilities at 4x
the grid (256 x 256 for the 64 x 64 grid), official radius 5 and sigma 6, fp32.

    python -m benchmarks --suite attentive_similarity [--quick] [--device cuda]
"""
from __future__ import annotations

import torch

import attenscribble_ops as ao
from attenscribble_ops import backends
from attenscribble_ops.testing import make_similarity_inputs

from .common import Suite, Unavailable, Workload

PROVIDERS = ("reference", "reference-compile", "cpu", "cuda", "triton")
# The dense reference holds about six (B, heads, n, n) fp32 maps at its peak (measured here: 4.6 GiB
# for the loss at B=12, 64 x 64, one head); past these it is not attempted.
REFERENCE_LIMIT_BYTES = {"cpu": 12 << 30, "cuda": 60 << 30}
REFERENCE_MAPS = 6.5


def cases(quick: bool, device_type: str) -> list[dict]:
    if quick:
        return [dict(B=2, grid=16, heads=1, D=16, series="grid"), dict(B=2, grid=16, heads=2, D=16, series="heads")]
    return [dict(B=12, grid=64, heads=1, D=64, series=["grid", "heads"]),
            dict(B=12, grid=128, heads=1, D=64, series="grid"), dict(B=12, grid=64, heads=4, D=64, series="heads")]


def providers(device_type: str) -> list[str]:
    return list(PROVIDERS)


def reference_bytes(case: dict) -> int:
    n = case["grid"] ** 2
    return int(REFERENCE_MAPS * 4 * case["B"] * case["heads"] * n * n)


def check_provider(op: str, provider: str, case: dict, device: torch.device) -> str:
    """The backend a provider runs, or Unavailable with the reason."""
    backend = "reference" if provider.startswith("reference") else provider
    if provider == "triton" and device.type != "cuda":
        raise Unavailable("Triton is timed on a GPU only (the CPU interpreter is a correctness tool)")
    if backend == "reference":
        need = reference_bytes(case)
        if need > REFERENCE_LIMIT_BYTES.get(device.type, 12 << 30):
            raise Unavailable(f"the dense reference would need about {need / 2**30:.0f} GiB")
    else:
        reason = backends.why_not(op, backend, backends.Meta(device.type, torch.float32, 4))
        if reason:
            raise Unavailable(reason)
    return backend


def inputs(case: dict, device: torch.device) -> dict:
    x = make_similarity_inputs(case["B"], case["heads"], (case["grid"], case["grid"]), case["D"], device=device)
    for name in ("q", "k", "probs", "head_weight", "head_bias"):
        x[name].requires_grad_()
    return x


def build(provider: str, case: dict, device: torch.device) -> Workload:
    backend = check_provider("attentive_similarity", provider, case, device)
    x = inputs(case, device)
    q, k, probs, hw, hb, grid = x["q"], x["k"], x["probs"], x["head_weight"], x["head_bias"], x["grid"]

    def loss(q, k, probs, hw, hb):
        return ao.attentive_similarity_loss(q, k, probs, hw, hb, grid=grid, backend=backend)

    fn = torch.compile(loss) if provider == "reference-compile" else loss
    return Workload(lambda: fn(q, k, probs, hw, hb), [q, k, probs, hw, hb])


SUITE = Suite("attentive_similarity", cases, providers, build)
