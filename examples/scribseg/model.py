"""The official U-Net of the scribble-supervision code base (WSL4MIS / AttenScribble), with the
library's spatial self-attention block pluggable at any encoder stage.

Encoder: five stages of two 3x3 conv + BatchNorm + LeakyReLU with dropout between them, channels
16-32-64-128-256, dropout 0.05/0.1/0.2/0.3/0.5, 2x2 max-pooling before stages 1-4. Decoder: 2x2
transposed convolutions (the official ``bilinear: False``), concatenation with the skip, the same
conv block without dropout; a 3x3 output convolution. With ``attention_stage=s`` the block runs on
stage s's features and its output replaces them (the skip connection and the next stage both see
it): the official run uses s = 2 (64 channels at 64 x 64 for a 256 x 256 input).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attenscribble_ops.nn import AttentionSimilarity, SpatialSelfAttention

CHANNELS = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Module):
    """conv3x3-BN-LeakyReLU, dropout, conv3x3-BN-LeakyReLU."""

    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UpBlock(nn.Module):
    """2x2 transposed conv of the deeper features, concatenated with the skip, then a ConvBlock."""

    def __init__(self, cin_deep: int, cin_skip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin_deep, cin_skip, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * cin_skip, cout, 0.0)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(deep)], dim=1))


class UNet(nn.Module):
    """U-Net with an optional :class:`attenscribble_ops.nn.SpatialSelfAttention` at one stage.

    Args:
        in_channels, num_classes: input channels and output classes (background included).
        attention_stage: encoder stage (0-4) whose features the block replaces, or None.
        attention_heads, attention_depth: of the block (official 1 and 1).
        backend: backend of the block's attention ("auto", "reference", ...).

    Shape:
        x (B, in_channels, H, W), H and W divisible by 16 -> logits (B, num_classes, H, W) and the
        block's :class:`AttentionSimilarity` (None without a block).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 4, *, attention_stage: Optional[int] = 2,
                 attention_heads: int = 1, attention_depth: int = 1, backend: str = "auto"):
        super().__init__()
        if attention_stage is not None and not 0 <= attention_stage < len(CHANNELS):
            raise ValueError(f"attention_stage must be in 0..{len(CHANNELS) - 1} or None, got {attention_stage}")
        self.num_classes = num_classes
        self.attention_stage = attention_stage
        self.encoder = nn.ModuleList()
        cin = in_channels
        for cout, drop in zip(CHANNELS, DROPOUT):
            self.encoder.append(ConvBlock(cin, cout, drop))
            cin = cout
        self.pool = nn.MaxPool2d(2)
        self.attention = None
        if attention_stage is not None:
            self.attention = SpatialSelfAttention(CHANNELS[attention_stage], heads=attention_heads,
                                                  depth=attention_depth, backend=backend)
        self.decoder = nn.ModuleList(
            UpBlock(CHANNELS[i + 1], CHANNELS[i], CHANNELS[i]) for i in reversed(range(len(CHANNELS) - 1)))
        self.head = nn.Conv2d(CHANNELS[0], num_classes, 3, padding=1)

    @property
    def similarity_heads(self) -> int:
        return 0 if self.attention is None else self.attention.similarity_heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[AttentionSimilarity]]:
        if x.dim() != 4 or x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"input must be (B, C, H, W) with H and W divisible by 16, got {tuple(x.shape)}")
        skips, similarity = [], None
        for stage, block in enumerate(self.encoder):
            x = block(x if stage == 0 else self.pool(x))
            if stage == self.attention_stage:
                x, similarity = self.attention(x)
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x), similarity
