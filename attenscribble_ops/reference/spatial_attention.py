"""Attention of the spatial self-attention block in plain PyTorch (dense, as the official code).

    out     = softmax(q k^T / sqrt(D)) v
    lse_sim = logsumexp_j(logit_scale * q_i . k_j)      (the similarity softmax's normaliser)

Shapes: q, k, v (B, heads, n, D); out like q; lse_sim (B, heads, n) in fp32 (fp64 for fp64).
"""
from __future__ import annotations

import torch

from .. import backends


@backends.register("spatial_attention", "reference")
def spatial_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logit_scale: float,
                                tie_qk: bool = False) -> tuple[torch.Tensor, ...]:
    """``tie_qk``: also return q and k themselves (the fused backends return views owned by their
    autograd node; the dense reference needs no such hand-over)."""
    logits = torch.matmul(q, k.transpose(-1, -2))
    out = torch.matmul((logits * (q.shape[-1] ** -0.5)).softmax(dim=-1), v)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(logit_scale * logits.to(acc), dim=-1)
    return (out, lse, q, k) if tie_qk else (out, lse)

