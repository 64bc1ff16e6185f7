"""Evaluation: slice-wise inference, then per-class Dice and HD95 on the 3-D volumes, in mm with
the voxel spacing.

HD95 is the 95th percentile of the symmetric surface distances, as MedPy's ``hd95`` computes it
and the scribble-supervision papers report it (WSL4MIS, AttenScribble): the surface of a mask is
its voxels with a face-neighbour outside it (the volume's edge counts as outside); the distances
from every surface voxel of the prediction to the ground truth's surface and from every surface
voxel of the ground truth to the prediction's are pooled, and their 95th percentile taken
(linear interpolation). MONAI's ``compute_hausdorff_distance(percentile=95)`` instead takes the
larger of the two one-way 95th percentiles: never smaller, and larger when one side has
outliers (a false-positive blob far from the structure), so its values are not comparable with
published ones. :func:`directed_surface_distances` gives both one-way sets for either convention.

Cases are scored honestly:

* prediction and ground truth both non-empty: Dice (MONAI's ``compute_dice``) and HD95 with
  ``spacing``;
* empty prediction, non-empty ground truth: Dice 0 and HD95 undefined: counted as ``empty_pred``
  and left out of the HD95 mean (the official code scores it as HD95 = 0, the best possible);
* non-empty prediction, empty ground truth: Dice 0, HD95 undefined, counted as ``empty_gt``;
* both empty: Dice 1 (nothing to find, nothing found), HD95 undefined, counted as ``both_empty``.

The summary gives, per class, the mean Dice over every case and the mean HD95 over the cases where
it is defined, with the counts, so a reader sees how many cases each number rests on.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .model import UNet
from .volume import Volume


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    face = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=face, border_value=0)


def directed_surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Distances (in the units of ``spacing``) from each surface voxel of ``pred`` to the nearest
    surface voxel of ``gt``, and from each surface voxel of ``gt`` to the nearest of ``pred``.

    ``pred``, ``gt``: boolean masks of one shape, both non-empty. The Euclidean distance
    transforms run on the two masks' joint bounding box grown by one voxel, which holds every
    surface voxel and gives the same surfaces as the whole volume."""
    from scipy import ndimage

    if not pred.any() or not gt.any():
        raise ValueError("surface distances need a non-empty prediction and ground truth")
    both = pred | gt
    box = []
    for axis in range(both.ndim):
        hit = np.flatnonzero(both.any(axis=tuple(a for a in range(both.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, both.shape[axis])))
    box = tuple(box)
    # the crop keeps the volume's edge where a mask touches it: erosion treats both as outside
    sp, sg = _surface(pred[box]), _surface(gt[box])
    sampling = [float(s) for s in spacing]
    to_gt = ndimage.distance_transform_edt(~sg, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=sampling)
    return to_gt[sp], to_pred[sg]


def _hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    a, b = directed_surface_distances(pred, gt, spacing)
    return float(np.percentile(np.concatenate([a, b]), 95))


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    from monai.metrics import compute_dice

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    g = torch.from_numpy(gt[None, None].astype(np.float32))
    return float(compute_dice(p, g, include_background=True, ignore_empty=False).reshape(-1)[0])


def score_case(pred: np.ndarray, gt: np.ndarray, num_classes: int,
               spacing: Optional[Sequence[float]]) -> list[dict]:
    """One row per foreground class: dice, hd95 (NaN when undefined), status and voxel counts.

    ``pred``/``gt``: integer (Z, H, W) maps; ``spacing``: (z, y, x) in mm, None for voxel units."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the ground truth's {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"pred and gt must be 2-D or 3-D label maps, got {pred.ndim} dimensions")
    if spacing is not None and not isinstance(spacing, (tuple, list, np.ndarray)):
        raise TypeError(f"spacing must be a sequence of {pred.ndim} voxel sizes or None, got {spacing!r}")
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * pred.ndim
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries for a {pred.ndim}-D volume")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must hold finite voxel sizes > 0, got {spacing}")
    rows = []
    for cls in range(1, num_classes):
        p, g = pred == cls, gt == cls
        np_, ng = int(p.sum()), int(g.sum())
        if np_ and ng:
            status, dice, hd = "ok", _dice(p, g), _hd95(p, g, spacing)
        elif ng:
            status, dice, hd = "empty_pred", 0.0, math.nan
        elif np_:
            status, dice, hd = "empty_gt", 0.0, math.nan
        else:
            status, dice, hd = "both_empty", 1.0, math.nan
        rows.append({"class": cls, "dice": dice, "hd95": hd, "status": status, "pred_voxels": np_, "gt_voxels": ng})
    return rows


def summarise(rows: Sequence[dict], class_names: Sequence[str]) -> list[dict]:
    """Per class: mean/std Dice over all cases, mean/std HD95 over cases where it is defined, counts."""
    out = []
    for cls, name in enumerate(class_names, start=1):
        sel = [r for r in rows if r["class"] == cls]
        dice = np.array([r["dice"] for r in sel], dtype=float)
        hd = np.array([r["hd95"] for r in sel if not math.isnan(r["hd95"])], dtype=float)
        out.append({
            "class": name, "cases": len(sel),
            "dice_mean": float(dice.mean()) if len(dice) else math.nan,
            "dice_std": float(dice.std()) if len(dice) else math.nan,
            "hd95_mean": float(hd.mean()) if len(hd) else math.nan,
            "hd95_std": float(hd.std()) if len(hd) else math.nan,
            "hd95_cases": int(len(hd)),
            "empty_pred": sum(r["status"] == "empty_pred" for r in sel),
            "empty_gt": sum(r["status"] == "empty_gt" for r in sel),
            "both_empty": sum(r["status"] == "both_empty" for r in sel),
        })
    if out:
        out.append({"class": "mean", "cases": out[0]["cases"],
                    "dice_mean": float(np.nanmean([o["dice_mean"] for o in out])),
                    "dice_std": math.nan,
                    "hd95_mean": float(np.nanmean([o["hd95_mean"] for o in out]))
                    if any(not math.isnan(o["hd95_mean"]) for o in out) else math.nan,
                    "hd95_std": math.nan, "hd95_cases": sum(o["hd95_cases"] for o in out),
                    "empty_pred": sum(o["empty_pred"] for o in out), "empty_gt": sum(o["empty_gt"] for o in out),
                    "both_empty": sum(o["both_empty"] for o in out)})
    return out


def format_table(summary: Sequence[dict], unit: str = "mm", title: Optional[str] = None) -> str:
    """A fixed-width text table of :func:`summarise`'s output."""
    lines = [title] if title else []
    lines.append(f"{'class':<14}{'Dice':>16}{'HD95 (' + unit + ')':>20}{'HD95 n':>8}{'empty pred':>12}")
    for s in summary:
        dice = f"{s['dice_mean']:.3f}" + ("" if math.isnan(s["dice_std"]) else f" ± {s['dice_std']:.3f}")
        hd = "n/a" if math.isnan(s["hd95_mean"]) else (
            f"{s['hd95_mean']:.2f}" + ("" if math.isnan(s["hd95_std"]) else f" ± {s['hd95_std']:.2f}"))
        lines.append(f"{s['class']:<14}{dice:>16}{hd:>20}{s['hd95_cases']:>8}{s['empty_pred']:>12}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Slice-wise inference (spec §7): each slice is resized to ``size`` x ``size`` by bilinear
# interpolation (align_corners=False: pixel centres at half-integers), segmented (argmax), the label
# map resized back by nearest neighbour on the same grid ("nearest-exact"; torch's "nearest"
# samples without the half-pixel offset and shifts the map by up to a pixel), and the slices
# stacked to 3-D.
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
            pred = F.interpolate(pred, size=(h, w), mode="nearest-exact")
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
