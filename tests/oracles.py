"""Brute-force oracles written straight from the spec's per-pair formulas (float64, tiny inputs).
They share no code with the library: every pair (i, j) is enumerated explicitly."""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def crf_pairs_loss(probs, image, *, radius, descs, spacing=None, mask_dst=None, mask_src=None, compat=None,
                   padding="zeros"):
    """L = 1/denom sum_b sum_i m_i sum_{j in win(i), j != i} K_ij msrc_j (1 - <P_i, P_j>) (Potts) or
    sum_{c,c'} mu_cc' P_ic P_jc' (compat). Out-of-image neighbours (padding "zeros") have features 0
    and probability 0. ``descs``: list of (weight, sigma_xy or None, per-channel sigma tuple or None);
    image and masks already at prediction resolution; compat is mu-hat."""
    B, C = probs.shape[:2]
    shape = tuple(probs.shape[2:])
    nd = len(shape)
    radius = (radius,) * nd if isinstance(radius, int) else tuple(radius)
    spacing = (1.0,) * nd if spacing is None else tuple(spacing)
    offsets = [o for o in itertools.product(*[range(-r, r + 1) for r in radius]) if any(o)]
    positions = list(itertools.product(*[range(s) for s in shape]))

    def feature_dist2(b, i, j, desc):
        """Squared feature distance for descriptor desc; j None = out-of-image (features 0)."""
        _, sxy, simg = desc
        total = 0.0
        if sxy is not None:
            for a in range(nd):
                pi = i[a] * spacing[a] / sxy
                pj = 0.0 if j is None else j[a] * spacing[a] / sxy
                total += (pi - pj) ** 2
        if simg is not None:
            for f, s in enumerate(simg):
                if s is None:
                    continue
                vi = image[(b, f) + i] / s
                vj = 0.0 if j is None else image[(b, f) + j] / s
                total = total + (vi - vj) ** 2
        return total

    def kernel(b, i, j):
        return sum(w * torch.exp(torch.as_tensor(-0.5 * feature_dist2(b, i, j, d), dtype=torch.float64))
                   for d in descs for w in [d[0]])

    loss = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for i in positions:
            m_i = 1.0 if mask_dst is None else mask_dst[(b, 0) + i]
            for o in offsets:
                j = tuple(i[a] + o[a] for a in range(nd))
                inside = all(0 <= j[a] < shape[a] for a in range(nd))
                if not inside:
                    if padding == "valid" or mask_src is not None or compat is not None:
                        continue
                    loss = loss + m_i * kernel(b, i, None)
                    continue
                m_j = 1.0 if mask_src is None else mask_src[(b, 0) + j]
                p_i = probs[(b, slice(None)) + i]
                p_j = probs[(b, slice(None)) + j]
                if compat is None:
                    pair = 1.0 - (p_i * p_j).sum()
                else:
                    pair = (compat * p_i[:, None] * p_j[None, :]).sum()
                loss = loss + m_i * m_j * kernel(b, i, j) * pair
    last = mask_dst if mask_dst is not None else mask_src
    denom = last.sum().clamp(min=1) if last is not None else B * math.prod(shape)
    return loss / denom


def decay_mask_loop(h, w, radius, sigma):
    """Dense decay mask by an explicit loop over pivots and their box neighbours (float64), each
    entry through numpy's scalar exp as the original loop evaluates it."""
    n = h * w
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        r, c = divmod(i, w)
        for rr in range(max(0, r - radius), min(h, r + radius + 1)):
            for cc in range(max(0, c - radius), min(w, c + radius + 1)):
                j = rr * w + cc
                if j != i:
                    out[i, j] = float(np.exp(-0.5 * (1 / (sigma ** 2)) * ((r - rr) ** 2 + (c - cc) ** 2)))
    return out


def bilinear_to_grid(probs, grid):
    """Bilinear resize with align_corners=False and no antialias, per output pixel by hand."""
    B, C, H, W = probs.shape
    h, w = grid
    out = torch.zeros(B, C, h, w, dtype=probs.dtype)
    rows = []
    for oy in range(h):
        y = max((oy + 0.5) * H / h - 0.5, 0.0)
        y0 = min(int(math.floor(y)), H - 1)
        y1 = min(y0 + 1, H - 1)
        rows.append((y0, y1, y - y0))
    cols = []
    for ox in range(w):
        x = max((ox + 0.5) * W / w - 0.5, 0.0)
        x0 = min(int(math.floor(x)), W - 1)
        x1 = min(x0 + 1, W - 1)
        cols.append((x0, x1, x - x0))
    for oy, (y0, y1, fy) in enumerate(rows):
        for ox, (x0, x1, fx) in enumerate(cols):
            out[:, :, oy, ox] = ((1 - fy) * ((1 - fx) * probs[:, :, y0, x0] + fx * probs[:, :, y0, x1])
                                 + fy * ((1 - fx) * probs[:, :, y1, x0] + fx * probs[:, :, y1, x1]))
    return out


def similarity_pairs_loss(q, k, probs_grid, head_weight, head_bias, *, radius, sigma, logit_scale=1.0,
                          sample_weight=None):
    """L = 1/(B n) sum_b g_b sum_i sum_{j != i} M_ij W_bij (1 - <p_i, p_j>), every quantity from its
    definition (softmax per row, symmetrised, mixed, sigmoid)."""
    B, H, n, _ = q.shape
    h, w = probs_grid.shape[2:]
    decay = decay_mask_loop(h, w, radius, sigma)
    logits = logit_scale * torch.einsum("bhid,bhjd->bhij", q, k)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    attn = torch.exp(logits - lse)
    p = probs_grid.flatten(2)  # (B, C, n)
    loss = torch.zeros((), dtype=q.dtype)
    for b in range(B):
        g = 1.0 if sample_weight is None else sample_weight[b]
        z = head_bias + sum(head_weight[m] * (attn[b, m] + attn[b, m].T) for m in range(H))
        kernel = torch.sigmoid(z)
        agree = p[b].T @ p[b]  # (n, n) <p_i, p_j>
        loss = loss + g * (decay * kernel * (1 - agree)).sum()
    return loss / (B * n)
