"""Per-class Dice and HD95 on 3-D volumes, in mm with the voxel spacing, through MONAI.

Cases are scored honestly:

* prediction and ground truth both non-empty: Dice and HD95 (MONAI's
  ``compute_hausdorff_distance(percentile=95)``: the 95th percentile of the symmetric surface
  distances, with ``spacing``);
* empty prediction, non-empty ground truth: Dice 0 and HD95 undefined: counted as ``empty_pred``
  and left out of the HD95 mean (the official code scores it as HD95 = 0, the best possible);
* non-empty prediction, empty ground truth: Dice 0, HD95 undefined, counted as ``empty_gt``;
* both empty: Dice 1 (nothing to find, nothing found), HD95 undefined, counted as ``both_empty``.

The summary gives, per class, the mean Dice over every case and the mean HD95 over the cases where
it is defined, with the counts, so a reader sees how many cases each number rests on.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
import torch


def _hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    from monai.metrics import compute_hausdorff_distance

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    g = torch.from_numpy(gt[None, None].astype(np.float32))
    with warnings.catch_warnings():
        # MONAI 1.5 warns about an argument of its own internal call (get_mask_edges)
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(p, g, include_background=True, percentile=95,
                                           spacing=[float(s) for s in spacing])
    return float(value.reshape(-1)[0])


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
    spacing = tuple(spacing) if spacing is not None else (1.0,) * pred.ndim
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries for a {pred.ndim}-D volume")
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
