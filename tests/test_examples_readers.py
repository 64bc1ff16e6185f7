"""Readers of examples/scribseg on small generated files: WSL4MIS HDF5, ACDC NIfTI, CHAOS
DICOM + PNG, NIfTI pairs; every bad file gets an error naming it."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from examples_support import write_dicom_slice, write_h5, write_png

from scribseg import readers  # noqa: E402  (examples/ is on sys.path through examples_support)
from scribseg.chaos import read_chaos_folder, read_chaos_patient
from scribseg.volume import DataError


def _volume(shape=(3, 12, 10), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32)
    label = rng.integers(0, 4, shape).astype(np.uint8)
    scribble = np.full(shape, 4, np.uint8)
    scribble[:, 2, 2:6] = label[:, 2, 2:6]
    return image, label, scribble


def test_h5_roundtrip_and_patient_id(tmp_path):
    image, label, scribble = _volume()
    write_h5(tmp_path / "patient021_frame01.h5", image, label, scribble)
    write_h5(tmp_path / "patient021_frame13.h5", image, label, scribble)
    vols = readers.load_dataset(tmp_path)
    assert [v.case_id for v in vols] == ["patient021_frame01", "patient021_frame13"]
    assert {v.patient for v in vols} == {"patient021"}
    v = vols[0]
    np.testing.assert_array_equal(v.image, image)
    np.testing.assert_array_equal(v.label, label)
    np.testing.assert_array_equal(v.scribble, scribble)
    assert v.spacing is None and v.ignore_index == 4 and v.class_names == ("RV", "MYO", "LV")
    assert readers.read_h5_volume(tmp_path / "patient021_frame01.h5", spacing=(10, 1.5, 1.5)).spacing == (10, 1.5, 1.5)


def test_h5_training_slices_are_left_out(tmp_path):
    """WSL4MIS's data/ACDC holds the volumes and the same volumes cut into slice files: the slices
    are left out (each would otherwise be a patient of its own, in every split); a folder of slice
    files only is refused."""
    image, label, scribble = _volume()
    (tmp_path / "ACDC_training_volumes").mkdir()
    (tmp_path / "ACDC_training_slices").mkdir()
    write_h5(tmp_path / "ACDC_training_volumes" / "patient021_frame01.h5", image, label, scribble)
    for k in range(image.shape[0]):
        write_h5(tmp_path / "ACDC_training_slices" / f"patient021_frame01_slice_{k}.h5", image[k], label[k],
                 scribble[k])
    vols = readers.load_dataset(tmp_path)
    assert [v.case_id for v in vols] == ["patient021_frame01"] and vols[0].image.shape == image.shape
    with pytest.raises(DataError, match="single-slice files.*whole volumes"):
        readers.load_dataset(tmp_path / "ACDC_training_slices")
    # a volume named after its patient in another way still belongs to that patient
    write_h5(tmp_path / "patient022_frame01_cropped.h5", image, label, scribble)
    assert readers.read_h5_volume(tmp_path / "patient022_frame01_cropped.h5").patient == "patient022"


def test_h5_bad_files_are_named(tmp_path):
    bad = tmp_path / "patient001_frame01.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="patient001_frame01.h5"):
        readers.read_h5_volume(bad)
    with pytest.raises(DataError, match="missing.h5.*not found"):
        readers.read_h5_volume(tmp_path / "missing.h5")
    import h5py

    image, label, scribble = _volume()
    bad_label = label.copy()
    bad_label[0, 0, 0] = 7
    write_h5(tmp_path / "badlabel.h5", image, bad_label, scribble)
    with pytest.raises(DataError, match="badlabel.h5.*label values"):
        readers.read_h5_volume(tmp_path / "badlabel.h5")
    cases = {  # file name: (datasets written, or None for a group "image"; the error's words)
        "noimage": ({"label": np.zeros((2, 4, 4), np.uint8)}, "no 'image'"),
        "fractional": ({"image": image, "label": (label + 0.5).astype(np.float32)}, "label must hold integer"),
        "nan": ({"image": image, "label": np.where(label == 1, np.nan, label).astype(np.float32)},
                "label must hold integer"),
        "group": (None, "'image' is not a dataset"),
        "complex": ({"image": np.ones((2, 4, 4), np.complex64)}, "image must hold real numbers"),
        "empty": ({"image": np.zeros((0, 4, 4), np.float32)}, "image is empty"),
    }
    for name, (datasets, words) in cases.items():
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            if datasets is None:
                f.create_group("image")
            for key, data in (datasets or {}).items():
                f.create_dataset(key, data=data)
        with pytest.raises(DataError, match=f"{name}.h5.*{words}"):
            readers.read_h5_volume(tmp_path / f"{name}.h5")


def test_acdc_nifti_axes_spacing_and_scribbles(tmp_path):
    image, label, scribble = _volume((3, 12, 10))
    pdir = tmp_path / "patient007"
    pdir.mkdir()
    spacing = (10.0, 1.6, 1.4)
    raw = (image * 1000 + 50).astype(np.int16)
    readers.write_nifti(pdir / "patient007_frame01.nii.gz", raw, spacing, np.int16)
    readers.write_nifti(pdir / "patient007_frame01_gt.nii.gz", label, spacing, np.uint8)
    readers.write_nifti(pdir / "patient007_frame01_scribble.nii.gz", scribble, spacing, np.uint8)
    assert readers.detect_format(tmp_path) == "acdc-nifti"
    (v,) = readers.load_dataset(tmp_path)
    assert v.patient == "patient007" and v.image.shape == (3, 12, 10)
    assert v.spacing == pytest.approx(spacing)
    np.testing.assert_array_equal(v.label, label)
    np.testing.assert_array_equal(v.scribble, scribble)
    assert v.image.min() == 0.0 and v.image.max() == 1.0
    # the intensity order survives the normalisation (axes not scrambled)
    below = raw < np.percentile(raw, 99)
    assert np.corrcoef(v.image[below], raw[below])[0, 1] > 0.999
    # nibabel's on-disk order is (x, y, z)
    import nibabel as nib

    assert nib.load(str(pdir / "patient007_frame01.nii.gz")).shape == (10, 12, 3)


def test_acdc_nifti_errors_name_the_file(tmp_path):
    image, label, _ = _volume()
    readers.write_nifti(tmp_path / "patient001_frame01.nii.gz", image, (5, 1, 1))
    readers.write_nifti(tmp_path / "patient001_frame01_gt.nii.gz", label[:, :5], (5, 1, 1), np.uint8)
    with pytest.raises(DataError, match="patient001_frame01_gt.nii.gz.*shape"):
        readers.read_acdc_nifti_case(tmp_path / "patient001_frame01.nii.gz")
    readers.write_nifti(tmp_path / "patient001_frame01_gt.nii.gz", label, (5, 1, 1), np.uint8)
    with pytest.raises(DataError, match="_scribble.nii.gz: scribble file not found"):
        readers.read_acdc_nifti_case(tmp_path / "patient001_frame01.nii.gz", require_scribble=True)
    corrupt = tmp_path / "patient002_frame01.nii.gz"
    corrupt.write_bytes(gzip.compress(b"garbage" * 10))
    with pytest.raises(DataError, match="patient002_frame01.nii.gz: cannot read image"):
        readers.read_acdc_nifti_case(corrupt)
    with pytest.raises(DataError, match="nowhere.*not found"):
        readers.load_dataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no known layout"):
        readers.load_dataset(empty)


GREY = {0: 0, 1: 63, 2: 126, 3: 189, 4: 252}


def _chaos_patient(root, pid="2", n=3, grey=GREY, shuffle_names=True, geometry=True):
    rng = np.random.default_rng(1)
    in_dir = root / pid / "T1DUAL" / "DICOM_anon" / "InPhase"
    ground = root / pid / "T1DUAL" / "Ground"
    in_dir.mkdir(parents=True)
    ground.mkdir(parents=True)
    labels = rng.integers(0, 5, (n, 16, 20)).astype(np.uint8)
    pixels = rng.integers(0, 1000, (n, 16, 20))
    # slice k sits at z = 6 k mm; its file name sorts in the reverse order when shuffled
    for k in range(n):
        name = f"IMG-0004-{(n - k if shuffle_names else k + 1):05d}"
        write_dicom_slice(in_dir / f"{name}.dcm", pixels[k], z_mm=6.0 * k, instance=n - k if shuffle_names else k + 1,
                          geometry=geometry)
        write_png(ground / f"{name}.png", np.vectorize(grey.get)(labels[k]))
    return labels, pixels


def test_chaos_dicom_png(tmp_path):
    labels, pixels = _chaos_patient(tmp_path)
    assert readers.detect_format(tmp_path) == "chaos-dicom"
    (v,) = read_chaos_folder(tmp_path)
    assert v.patient == "2" and v.num_classes == 5 and v.ignore_index == 5
    assert v.class_names == ("liver", "right kidney", "left kidney", "spleen")
    assert v.spacing == pytest.approx((6.0, 1.5, 1.25))
    np.testing.assert_array_equal(v.label, labels)  # ordered by position, masks matched by file stem
    for k in range(3):  # slice k of the volume is the DICOM at z = 6 k mm, whatever its file name
        assert np.corrcoef(v.image[k].ravel(), pixels[k].ravel())[0, 1] > 0.95


def test_chaos_dicom_without_slice_geometry_takes_the_header_spacing(tmp_path):
    """Without ImagePositionPatient the slices are ordered by InstanceNumber, but their spacing is
    SliceThickness (6 mm here), not the instance numbers' step of 1."""
    labels, pixels = _chaos_patient(tmp_path, shuffle_names=False, geometry=False)
    (v,) = read_chaos_folder(tmp_path)
    assert v.spacing == pytest.approx((6.0, 1.5, 1.25))
    np.testing.assert_array_equal(v.label, labels)


def test_chaos_grey_level_ranges_and_errors(tmp_path):
    mask = np.array([[0, 55, 70, 110], [135, 175, 200, 240], [255, 63, 126, 189]])
    np.testing.assert_array_equal(readers.chaos_grey_to_labels(mask, "m"),
                                  [[0, 1, 1, 2], [2, 3, 3, 4], [4, 1, 2, 3]])
    with pytest.raises(DataError, match="bad.png.*grey levels \\[100\\]"):
        readers.chaos_grey_to_labels(np.array([[0, 100]]), "bad.png")
    _chaos_patient(tmp_path, pid="5", grey={0: 0, 1: 63, 2: 126, 3: 189, 4: 150})
    with pytest.raises(DataError, match="Ground.*IMG-0004-0000.*150"):
        read_chaos_patient(tmp_path / "5")
    (tmp_path / "5" / "T1DUAL" / "Ground" / "IMG-0004-00001.png").unlink()
    (tmp_path / "5" / "T1DUAL" / "Ground" / "extra.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="extra.png: cannot read PNG"):
        read_chaos_patient(tmp_path / "5")
    bad = tmp_path / "5" / "T1DUAL" / "DICOM_anon" / "InPhase" / "IMG-0004-00002.dcm"
    bad.write_bytes(b"nonsense")
    with pytest.raises(DataError, match="IMG-0004-00002.dcm: cannot read DICOM"):
        read_chaos_patient(tmp_path / "5")
    with pytest.raises(DataError, match="T2SPIR.*DICOM folder not found"):
        read_chaos_patient(tmp_path / "5", sequence="T2SPIR")


def test_nifti_pairs_with_chaos_grey_levels(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    rng = np.random.default_rng(2)
    lab = rng.integers(0, 5, (3, 8, 9)).astype(np.uint8)
    readers.write_nifti(tmp_path / "imagesTr" / "chaos01_0000.nii.gz", rng.random((3, 8, 9)) * 500, (7.7, 1.9, 1.9))
    readers.write_nifti(tmp_path / "labelsTr" / "chaos01.nii.gz", np.vectorize(GREY.get)(lab), (7.7, 1.9, 1.9),
                        np.uint8)
    assert readers.detect_format(tmp_path) == "nifti-pairs"
    (v,) = readers.load_dataset(tmp_path)
    np.testing.assert_array_equal(v.label, lab)
    assert v.spacing == pytest.approx((7.7, 1.9, 1.9)) and v.num_classes == 5
    readers.write_nifti(tmp_path / "imagesTr" / "chaos02_0000.nii.gz", rng.random((3, 8, 9)), (1, 1, 1))
    with pytest.raises(DataError, match="chaos02.nii.gz: label of chaos02_0000.nii.gz not found"):
        readers.load_dataset(tmp_path)
