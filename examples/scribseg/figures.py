"""PNG figures: training curves, validation curve, and image / scribble / prediction / ground
truth overlays. Headless (matplotlib's Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# one colour per class value; the last entry stays transparent ("not annotated")
_COLOURS = np.array([[0.0, 0.0, 0.0, 0.0], [0.12, 0.47, 0.71, 0.75], [1.0, 0.5, 0.05, 0.75],
                     [0.17, 0.63, 0.17, 0.75], [0.84, 0.15, 0.16, 0.75], [0.58, 0.4, 0.74, 0.75]])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _overlay(labels: np.ndarray, skip: Sequence[int], background_visible: bool = False) -> np.ndarray:
    rgba = np.zeros(labels.shape + (4,))
    for value in np.unique(labels):
        if value in skip:
            continue
        colour = _COLOURS[int(value) % len(_COLOURS)].copy()
        if value == 0 and background_visible:
            colour = np.array([1.0, 1.0, 0.2, 0.9])
        rgba[labels == value] = colour
    return rgba


def plot_curves(history: dict, path, title: str = "") -> Path:
    """Training loss terms (smoothed) and validation mean Dice against the iteration."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    it = np.array([h["iteration"] for h in history["train"]])
    for key in ("loss", "ce", "crf", "asl"):
        vals = np.array([h.get(key, np.nan) for h in history["train"]], dtype=float)
        if np.all(np.isnan(vals)):
            continue
        k = max(1, len(vals) // 50)
        smooth = np.convolve(np.nan_to_num(vals), np.ones(k) / k, mode="valid")
        ax1.plot(it[k - 1:], smooth, label=key)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss (moving average)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("training loss")
    if history.get("val"):
        vi = [v["iteration"] for v in history["val"]]
        ax2.plot(vi, [v["mean_dice"] for v in history["val"]], "o-", label="mean")
        for name in history["val"][0].get("per_class", {}):
            ax2.plot(vi, [v["per_class"][name] for v in history["val"]], ".--", label=name)
        ax2.legend()
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("validation Dice (3-D)")
    ax2.set_title("validation (model selection only)")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_cases(volumes, predictions: dict, path, *, max_cases: int = 4, title: str = "") -> Path:
    """One row per case (its middle labelled slice): image, scribble, prediction, ground truth."""
    plt = _plt()
    cases = [v for v in volumes if v.case_id in predictions][:max_cases]
    fig, axes = plt.subplots(len(cases), 4, figsize=(12, 3 * len(cases)), squeeze=False)
    for row, v in zip(axes, cases):
        zs = [z for z in range(v.image.shape[0]) if v.label is not None and v.label[z].any()]
        z = zs[len(zs) // 2] if zs else v.image.shape[0] // 2
        panels = [("image", None, ()), ("scribble", v.scribble, (v.ignore_index,)),
                  ("prediction", predictions[v.case_id], (0,)), ("ground truth", v.label, (0,))]
        for ax, (name, lab, skip) in zip(row, panels):
            ax.imshow(v.image[z], cmap="gray", interpolation="nearest")
            if lab is not None:
                ax.imshow(_overlay(lab[z], skip, background_visible=name == "scribble"), interpolation="nearest")
            ax.set_title(f"{v.case_id} z={z}: {name}" if name == "image" else name, fontsize=8)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
