"""Attention of the spatial self-attention block, alone and with the attentive similarity loss.

Two workloads, providers x shapes x modes:

* ``attention``: out = softmax(q k^T / sqrt(D)) v from given q, k, v (backward seeded with a
  random gradient of out). Providers: "reference" (dense, eager), "reference-compile", the fused
  "cpu", "cuda", "triton" and "aten" (torch's fused SDPA kernels, run twice: all four also return
  the similarity LSE), and the peers: torch's
  scaled_dot_product_attention with its default choice ("sdpa") and each of its backends forced
  on the GPU ("sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"), and FlexAttention
  ("flex", under torch.compile).
* ``block+loss``: the attention with the similarity loss on its q, k and LSE, as
  :class:`attenscribble_ops.nn.SpatialSelfAttention` hands them over (``tie_qk=True``), backward
  through both: what the issue's "block attention + loss" targets compare with the SDPA peers.

Shapes: B = 12, D = 64 per head, 64 x 64 and 128 x 128 grids, 1 and 4 heads, fp32.

    python -m benchmarks --suite attention [--quick] [--device cuda]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import attenscribble_ops as ao
from attenscribble_ops.testing import loss_backend_for

from .bench_attentive_similarity import cases, check_provider, inputs
from .common import Suite, Unavailable, Workload

OURS = ("reference", "reference-compile", "cpu", "cuda", "triton", "aten")
SDPA_BACKENDS = {"sdpa-math": "MATH", "sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION"}
WORKLOADS = ("attention", "block+loss")


def suite_cases(quick: bool, device_type: str) -> list[dict]:
    return [dict(case, workload=w) for w in WORKLOADS for case in cases(quick, device_type)]


def providers(device_type: str) -> list[str]:
    peers = ["sdpa", "flex"] + (list(SDPA_BACKENDS) if device_type == "cuda" else [])
    return list(OURS) + peers


def _sdpa(provider: str):
    if provider == "sdpa":
        return F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA_BACKENDS[provider])

    def run(q, k, v):
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:  # older torch
        raise Unavailable(f"FlexAttention is not in this torch: {exc}") from exc
    return torch.compile(flex_attention)


def build(provider: str, case: dict, device: torch.device) -> Workload:
    x = inputs(case, device)
    q, k, probs, hw, hb, grid = x["q"], x["k"], x["probs"], x["head_weight"], x["head_bias"], x["grid"]
    v = torch.randn_like(q).requires_grad_()
    grad_out = torch.randn_like(q)
    if case["workload"] == "attention":
        if provider in OURS:
            backend = check_provider("spatial_attention", provider, case, device)

            def attend(q, k, v):
                return ao.spatial_attention(q, k, v, backend=backend)[0]

            fn = torch.compile(attend) if provider == "reference-compile" else attend
        elif provider == "flex":
            fn = _flex()
        else:
            fn = _sdpa(provider)

        def forward():
            out = fn(q, k, v)
            return (out,)

        work = Workload(forward, [q, k, v], grad_outputs=[grad_out])
        if provider in ("flex", "aten") or provider.startswith("sdpa-"):
            work = _probe(work, provider)
        return work
    if provider not in OURS:
        raise Unavailable("the peers compute attention only (no similarity LSE for the loss)")
    attention = check_provider("spatial_attention", provider, case, device)
    loss = loss_backend_for(attention)  # beside "aten" (attention only): the fastest fused loss

    def block(q, k, v, probs, hw, hb):
        out, lse, qt, kt = ao.spatial_attention(q, k, v, backend=attention, tie_qk=True)
        return out, ao.attentive_similarity_loss(qt, kt, probs, hw, hb, grid=grid, lse=lse, backend=loss)

    fn = torch.compile(block) if provider == "reference-compile" else block
    work = Workload(lambda: fn(q, k, v, probs, hw, hb), [q, k, v, probs, hw, hb], grad_outputs=[grad_out, None])
    return _probe(work, provider) if provider == "aten" else work


def _probe(work: Workload, provider: str) -> Workload:
    """A peer, or "aten", that cannot run here (no kernel of torch's for this device, dtype or head
    dim) is recorded as unavailable with torch's reason instead of failing the suite."""
    try:
        work.forward()
    except (RuntimeError, torch._dynamo.exc.BackendCompilerFailed, NotImplementedError) as exc:
        raise Unavailable(f"{provider}: {str(exc).splitlines()[0][:160]}") from exc
    return work


SUITE = Suite("attention", suite_cases, providers, build)
