"""The AttenScribble objective through the library (spec §6):

    L = pCE + lambda_crf * L_MCRF + lambda_asl * L_ASL

* pCE: cross-entropy on the scribbles, ignore index = "not annotated".
* L_MCRF: :func:`attenscribble_ops.masked_crf_loss` on the softmax, with the input slice as the
  image, destination mask = unannotated pixels, radius 5, sigma_xy 6, sigma_img 0.1.
* L_ASL: :class:`attenscribble_ops.nn.AttentiveSimilarityLoss` on the attention block's
  similarity, from the second iteration on, with the per-sample gate 0 for single-class slices.

The learnable head mixing of the ASL lives in :class:`ScribbleModel` beside the network, so one
optimizer and one DDP wrapper see every parameter.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from attenscribble_ops import masked_crf_loss
from attenscribble_ops.nn import AttentiveSimilarityLoss

from .model import UNet


@dataclasses.dataclass
class LossConfig:
    """Weights and options of the objective (defaults: the official run)."""

    lambda_crf: float = 0.1
    lambda_asl: float = 0.1
    asl_from_iteration: int = 1
    crf_radius: int = 5
    crf_sigma_xy: float = 6.0
    crf_sigma_image: float = 0.1
    asl_radius: int = 5
    asl_sigma: float = 6.0
    asl_gate: str = "label"   # "label" (official: dense GT has >1 class), "scribble", or "none"
    dense: bool = False       # full supervision: CE on the dense label, no CRF / ASL
    backend: str = "auto"     # loss backend, passed to both losses

    def __post_init__(self):
        if self.asl_gate not in ("label", "scribble", "none"):
            raise ValueError(f"asl_gate must be 'label', 'scribble' or 'none', got {self.asl_gate!r}")
        if self.lambda_crf < 0 or self.lambda_asl < 0:
            raise ValueError("loss weights must be non-negative")

    def scaled(self, size: int, grid: Optional[int]) -> "LossConfig":
        """The windows scaled to keep their extent relative to the image, as in the official run at
        256 x 256 (masked CRF radius 5 px, sigma_xy 6 px) with a 64 x 64 attention grid (ASL radius
        5, sigma 6 grid units): factor size / 256 for the CRF, grid / 64 for the ASL."""
        f_crf = size / 256.0
        f_asl = (grid or 64) / 64.0
        return dataclasses.replace(self, crf_radius=max(1, round(self.crf_radius * f_crf)),
                                   crf_sigma_xy=self.crf_sigma_xy * f_crf,
                                   asl_radius=max(1, round(self.asl_radius * f_asl)), asl_sigma=self.asl_sigma * f_asl)

    @property
    def variant(self) -> str:
        if self.dense:
            return "full supervision"
        parts = ["pCE"] + (["MCRF"] if self.lambda_crf > 0 else []) + (["ASL"] if self.lambda_asl > 0 else [])
        return " + ".join(parts)


class ScribbleModel(nn.Module):
    """The U-Net and the ASL's learnable head mixing; ``forward`` returns the loss terms.

    Keeping the loss inside the module lets DDP synchronise the ASL parameters with the network's.
    """

    def __init__(self, num_classes: int, loss: LossConfig, *, attention_stage: Optional[int] = 2,
                 attention_heads: int = 1, attention_backend: Optional[str] = None):
        super().__init__()
        self.loss_cfg = loss
        self.ignore_index = num_classes
        self.net = UNet(1, num_classes, attention_stage=attention_stage, attention_heads=attention_heads,
                        backend=attention_backend or loss.backend)
        self.asl = None
        if loss.lambda_asl > 0 and not loss.dense:
            if attention_stage is None:
                raise ValueError("the attentive similarity loss needs the attention block (attention_stage)")
            self.asl = AttentiveSimilarityLoss(heads=self.net.similarity_heads, radius=loss.asl_radius,
                                               sigma=loss.asl_sigma, backend=loss.backend)

    def forward(self, batch: dict, iteration: int) -> dict[str, torch.Tensor]:
        cfg = self.loss_cfg
        image = batch["image"]
        logits, similarity = self.net(image)
        logits = logits.float()
        target = batch["target"]
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        terms = {"ce": ce}
        total = ce
        if not cfg.dense:
            probs = logits.softmax(dim=1)
            if cfg.lambda_crf > 0:
                unannotated = (batch["scribble"] == self.ignore_index).unsqueeze(1).float()
                crf = masked_crf_loss(probs, image.float(), radius=cfg.crf_radius, sigma_xy=cfg.crf_sigma_xy,
                                      sigma_image=cfg.crf_sigma_image, mask_dst=unannotated, backend=cfg.backend)
                terms["crf"] = crf
                total = total + cfg.lambda_crf * crf
            if self.asl is not None and iteration >= cfg.asl_from_iteration:
                gate = None if cfg.asl_gate == "none" else batch[f"gate_{cfg.asl_gate}"].to(probs.device)
                similarity = _float_similarity(similarity)
                asl = self.asl(similarity, probs, sample_weight=gate)
                terms["asl"] = asl
                total = total + cfg.lambda_asl * asl
        terms["loss"] = total
        return terms


def _float_similarity(sim):
    """Under autocast the block's q and k may be bf16/fp16: the losses take them in fp32."""
    if sim.q.dtype == torch.float32:
        return sim
    return dataclasses.replace(sim, q=sim.q.float(), k=sim.k.float(),
                               lse=None if sim.lse is None else sim.lse.float())
