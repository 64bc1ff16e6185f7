"""Training slices and the augmentation of spec §6.

Training uses the slices that carry any scribble. Each batch is drawn by a generator seeded with
(seed, iteration, rank): a run resumed from a checkpoint, or repeated with the same seed, sees
exactly the same batches, and every DDP rank sees different ones.

Augmentation (as the official code): with p 0.5 a random rot90 and a random flip; else with p 0.5 a
rotation by an angle in [-20, 20] degrees (nearest neighbour, no reshape; the scribble's new
corners are "not annotated", the label's background); then a nearest-neighbour resize to
``size`` x ``size``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from .volume import Volume


def resize_nearest(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W) -> (size, size) by nearest-neighbour zoom (scipy order 0, as the official code)."""
    h, w = arr.shape
    if (h, w) == (size, size):
        return arr
    return ndimage.zoom(arr, (size / h, size / w), order=0)


def augment(image: np.ndarray, label: np.ndarray, scribble: np.ndarray, rng: np.random.Generator,
            ignore_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official random rot90/flip or small rotation, identical for the three maps."""
    if rng.random() > 0.5:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 2))
        image, label, scribble = (np.flip(np.rot90(a, k), axis=axis).copy() for a in (image, label, scribble))
    elif rng.random() > 0.5:
        angle = float(rng.uniform(-20, 20))
        image = ndimage.rotate(image, angle, order=0, reshape=False)
        label = ndimage.rotate(label, angle, order=0, reshape=False, cval=0)
        scribble = ndimage.rotate(scribble, angle, order=0, reshape=False, cval=ignore_index)
    return image, label, scribble


class SliceSampler:
    """Random batches of augmented 2-D slices from a list of volumes.

    Args:
        volumes: training volumes (each with scribbles; dense labels optional).
        size: in-plane training size (official 256).
        dense: train on the dense labels instead of the scribbles (the full-supervision bound).
        augment: apply the spec §6 augmentation.
    """

    def __init__(self, volumes: Sequence[Volume], size: int, *, dense: bool = False, augment: bool = True):
        if not volumes:
            raise ValueError("no training volumes")
        self.volumes = list(volumes)
        self.size, self.dense, self.augment = int(size), dense, augment
        self.num_classes = self.volumes[0].num_classes
        self.ignore_index = self.volumes[0].ignore_index
        for v in self.volumes:
            if v.num_classes != self.num_classes:
                raise ValueError(f"{v.case_id} has {v.num_classes} classes, {self.volumes[0].case_id} has "
                                 f"{self.num_classes}: one data set per run")
            if v.scribble is None and not dense:
                raise ValueError(f"{v.case_id} has no scribbles (synthesise them with scribseg.scribbles)")
            if dense and v.label is None:
                raise ValueError(f"{v.case_id} has no dense label for full supervision")
        self.index = [(i, z) for i, v in enumerate(self.volumes) for z in range(v.image.shape[0])
                      if v.scribble is not None and (v.scribble[z] != self.ignore_index).any()]
        if not self.index:
            raise ValueError("no training slice carries a scribble")

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """A batch: image (B, 1, S, S) float32, target (B, S, S) int64 (scribble or dense label),
        scribble (B, S, S) int64, gate_label / gate_scribble (B,) float32: 1 where the slice's
        dense label / scribble holds more than one class."""
        picks = rng.integers(0, len(self.index), size=batch_size)
        images, labels, scribbles = [], [], []
        for p in picks:
            vi, z = self.index[p]
            v = self.volumes[vi]
            img = v.image[z]
            lab = v.label[z] if v.label is not None else np.zeros(img.shape, np.uint8)
            scr = v.scribble[z] if v.scribble is not None else np.full(img.shape, self.ignore_index, np.uint8)
            if self.augment:
                img, lab, scr = augment(img, lab, scr, rng, self.ignore_index)
            images.append(resize_nearest(img, self.size))
            labels.append(resize_nearest(lab, self.size))
            scribbles.append(resize_nearest(scr, self.size))
        image = torch.from_numpy(np.stack(images)[:, None].astype(np.float32))
        label = torch.from_numpy(np.stack(labels).astype(np.int64))
        scribble = torch.from_numpy(np.stack(scribbles).astype(np.int64))
        gate_label = torch.tensor([float(len(np.unique(lab)) > 1) for lab in labels])
        gate_scribble = torch.tensor([float(len(np.unique(s[s != self.ignore_index])) > 1) for s in scribbles])
        return {"image": image, "target": label if self.dense else scribble, "scribble": scribble,
                "label": label, "gate_label": gate_label, "gate_scribble": gate_scribble}


def batch_rng(seed: int, iteration: int, rank: int = 0, extra: Optional[int] = None) -> np.random.Generator:
    """The generator of one (iteration, rank) batch: a pure function of its arguments."""
    key = [int(seed), int(iteration), int(rank)] + ([] if extra is None else [int(extra)])
    return np.random.default_rng(key)
