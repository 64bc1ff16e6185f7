"""CHAOS MR as released: per patient, ``T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm`` and
``T1DUAL/Ground/*.png``, ``T2SPIR/DICOM_anon/*.dcm`` and ``T2SPIR/Ground/*.png``.

Slices are read with pydicom, ordered along the slice normal (ImagePositionPatient projected on
the normal of ImageOrientationPatient; InstanceNumber when positions are missing). A mask PNG is
matched to its DICOM by file stem when the release names them alike, otherwise by order (masks
sorted by name, DICOMs by InstanceNumber), and the counts must agree. Grey levels map to
liver 1, right kidney 2, left kidney 3, spleen 4; the masks are taken in the DICOM pixel grid
(rows, cols) as released.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from .readers import CHAOS_CLASSES, chaos_grey_to_labels
from .volume import DataError, Volume, normalise_intensity

SEQUENCES = {
    "T1DUAL-in": ("T1DUAL", ("DICOM_anon", "InPhase")),
    "T1DUAL-out": ("T1DUAL", ("DICOM_anon", "OutPhase")),
    "T2SPIR": ("T2SPIR", ("DICOM_anon",)),
}


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _read_dicom(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array.astype(np.float32)
    except (InvalidDicomError, OSError, AttributeError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: cannot read DICOM slice ({type(exc).__name__}: {exc})") from None
    if pixels.ndim != 2:
        raise DataError(f"{path}: expected one 2-D slice per DICOM file, got pixel array of shape {pixels.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return ds, pixels * slope + intercept


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "I", "I;16", "P"):
                img = img.convert("L")
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read PNG mask ({type(exc).__name__}: {exc})") from None
    return arr.astype(np.int64)


def _has_geometry(ds) -> bool:
    """Whether the slice's header places it in space (ImagePositionPatient and
    ImageOrientationPatient)."""
    pos, ori = getattr(ds, "ImagePositionPatient", None), getattr(ds, "ImageOrientationPatient", None)
    return pos is not None and ori is not None and len(pos) == 3 and len(ori) == 6


def _slice_position(ds, fallback: int) -> float:
    """Position along the slice normal in mm, or, without geometry, the InstanceNumber (an order,
    not a distance)."""
    pos, ori = getattr(ds, "ImagePositionPatient", None), getattr(ds, "ImageOrientationPatient", None)
    if _has_geometry(ds):
        normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
        return float(np.dot(normal, np.asarray(pos, float)))
    return float(getattr(ds, "InstanceNumber", fallback))


def _z_spacing(datasets, positions: list[float], where: Path) -> float:
    if len(positions) > 1:
        steps = np.diff(positions)
        if np.all(steps > 0):
            return float(np.median(steps))
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        value = getattr(datasets[0], tag, None)
        if value:
            return float(value)
    raise DataError(f"{where}: cannot determine the slice spacing (no distinct ImagePositionPatient, "
                    "SpacingBetweenSlices or SliceThickness)")


def read_chaos_patient(patient_dir, sequence: str = "T1DUAL-in", *, require_masks: bool = True) -> Volume:
    """One CHAOS MR patient folder as a Volume (z, y, x) with spacing from the DICOM headers."""
    patient_dir = Path(patient_dir)
    if sequence not in SEQUENCES:
        raise ValueError(f"sequence must be one of {sorted(SEQUENCES)}, got {sequence!r}")
    top, sub = SEQUENCES[sequence]
    dicom_dir = patient_dir.joinpath(top, *sub)
    if not dicom_dir.is_dir():
        raise DataError(f"{dicom_dir}: DICOM folder not found (CHAOS layout {top}/{'/'.join(sub)})")
    files = sorted((p for p in dicom_dir.iterdir() if p.is_file() and not p.name.startswith(".")), key=_natural_key)
    if not files:
        raise DataError(f"{dicom_dir}: no DICOM files")
    slices = [(p,) + _read_dicom(p) for p in files]
    shapes = {s[2].shape for s in slices}
    if len(shapes) != 1:
        raise DataError(f"{dicom_dir}: slices have different sizes {sorted(shapes)}")

    ground = patient_dir / top / "Ground"
    masks: Optional[dict[Path, np.ndarray]] = None
    if ground.is_dir():
        pngs = sorted(ground.glob("*.png"), key=_natural_key)
        by_stem = {p.stem: p for p in pngs}
        if all(p.stem in by_stem for p, _, _ in slices):
            masks = {p: _read_png(by_stem[p.stem]) for p, _, _ in slices}
        else:
            if len(pngs) != len(slices):
                raise DataError(f"{ground}: {len(pngs)} mask PNGs for {len(slices)} DICOM slices in {dicom_dir}")
            by_instance = sorted(slices, key=lambda s: float(getattr(s[1], "InstanceNumber", 0) or 0))
            masks = {s[0]: _read_png(png) for s, png in zip(by_instance, pngs)}
        for (p, _, pix), (m_path, m) in zip(slices, ((p, masks[p]) for p, _, _ in slices)):
            if m.shape != pix.shape:
                raise DataError(f"{ground}: mask for {p.name} has shape {m.shape}, the DICOM slice {pix.shape}")
    elif require_masks:
        raise DataError(f"{ground}: Ground folder with the PNG masks not found")

    order = sorted(range(len(slices)), key=lambda i: _slice_position(slices[i][1], i))
    slices = [slices[i] for i in order]
    positions = [_slice_position(s[1], i) for i, s in enumerate(slices)]
    image = np.stack([s[2] for s in slices])
    label = None
    if masks is not None:
        label = np.stack([chaos_grey_to_labels(masks[s[0]], f"{ground} (mask of {s[0].name})") for s in slices])
    first = slices[0][1]
    pixel_spacing = getattr(first, "PixelSpacing", None)
    if pixel_spacing is None or len(pixel_spacing) != 2:
        raise DataError(f"{slices[0][0]}: no PixelSpacing in the DICOM header")
    geometric = all(_has_geometry(s[1]) for s in slices)  # else positions are instance numbers, not mm
    spacing = (_z_spacing([s[1] for s in slices], positions if geometric else [], dicom_dir), float(pixel_spacing[0]),
               float(pixel_spacing[1]))
    name = f"chaos{patient_dir.name}_{sequence}"
    return Volume(name, patient_dir.name, normalise_intensity(image), label, None, spacing, 5, CHAOS_CLASSES,
                  str(patient_dir))


def find_chaos_patients(folder, sequence: str = "T1DUAL-in") -> list[Path]:
    """Patient folders (those holding the sequence's top folder) under ``folder``, sorted."""
    top = SEQUENCES[sequence][0]
    found = sorted({p.parent for p in Path(folder).rglob(top) if p.is_dir()}, key=_natural_key)
    return found


def read_chaos_folder(folder, sequence: str = "T1DUAL-in", limit: Optional[int] = None) -> list[Volume]:
    """Every CHAOS MR patient under ``folder`` (e.g. ``CHAOS_Train_Sets/Train_Sets/MR``)."""
    patients = find_chaos_patients(folder, sequence)
    if not patients:
        raise DataError(f"{folder}: no CHAOS patient folders with {SEQUENCES[sequence][0]}/ found")
    return [read_chaos_patient(p, sequence) for p in patients[:limit]]
