"""Readers for the WSL4MIS HDF5 form and for NIfTI (the ACDC release with Valvano's scribbles,
CHAOS conversions, the phantom), and :func:`load_dataset`, which recognises a folder's layout.

Every reader returns :class:`~scribseg.volume.Volume` objects with axes (z, y, x); a missing or
corrupt file raises :class:`~scribseg.volume.DataError` naming it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .volume import DataError, Volume, normalise_intensity

ACDC_CLASSES = ("RV", "MYO", "LV")
CHAOS_CLASSES = ("liver", "right kidney", "left kidney", "spleen")
# CHAOS PNG masks encode organs as grey levels; each organ accepts the released range.
CHAOS_GREY_LEVELS = ((1, 55, 70), (2, 110, 135), (3, 175, 200), (4, 240, 255))

_ACDC_H5_SLICE = re.compile(r"^(patient\d+)_frame(\d+)_slice_(\d+)\.h5$")  # WSL4MIS training slices
_PATIENT = re.compile(r"^(patient\d+)")  # patientNNN_frameMM.h5 and other names that start so
_ACDC_NII = re.compile(r"^(patient\d+)_frame(\d+)\.nii(\.gz)?$")


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    return path


# ---------------------------------------------------------------------------------------------
# WSL4MIS HDF5
def read_h5_volume(path, *, spacing: Optional[Sequence[float]] = None, num_classes: int = 4,
                   class_names: Sequence[str] = ACDC_CLASSES) -> Volume:
    """One WSL4MIS volume: datasets ``image`` (float, [0, 1]), ``label`` and ``scribble``
    (slices, rows, cols). The files store no spacing: pass ``spacing`` (z, y, x) in mm, or
    distances are in voxels."""
    import h5py

    path = _require(Path(path), "HDF5 volume")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (found {sorted(f.keys())}); expected the WSL4MIS "
                                "form with 'image', 'label' and 'scribble'")
            arrays = {}
            for name in ("image", "label", "scribble"):
                if name not in f:
                    continue
                if not isinstance(f[name], h5py.Dataset):
                    raise DataError(f"{path}: {name!r} is not a dataset (an HDF5 group?)")
                arrays[name] = np.asarray(f[name][()])
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot read HDF5 ({type(exc).__name__}: {exc})") from None
    if arrays["image"].dtype.kind not in "biuf":
        raise DataError(f"{path}: image must hold real numbers, got {arrays['image'].dtype}")
    image = arrays["image"].astype(np.float32)
    label, scribble = arrays.get("label"), arrays.get("scribble")
    if image.ndim == 2:  # a single-slice file of the WSL4MIS training-slice form
        image = image[None]
        label = None if label is None else label[None]
        scribble = None if scribble is None else scribble[None]
    if image.size and (image.min() < 0 or image.max() > 1):
        image = normalise_intensity(image)
    match = _PATIENT.match(path.name)
    case = path.stem
    patient = match.group(1) if match else case
    return Volume(case, patient, image, label, scribble, None if spacing is None else tuple(spacing), num_classes,
                  tuple(class_names), str(path))


def read_h5_folder(folder, *, spacing=None, limit: Optional[int] = None) -> list[Volume]:
    """Every ``*.h5`` volume under ``folder`` (the WSL4MIS ACDC volumes), sorted by name.

    WSL4MIS also ships each volume cut into single-slice files
    (``patientNNN_frameMM_slice_K.h5``, its training form). Those are left out: the pipeline splits
    by patient and scores whole volumes, and a folder holding both forms (WSL4MIS's ``data/ACDC``)
    would otherwise load every slice twice, each as a patient of its own. A folder with only
    slice files is refused."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.h5"))
    if not files:
        raise DataError(f"{folder}: no .h5 volumes found")
    volumes = [f for f in files if not _ACDC_H5_SLICE.match(f.name)]
    if not volumes:
        raise DataError(f"{folder}: only WSL4MIS single-slice files (patientNNN_frameMM_slice_K.h5, e.g. "
                        f"{files[0].name}); point --data at the whole volumes (WSL4MIS's ACDC_training_volumes)")
    return [read_h5_volume(f, spacing=spacing) for f in volumes[:limit]]


# ---------------------------------------------------------------------------------------------
# NIfTI
def read_nifti(path, *, what: str = "NIfTI file") -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3-D NIfTI as a (z, y, x) array and its voxel spacing (z, y, x) in mm from the header.

    nibabel returns the data with axes (x, y, z) (i, j, k of the affine); they are reversed to the
    (slices, rows, cols) order that SimpleITK and the WSL4MIS files use."""
    import nibabel as nib

    path = _require(Path(path), what)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise DataError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data, zooms = data[..., None], zooms[:2] + (1.0,)
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0])


def write_nifti(path, array: np.ndarray, spacing: Sequence[float], dtype=None) -> None:
    """Write a (z, y, x) array as NIfTI with voxel size ``spacing`` (z, y, x) in its header and a
    diagonal affine (the inverse of :func:`read_nifti`)."""
    import nibabel as nib

    data = np.asarray(array if dtype is None else array.astype(dtype)).transpose(2, 1, 0)
    affine = np.diag([float(spacing[2]), float(spacing[1]), float(spacing[0]), 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_zooms((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    nib.save(img, str(path))


def _integer_labels(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    rounded = np.rint(arr)
    if not np.array_equal(rounded, arr):
        raise DataError(f"{path}: {what} must hold integer labels, found non-integer values")
    return rounded.astype(np.int64)


def chaos_grey_to_labels(mask: np.ndarray, where: str) -> np.ndarray:
    """CHAOS grey levels (liver 63, right kidney 126, left kidney 189, spleen 252, each with its
    released tolerance range) -> 0..4. Any other non-zero value is an error naming ``where``."""
    out = np.zeros(mask.shape, dtype=np.uint8)
    known = mask == 0
    for cls, lo, hi in CHAOS_GREY_LEVELS:
        hit = (mask >= lo) & (mask <= hi)
        out[hit] = cls
        known |= hit
    if not known.all():
        bad = np.unique(mask[~known])[:8].tolist()
        raise DataError(f"{where}: grey levels {bad} match no CHAOS organ (liver 55-70, right kidney 110-135, "
                        "left kidney 175-200, spleen 240-255)")
    return out


def read_acdc_nifti_case(image_path, *, num_classes: int = 4, class_names=ACDC_CLASSES,
                         require_scribble: bool = False) -> Volume:
    """``patientNNN_frameMM.nii.gz`` with ``_gt`` and Valvano's ``_scribble`` beside it (either may
    be absent unless ``require_scribble``). Intensities are clipped at the 99th percentile and
    min-max scaled (spec §7); spacing comes from the image header."""
    image_path = Path(image_path)
    stem = re.sub(r"\.nii(\.gz)?$", "", image_path.name)
    ext = image_path.name[len(stem):]
    image, spacing = read_nifti(image_path, what="image")
    volumes = {}
    for suffix in ("gt", "scribble"):
        p = image_path.with_name(f"{stem}_{suffix}{ext}")
        if not p.exists() and suffix == "scribble" and require_scribble:
            raise DataError(f"{p}: scribble file not found (Valvano et al.'s _scribble file beside the image)")
        if p.exists():
            arr, sp = read_nifti(p, what=f"{suffix} file")
            if arr.shape != image.shape:
                raise DataError(f"{p}: shape {arr.shape} differs from the image {image_path.name} {image.shape}")
            volumes[suffix] = _integer_labels(arr, p, suffix)
    match = _ACDC_NII.match(image_path.name)
    patient = match.group(1) if match else stem
    return Volume(stem, patient, normalise_intensity(image), volumes.get("gt"), volumes.get("scribble"), spacing,
                  num_classes, tuple(class_names), str(image_path))


def find_acdc_nifti(folder) -> list[Path]:
    """Every ``patientNNN_frameMM.nii[.gz]`` image under ``folder`` (any depth), sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("patient*_frame*.nii*") if _ACDC_NII.match(p.name))


def read_acdc_nifti_folder(folder, *, limit: Optional[int] = None) -> list[Volume]:
    files = find_acdc_nifti(folder)
    if not files:
        raise DataError(f"{folder}: no patientNNN_frameMM.nii.gz images found")
    return [read_acdc_nifti_case(f) for f in files[:limit]]


def _nnunet_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    images, labels = folder / "imagesTr", folder / "labelsTr"
    pairs = []
    for img in sorted(images.glob("*.nii*")):
        case = re.sub(r"(_0000)?\.nii(\.gz)?$", "", img.name)
        lab = labels / (case + (".nii.gz" if img.name.endswith(".gz") else ".nii"))
        pairs.append((case, img, _require(lab, f"label of {img.name}")))
    return pairs


def _suffix_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    pairs = []
    for img in sorted(folder.rglob("*_image.nii*")):
        case = re.sub(r"_image\.nii(\.gz)?$", "", img.name)
        lab = img.with_name(img.name.replace("_image.", "_label."))
        pairs.append((case, img, _require(lab, f"label of {img.name}")))
    return pairs


def read_nifti_pairs(folder, *, num_classes: int = 5, class_names=CHAOS_CLASSES,
                     patient_pattern: str = r"^(.*?)(?:_(?:t1|t2|T1|T2|in|out).*)?$") -> list[Volume]:
    """Image/label NIfTI pairs, as CHAOS conversions ship them: either nnU-Net style
    (``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz``) or ``<case>_image.nii.gz`` +
    ``<case>_label.nii.gz``. Labels may be 0..C-1 or the CHAOS grey levels (63/126/189/252)."""
    folder = Path(folder)
    pairs = _nnunet_pairs(folder) if (folder / "imagesTr").is_dir() else _suffix_pairs(folder)
    if not pairs:
        raise DataError(f"{folder}: no NIfTI image/label pairs (imagesTr/labelsTr or *_image/*_label) found")
    volumes = []
    for case, img_path, lab_path in pairs:
        image, spacing = read_nifti(img_path, what="image")
        label, _ = read_nifti(lab_path, what="label")
        if label.shape != image.shape:
            raise DataError(f"{lab_path}: shape {label.shape} differs from the image {img_path.name} {image.shape}")
        label = _integer_labels(label, lab_path, "label")
        if label.max(initial=0) >= num_classes:
            label = chaos_grey_to_labels(label, str(lab_path))
        patient = re.match(patient_pattern, case).group(1) or case
        volumes.append(Volume(case, patient, normalise_intensity(image), label, None, spacing, num_classes,
                              tuple(class_names), str(img_path)))
    return volumes


# ---------------------------------------------------------------------------------------------
def detect_format(folder) -> str:
    """"h5", "acdc-nifti", "chaos-dicom" or "nifti-pairs", from what the folder holds."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: data folder not found")
    if folder.is_file():
        raise DataError(f"{folder}: expected a folder of volumes, got a file")
    if next(folder.rglob("*.h5"), None) is not None:
        return "h5"
    if find_acdc_nifti(folder):
        return "acdc-nifti"
    if next(folder.rglob("T1DUAL"), None) is not None or next(folder.rglob("T2SPIR"), None) is not None:
        return "chaos-dicom"
    if (folder / "imagesTr").is_dir() or next(folder.rglob("*_image.nii*"), None) is not None:
        return "nifti-pairs"
    raise DataError(f"{folder}: no known layout (WSL4MIS *.h5, ACDC patientNNN_frameMM.nii.gz, CHAOS T1DUAL/T2SPIR "
                    "DICOM, NIfTI imagesTr/labelsTr or *_image/*_label pairs)")


def load_dataset(folder, *, fmt: str = "auto", spacing=None, limit: Optional[int] = None,
                 chaos_sequence: str = "T1DUAL-in") -> list[Volume]:
    """All volumes of ``folder`` in the given (or detected) format."""
    fmt = detect_format(folder) if fmt == "auto" else fmt
    if fmt == "h5":
        return read_h5_folder(folder, spacing=spacing, limit=limit)
    if fmt == "acdc-nifti":
        return read_acdc_nifti_folder(folder, limit=limit)
    if fmt == "chaos-dicom":
        from .chaos import read_chaos_folder

        return read_chaos_folder(folder, sequence=chaos_sequence, limit=limit)
    if fmt == "nifti-pairs":
        return read_nifti_pairs(folder)[:limit]
    raise ValueError(f"unknown data format {fmt!r}; expected auto, h5, acdc-nifti, chaos-dicom or nifti-pairs")


def env_data_root() -> Optional[str]:
    """``ATTENSCRIBBLE_DATA`` if set (a default data folder for the example scripts)."""
    return os.environ.get("ATTENSCRIBBLE_DATA") or None
