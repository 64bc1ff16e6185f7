"""Modules: MaskedCRFLoss, AttentiveSimilarityLoss and the SpatialSelfAttention block.

A model that plugs :class:`SpatialSelfAttention` on a feature map and trains with
:class:`AttentiveSimilarityLoss` reproduces the official AttenScribble pipeline: the block returns
its features and the ``similarity`` (queries, keys, grid and the row log-sum-exps) that the loss
needs, so a fused backend never materialises an n x n map.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from . import functional
from ._checks import FLOATING, bandwidth, integer, number, window_radius


@dataclasses.dataclass
class AttentionSimilarity:
    """What :class:`SpatialSelfAttention` hands the similarity loss.

    Attributes:
        q, k: (B, depth * heads, n, D_head) queries and keys of every layer, heads stacked.
        grid: (h, w) of the feature map, n = h * w.
        lse: (B, depth * heads, n) row log-sum-exp of the similarity logits, or None.
        logit_scale: scale of the similarity logits (official 1).
    """

    q: torch.Tensor
    k: torch.Tensor
    grid: tuple[int, int]
    lse: Optional[torch.Tensor] = None
    logit_scale: float = 1.0

    @property
    def heads(self) -> int:
        return self.q.shape[1]


def _init_official(module: nn.Module) -> None:
    """The official block's initialisation: truncated normal (std 0.02) linears with zero bias,
    unit LayerNorms, He-normal depthwise convolutions with zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class _MixFFN(nn.Module):
    """Linear D -> hidden, depthwise 3x3 conv on the grid, GELU, Linear hidden -> D."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, bias=True, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        x = self.fc1(x)
        x = self.dwconv(x.transpose(1, 2).reshape(b, -1, h, w)).flatten(2).transpose(1, 2)
        return self.drop(self.fc2(self.drop(self.act(x))))


class _DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class _Block(nn.Module):
    """Pre-norm transformer block of the official code (attention, then Mix-FFN)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, drop_path: float,
                 backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.drop_path = _DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, h: int, w: int, logit_scale: float):
        b, n, c = x.shape
        u = self.norm1(x)
        q = self.q(u).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(u).reshape(b, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if torch.is_grad_enabled() and not torch.jit.is_tracing():
            # q, k tied to the attention node: the attention backward adds its dq, dk to the loss's window terms
            out, lse, q, k = functional.spatial_attention(q, k, v, logit_scale=logit_scale,
                                                          backend=self.backend, tie_qk=True)
        else:  # inference, or a TorchScript trace (its graph then does not depend on the grad mode): no LSE
            # (a similarity loss computed here computes its own)
            out, lse = functional.spatial_attention(q, k, v, logit_scale=logit_scale, backend=self.backend,
                                                    return_lse=False)
        x = x + self.drop_path(self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c))))
        x = x + self.drop_path(self.mlp(self.norm2(x), h, w))
        return x, q, k, lse


class SpatialSelfAttention(nn.Module):
    """The AttenScribble spatial self-attention block, pluggable on any (B, D, h, w) feature map.

    ``depth`` pre-norm transformer blocks (attention with ``heads`` heads, Mix-FFN with a depthwise
    3x3 conv), then a final LayerNorm. The official run: dim 64, heads 1, depth 1, after the second
    encoder stage of a U-Net, its output replacing that stage's features.

    Args:
        dim: channels D of the feature map (divisible by ``heads``).
        heads: attention heads per layer.
        depth: number of layers; the similarity carries depth * heads maps.
        mlp_ratio: hidden width of the Mix-FFN over D.
        qkv_bias: bias in the query/key/value projections (official: False).
        drop: dropout after the projections; drop_path: stochastic depth.
        logit_scale: scale of the similarity logits (official 1).
        backend: attention backend ("auto", "reference", "cpu", "cuda", "triton").

    Shape:
        x: (B, D, h, w) -> features (B, D, h, w), similarity :class:`AttentionSimilarity`.

    Where no gradient is recorded (``torch.no_grad``, ``torch.inference_mode``) the similarity
    carries no LSE (a similarity loss computed there computes its own), and "auto" computes the
    attention with torch's SDPA, which is faster than a sweep that also computes the LSE.

    Example:
        >>> block = SpatialSelfAttention(64)
        >>> loss_fn = AttentiveSimilarityLoss(heads=block.similarity_heads)
        >>> feats, sim = block(x)
        >>> loss = loss_fn(sim, probs)
    """

    def __init__(self, dim: int, heads: int = 1, depth: int = 1, mlp_ratio: float = 4, *, qkv_bias: bool = False,
                 drop: float = 0.0, drop_path: float = 0.0, logit_scale: float = 1.0, backend: str = "auto"):
        super().__init__()
        dim = integer(dim, "dim", minimum=1)
        heads = integer(heads, "heads", minimum=1)
        depth = integer(depth, "depth", minimum=1)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        mlp_ratio = number(mlp_ratio, "mlp_ratio", positive=True)
        if int(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must give the Mix-FFN at least one hidden channel: int(dim * mlp_ratio) "
                             f"= int({dim} * {mlp_ratio}) is 0")
        if not 0 <= number(drop, "drop") <= 1:
            raise ValueError(f"drop must be a probability in [0, 1], got {drop}")
        if not 0 <= number(drop_path, "drop_path") < 1:  # kept paths are scaled by 1 / (1 - drop_path)
            raise ValueError(f"drop_path must be a probability in [0, 1), got {drop_path}")
        self.dim, self.heads, self.depth = dim, heads, depth
        self.logit_scale = logit_scale  # checked by the property's setter
        self.blocks = nn.ModuleList(
            _Block(dim, heads, mlp_ratio, qkv_bias, drop, drop_path, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_official)

    @property
    def logit_scale(self) -> float:
        """Scale of the similarity logits; read by every forward, so it may be changed between calls."""
        return self._logit_scale

    @logit_scale.setter
    def logit_scale(self, value: float) -> None:
        self._logit_scale = number(value, "logit_scale")

    @property
    def similarity_heads(self) -> int:
        """Number of similarity maps (depth * heads): the ``heads`` of AttentiveSimilarityLoss."""
        return self.depth * self.heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, AttentionSimilarity]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"x must be a (B, {self.dim}, h, w) feature map, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype not in FLOATING:
            raise TypeError(f"x must be a floating-point feature map (float16, bfloat16, float32 or float64), "
                            f"got {x.dtype}")
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        qs, ks, lses = [], [], []
        for block in self.blocks:
            tokens, q, k, lse = block(tokens, h, w, self.logit_scale)
            qs.append(q)
            ks.append(k)
            lses.append(lse)
        features = self.norm(tokens).transpose(1, 2).reshape(b, c, h, w)
        cat = (lambda t: t[0]) if self.depth == 1 else (lambda t: torch.cat(t, dim=1))
        # no LSE where the blocks computed none (inference, a trace): a loss computes its own
        lse = None if any(t is None for t in lses) else cat(lses)
        return features, AttentionSimilarity(cat(qs), cat(ks), (h, w), lse, self.logit_scale)


class AttentiveSimilarityLoss(nn.Module):
    """Attentive similarity loss with its learnable head mixing (the official 1x1 conv).

    Args:
        heads: number of similarity maps (``SpatialSelfAttention.similarity_heads``).
        radius, sigma: window half-size and distance decay on the grid (official 5 and 6).
        grad_probs, grad_kernel: gradient switches (official: both on).
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    ``weight`` (heads,) and ``bias`` () are initialised exactly as ``nn.Conv2d(heads, 1, 1)``.

    Shape:
        forward(similarity, probs (B, C, H, W), sample_weight (B,) or None) -> 0-d loss.
    """

    def __init__(self, heads: int = 1, radius: int = 5, sigma: float = 6.0, *, grad_probs: bool = True,
                 grad_kernel: bool = True, backend: str = "auto"):
        super().__init__()
        heads = integer(heads, "heads", minimum=1)
        conv = nn.Conv2d(heads, 1, kernel_size=1, bias=True)
        self.weight = nn.Parameter(conv.weight.detach().reshape(heads).clone())
        self.bias = nn.Parameter(conv.bias.detach().reshape(()).clone())
        self.heads = heads
        self.radius = window_radius(radius, "radius")
        self.sigma = bandwidth(sigma, "sigma")
        self.grad_probs, self.grad_kernel, self.backend = grad_probs, grad_kernel, backend

    def forward(self, similarity: AttentionSimilarity, probs: torch.Tensor,
                sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(similarity, AttentionSimilarity):
            raise TypeError(f"similarity must be the AttentionSimilarity returned by SpatialSelfAttention, "
                            f"got {type(similarity).__name__}")
        return functional.attentive_similarity_loss(
            similarity.q, similarity.k, probs, self.weight, self.bias, grid=similarity.grid, radius=self.radius,
            sigma=self.sigma, logit_scale=similarity.logit_scale, sample_weight=sample_weight,
            grad_probs=self.grad_probs, grad_kernel=self.grad_kernel, lse=similarity.lse, backend=self.backend)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, radius={self.radius}, sigma={self.sigma}"


class MaskedCRFLoss(nn.Module):
    """Module form of :func:`attenscribble_ops.masked_crf_loss` (options fixed at construction).

    Shape:
        forward(probs (B, C, *S), image (B, F, *S'), mask_dst=None, mask_src=None) -> 0-d loss.
    """

    def __init__(self, radius=5, sigma_xy=6.0, sigma_image=0.1, weight=1.0, *, kernels=None,
                 compatibility=None, padding: str = "zeros", spacing=None, backend: str = "auto"):
        super().__init__()
        self.options = dict(radius=radius, sigma_xy=sigma_xy, sigma_image=sigma_image, weight=weight,
                            kernels=kernels, compatibility=compatibility, padding=padding, spacing=spacing,
                            backend=backend)

    def forward(self, probs: torch.Tensor, image: Optional[torch.Tensor] = None, mask_dst=None,
                mask_src=None) -> torch.Tensor:
        return functional.masked_crf_loss(probs, image, mask_dst=mask_dst, mask_src=mask_src, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
