"""Attentive similarity loss in plain PyTorch, as the official AttenScribble code computes it:
dense n x n maps, the executable spec and test oracle.

    A^m = softmax_j(logit_scale * q_i . k_j)          per head m (unscaled logits, temperature 1)
    S^m = A^m + (A^m)^T
    W   = sigmoid(sum_m alpha_m S^m + beta)           the 1x1-conv head mixing
    L   = W * M, diagonal zero                        M: Gaussian decay inside the (2r+1)^2 window
    raw = sum_b g_b [sum_ij L_bij - sum_i p_bi . (L_b p_b)_i]

The caller resizes the probabilities to the grid, applies the gradient switches and divides by
B * n. Memory: about a dozen B x heads x n x n tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .. import backends


def window_decay_numpy(h: int, w: int, radius: int, sigma: float) -> np.ndarray:
    """Dense (h*w, h*w) float64 decay M: exp(-(drow^2 + dcol^2) / (2 sigma^2)) where
    max(|drow|, |dcol|) <= radius, 0 elsewhere and on the diagonal. Token t = w * row + col.

    Evaluated with the same float64 operations, in the same order, as the official per-pair loop,
    so the array is bitwise identical to its ``pre_compute_xy_mask``."""
    rows, cols = np.divmod(np.arange(h * w), w)
    drow = rows[:, None] - rows[None, :]
    dcol = cols[:, None] - cols[None, :]
    inside = np.maximum(np.abs(drow), np.abs(dcol)) <= radius
    np.fill_diagonal(inside, False)
    dist2 = drow ** 2 + dcol ** 2
    mask = np.zeros((h * w, h * w))
    mask[inside] = np.exp(-0.5 * (1 / (sigma ** 2)) * dist2[inside])
    return mask


def window_decay(h: int, w: int, radius: int, sigma: float, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Dense (n, n) decay mask M as a tensor, built with torch ops (traceable by torch.compile).

    exp(c (dy^2 + dx^2)) = exp(c dy^2) exp(c dx^2), each factor from a table of the C library's
    exp over the offsets 0..radius: with torch 2.13.0+cpu on the development CPU, the first
    float64 exp of a process that MKL splits over its threads (this mask's, when the oracle ran
    first) was off by up to 3.2e-9 relative in about 1 fresh process in 13, which made the test
    oracle itself nondeterministic (tests/conftest.py warms that call up too)."""
    t = torch.arange(h * w, device=device)
    rows, cols = t // w, t % w
    drow = (rows[:, None] - rows[None, :]).abs()
    dcol = (cols[:, None] - cols[None, :]).abs()
    inside = (torch.maximum(drow, dcol) <= radius) & (t[:, None] != t[None, :])
    scale = -0.5 / sigma ** 2
    table = torch.tensor([math.exp(scale * (d * d)) for d in range(radius + 1)], dtype=torch.float64, device=device)
    decay = table[drow.clamp(max=radius)] * table[dcol.clamp(max=radius)]
    return torch.where(inside, decay, torch.zeros_like(decay)).to(dtype)


@backends.register("attentive_similarity", "reference")
def attentive_similarity_reference(q: torch.Tensor, k: torch.Tensor, probs_grid: torch.Tensor,
                                   head_weight: torch.Tensor, head_bias: torch.Tensor,
                                   lse: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                                   grid: tuple[int, int], radius: int, sigma: float,
                                   logit_scale: float) -> torch.Tensor:
    """Un-normalised loss. q, k (B, heads, n, D); probs_grid (B, C, h, w) already resized;
    head_weight (heads,); head_bias (); sample_weight (B,) or None. ``lse`` is ignored: the
    reference recomputes the softmax from q and k."""
    del lse
    batch, heads, n, _ = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = logit_scale * torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2))  # (B, H, n, n)
    attn = logits.softmax(dim=-1)
    sym = attn + attn.transpose(-1, -2)
    mixed = (head_weight.to(dtype).view(1, heads, 1, 1) * sym).sum(dim=1) + head_bias.to(dtype)
    kernel = torch.sigmoid(mixed)  # (B, n, n)
    if sample_weight is not None:
        kernel = kernel * sample_weight.to(dtype).view(batch, 1, 1)
    pairs = kernel * window_decay(grid[0], grid[1], radius, sigma, dtype, q.device)
    p = probs_grid.to(dtype).flatten(2).transpose(1, 2)  # (B, n, C)
    return pairs.sum() - (torch.bmm(pairs, p) * p).sum()
