"""The lean path of :class:`compat.AttnGatedCRF`: the loss on a dense (B, n, n) kernel reading
only the entries where the (n, n) pair mask is non-zero (the (2r+1)^2 window of the official
mask), with no n x n temporary beyond the input (and the input's own gradient).

    raw = sum_b g_b sum_i sum_{j: M_ij != 0, j != i} M_ij K_bij (1 - p_bi . p_bj)
    d raw / d K_bij = g_b M_ij (1 - p_bi . p_bj)                     (scattered into a dense zero tensor)
    d raw / d p_bi  = -g_b [sum_j M_ij K_bij p_bj + sum_j M_ji K_bji p_bj]

The mask's structure is turned once into padded neighbour lists, by row (who i reads) and by
column (who reads i), so both sums of dp are gathers: no atomics, deterministic. Rows are
processed in chunks so gathered temporaries stay around ``_CHUNK_ELEMENTS``. Works on any device
in plain PyTorch; torch.gather reads strided kernels in place.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._composite import two_forms

_CHUNK_ELEMENTS = 1 << 22


class WindowStructure:
    """Padded neighbour lists of an (n, n) mask with the diagonal ignored.

    Attributes:
        idx, val: (n, K) column indices and mask values of each row's non-zeros; padding entries
            point at the row itself with value 0 (harmless: that entry is never a real pair).
        idx_t, val_t: the same for the columns (the transposed mask).
    """

    def __init__(self, mask: torch.Tensor):
        mask = mask.detach().to("cpu", torch.float64).clone()
        mask.fill_diagonal_(0)
        self.n = mask.shape[0]
        self.idx, self.val = self._lists(mask)
        self.idx_t, self.val_t = self._lists(mask.t())

    @property
    def width(self) -> int:
        return self.idx.shape[1]

    @staticmethod
    def _lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = mask.shape[0]
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order
        counts = torch.bincount(rows, minlength=n)
        width = max(1, int(counts.max())) if rows.numel() else 1
        start = torch.cumsum(counts, 0) - counts
        pos = torch.arange(rows.numel()) - start[rows]
        idx = torch.arange(n).unsqueeze(1).repeat(1, width)
        val = torch.zeros(n, width, dtype=torch.float64)
        idx[rows, pos] = cols
        val[rows, pos] = mask[rows, cols]
        return idx, val

    def dense_mask(self, device, dtype) -> torch.Tensor:
        """The (n, n) mask back, diagonal zero (padding entries write 0 onto the diagonal)."""
        mask = torch.zeros(self.n, self.n, dtype=self.val.dtype, device=self.val.device)
        return mask.scatter_(1, self.idx, self.val).to(device=device, dtype=dtype)

    def to(self, device, dtype) -> "WindowStructure":
        out = object.__new__(WindowStructure)
        out.n = self.n
        out.idx, out.idx_t = self.idx.to(device), self.idx_t.to(device)
        out.val, out.val_t = self.val.to(device, dtype), self.val_t.to(device, dtype)
        return out


def _row_chunks(n: int, batch: int, width: int, classes: int):
    rows = max(1, _CHUNK_ELEMENTS // max(1, batch * width * (classes + 1)))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _neighbour_probs(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """p (B, n, C), idx (r, K) -> (B, r, K, C)."""
    return p[:, idx.reshape(-1)].view(p.shape[0], idx.shape[0], idx.shape[1], p.shape[2])


@two_forms
class _WindowPairsLoss(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(kernel, p, gate, structure: WindowStructure):
        batch, n, _ = kernel.shape
        total = kernel.new_zeros((), dtype=p.dtype)
        for r0, r1 in _row_chunks(n, batch, structure.width, p.shape[2]):
            idx = structure.idx[r0:r1]
            kern = kernel[:, r0:r1].gather(2, idx.expand(batch, -1, -1)).to(p.dtype)
            dissim = 1 - torch.einsum("brc,brkc->brk", p[:, r0:r1], _neighbour_probs(p, idx))
            total = total + (gate.view(batch, 1, 1) * structure.val[r0:r1] * kern * dissim).sum()
        return total

    @staticmethod
    def setup_context(ctx, inputs, output):
        kernel, p, gate, structure = inputs
        ctx.save_for_backward(kernel, p, gate)
        ctx.structure = structure

    @staticmethod
    def backward(ctx, grad):
        kernel, p, gate = ctx.saved_tensors
        s = ctx.structure
        batch, n, _ = kernel.shape
        scale = (grad * gate).view(batch, 1, 1)
        dkernel = torch.zeros_like(kernel, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        dp = torch.empty_like(p) if ctx.needs_input_grad[1] else None
        for r0, r1 in _row_chunks(n, batch, max(s.width, s.idx_t.shape[1]), p.shape[2]):
            idx, idx_t = s.idx[r0:r1], s.idx_t[r0:r1]
            p_nb = _neighbour_probs(p, idx)
            if dkernel is not None:
                dissim = 1 - torch.einsum("brc,brkc->brk", p[:, r0:r1], p_nb)
                values = (scale * s.val[r0:r1] * dissim).to(kernel.dtype)
                # padding entries write 0 onto the (never real) diagonal: duplicates agree
                dkernel[:, r0:r1].scatter_(2, idx.expand(batch, -1, -1), values)
            if dp is not None:
                kern = kernel[:, r0:r1].gather(2, idx.expand(batch, -1, -1)).to(p.dtype)
                # kernel[b, idx_t[j, k], j] for the columns j of this chunk: a gather along dim 1
                kern_t = kernel[:, :, r0:r1].gather(1, idx_t.t().expand(batch, -1, -1)).transpose(1, 2).to(p.dtype)
                out = torch.einsum("brk,brkc->brc", s.val[r0:r1] * kern, p_nb)
                out = out + torch.einsum("brk,brkc->brc", s.val_t[r0:r1] * kern_t, _neighbour_probs(p, idx_t))
                dp[:, r0:r1] = -scale * out
        return dkernel, dp, None, None


def window_pairs_loss(kernel: torch.Tensor, probs_tokens: torch.Tensor, gate: Optional[torch.Tensor],
                      structure: WindowStructure) -> torch.Tensor:
    """Un-normalised loss. kernel (B, n, n); probs_tokens (B, n, C) in the compute dtype; gate
    (B,) or None; structure already on the kernel's device in the compute dtype."""
    if gate is None:
        gate = probs_tokens.new_ones(kernel.shape[0])
    return _WindowPairsLoss.call(kernel, probs_tokens, gate.to(probs_tokens.dtype), structure)
