"""Slice-wise inference (spec §7) and evaluation of a list of volumes.

Each slice is resized to ``size`` x ``size`` by bilinear interpolation, segmented (argmax), the
label map resized back to the slice's size by nearest neighbour, and the slices stacked to 3-D.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import score_case
from .model import UNet
from .volume import Volume


@torch.no_grad()
def predict_volume(net: UNet, image: np.ndarray, size: int, *, device="cpu", batch: int = 16,
                   amp_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """(Z, H, W) image in [0, 1] -> (Z, H, W) uint8 label map."""
    was_training = net.training
    net.eval()
    z, h, w = image.shape
    out = np.zeros((z, h, w), np.uint8)
    device = torch.device(device)
    try:
        for start in range(0, z, batch):
            x = torch.from_numpy(image[start:start + batch]).float()[:, None].to(device)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, _ = net(x)
            pred = logits.float().argmax(dim=1, keepdim=True).float()
            pred = F.interpolate(pred, size=(h, w), mode="nearest")
            out[start:start + batch] = pred[:, 0].to("cpu", torch.uint8).numpy()
    finally:
        net.train(was_training)
    return out


def evaluate(net: UNet, volumes: Sequence[Volume], size: int, *, device="cpu",
             spacing_override: Optional[Sequence[float]] = None, amp_dtype=None,
             keep_predictions: bool = False) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Score every volume that has a dense label. Returns per-(case, class) rows (case, patient,
    class name, dice, hd95, status, voxel counts, spacing used) and, if asked, the predictions."""
    rows, preds = [], {}
    for v in volumes:
        if v.label is None:
            raise ValueError(f"{v.source or v.case_id}: no dense label to evaluate against")
        pred = predict_volume(net, v.image, size, device=device, amp_dtype=amp_dtype)
        spacing = spacing_override if spacing_override is not None else v.spacing
        for row in score_case(pred, v.label, v.num_classes, spacing):
            row.update(case=v.case_id, patient=v.patient, class_name=v.class_names[row["class"] - 1],
                       spacing="x".join(f"{s:.3g}" for s in spacing) if spacing is not None else "voxels")
            rows.append(row)
        if keep_predictions:
            preds[v.case_id] = pred
    return rows, preds


def mean_dice(rows: Sequence[dict]) -> float:
    """Mean over cases and foreground classes (the validation score used for model selection)."""
    return float(np.mean([r["dice"] for r in rows])) if rows else float("nan")
