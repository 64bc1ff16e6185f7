"""Shared helpers of the tests of examples/: put examples/ on sys.path (the package never imports
it) and build small data sets on disk."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

TINY_SHAPE = (4, 48, 48)          # (z, y, x) voxels of a test phantom volume
TINY_SPACING = (8.0, 3.0, 3.0)    # mm: a 144 mm field of view, as a real short-axis slice


def tiny_phantom(root: Path, patients: int = 5, seed: int = 0) -> Path:
    """A small phantom set in the ACDC NIfTI layout (ED + ES frames, scribbles)."""
    from scribseg.phantom import write_phantom_dataset

    write_phantom_dataset(root, patients=patients, seed=seed, shape=TINY_SHAPE, spacing=TINY_SPACING)
    return root


def write_h5(path: Path, image: np.ndarray, label: np.ndarray, scribble: np.ndarray) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        f.create_dataset("label", data=label.astype(np.uint8), compression="gzip")
        f.create_dataset("scribble", data=scribble.astype(np.uint16), compression="gzip")
    return path


def write_dicom_slice(path: Path, pixels: np.ndarray, *, z_mm: float, instance: int,
                      pixel_spacing=(1.5, 1.25), thickness: float = 6.0, geometry: bool = True) -> Path:
    """A minimal valid MR DICOM file (explicit VR little endian, 16-bit unsigned); ``geometry``
    False leaves out ImagePositionPatient and ImageOrientationPatient."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    if geometry:
        ds.ImagePositionPatient = [0.0, 0.0, float(z_mm)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)
    return path
