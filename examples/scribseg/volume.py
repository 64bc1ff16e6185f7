"""The in-memory form every reader produces, and the intensity preprocessing of spec §7."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np


class DataError(ValueError):
    """A missing, corrupt or inconsistent data file; the message names the file."""


@dataclasses.dataclass
class Volume:
    """One 3-D case, axes (slices, rows, cols) = (z, y, x).

    Attributes:
        case_id: unique name of the volume (e.g. ``patient021_frame01``).
        patient: patient identifier; splits are made on it, never on cases or slices.
        image: float32 (Z, H, W), intensities in [0, 1].
        label: uint8 (Z, H, W) dense ground truth (0 = background), or None.
        scribble: uint8 (Z, H, W) scribbles, ``ignore_index`` where not annotated, or None.
        spacing: voxel size (z, y, x) in mm, or None when the source does not store it.
        num_classes: classes including background.
        class_names: names of the foreground classes 1..num_classes-1.
        source: the file or folder it was read from (for error messages and reports).
    """

    case_id: str
    patient: str
    image: np.ndarray
    label: Optional[np.ndarray]
    scribble: Optional[np.ndarray]
    spacing: Optional[tuple[float, float, float]]
    num_classes: int
    class_names: tuple[str, ...]
    source: str = ""

    @property
    def ignore_index(self) -> int:
        """The "not annotated" value of a scribble map: the number of classes (ACDC: 4)."""
        return self.num_classes

    def __post_init__(self) -> None:
        where = self.source or self.case_id
        if self.image.ndim != 3:
            raise DataError(f"{where}: image must be 3-D (slices, rows, cols), got shape {self.image.shape}")
        if self.image.size == 0:
            raise DataError(f"{where}: image is empty, shape {self.image.shape}")
        if not np.all(np.isfinite(self.image)):
            raise DataError(f"{where}: image contains NaN or infinite values")
        for name in ("label", "scribble"):
            arr = getattr(self, name)
            if arr is None:
                continue
            if arr.shape != self.image.shape:
                raise DataError(f"{where}: {name} has shape {arr.shape} but the image has {self.image.shape}")
            if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and not np.array_equal(np.rint(arr), arr)):
                raise DataError(f"{where}: {name} must hold integer labels, found "
                                f"{'non-integer or non-finite values' if arr.dtype.kind == 'f' else arr.dtype}")
            top = self.num_classes - 1 if name == "label" else self.num_classes
            if arr.size and (arr.min() < 0 or arr.max() > top):
                raise DataError(f"{where}: {name} values must lie in [0, {top}] ({self.num_classes} classes"
                                f"{', ' + str(self.ignore_index) + ' = not annotated' if name == 'scribble' else ''})"
                                f", found {sorted(np.unique(arr).tolist())[:12]}")
        if len(self.class_names) != self.num_classes - 1:
            raise DataError(f"{where}: {len(self.class_names)} class names for {self.num_classes - 1} foreground classes")
        if self.spacing is not None:
            spacing = tuple(float(s) for s in self.spacing)
            if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
                raise DataError(f"{where}: voxel spacing must be three positive numbers (z, y, x), got {self.spacing}")
            self.spacing = spacing
        self.image = self.image.astype(np.float32, copy=False)
        if self.label is not None:
            self.label = self.label.astype(np.uint8, copy=False)
        if self.scribble is not None:
            self.scribble = self.scribble.astype(np.uint8, copy=False)


def normalise_intensity(image: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Clip at the ``percentile``-th percentile of the volume, then min-max to [0, 1] (spec §7).

    A constant volume becomes all zeros."""
    image = np.asarray(image, dtype=np.float32)
    top = np.percentile(image, percentile)
    image = np.minimum(image, top)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros_like(image)
    return ((image - low) / (high - low)).astype(np.float32)


def parse_spacing(text: Optional[str]) -> Optional[tuple[float, float, float]]:
    """``"10,1.5,1.5"`` -> (10.0, 1.5, 1.5) (z, y, x in mm); None/"" -> None."""
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--spacing must be three comma-separated numbers z,y,x in mm, got {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--spacing must be three positive numbers z,y,x in mm, got {text!r}")
    return values


def describe(volumes: Sequence[Volume]) -> str:
    """One line: how many volumes/patients/slices, and whether scribbles and spacing are present."""
    patients = {v.patient for v in volumes}
    slices = sum(v.image.shape[0] for v in volumes)
    with_scr = sum(v.scribble is not None for v in volumes)
    with_sp = sum(v.spacing is not None for v in volumes)
    return (f"{len(volumes)} volumes, {len(patients)} patients, {slices} slices; scribbles in {with_scr}, "
            f"voxel spacing in {with_sp}")
