"""The synthetic cardiac phantom, the scribble synthesiser and the patient splits of examples/."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from examples_support import TINY_SHAPE, TINY_SPACING, tiny_phantom

from scribseg.phantom import phantom_case, random_anatomy
from scribseg.readers import load_dataset
from scribseg.scribbles import ensure_scribbles, synthesise_scribbles
from scribseg.splits import check_split, load_split, partition, split_patients
from scribseg.volume import DataError, normalise_intensity


def test_phantom_anatomy_and_frames():
    rng = np.random.default_rng(3)
    anatomy = random_anatomy(rng)
    img_ed, lab_ed, sp = phantom_case(rng, frame="ED", anatomy=anatomy)
    img_es, lab_es, sp_es = phantom_case(rng, frame="ES", anatomy=anatomy)
    assert img_ed.dtype == np.int16 and lab_ed.dtype == np.uint8 and img_ed.shape == lab_ed.shape == anatomy["shape"]
    assert sp == sp_es and sp[0] >= 6.5 and 1.3 < sp[1] == sp[2] < 1.8   # anisotropic, mm
    assert set(np.unique(lab_ed)) == {0, 1, 2, 3}
    # the LV cavity is smaller at end-systole, the myocardium thicker
    assert (lab_es == 3).sum() < (lab_ed == 3).sum()
    assert (lab_es == 2).sum() > (lab_ed == 2).sum()
    # myocardium surrounds the LV: the LV touches no background in the slices where both exist
    for z in range(lab_ed.shape[0]):
        lv = lab_ed[z] == 3
        if lv.any():
            ring = ndimage.binary_dilation(lv) & ~lv
            assert not (lab_ed[z][ring] == 0).any()
    # blood is brighter than myocardium on average, as in cine MR
    norm = normalise_intensity(img_ed)
    assert norm[lab_ed == 3].mean() > norm[lab_ed == 2].mean() + 0.2
    # the RV ends before the apex
    assert (lab_ed[-1] == 1).sum() == 0


def test_phantom_is_deterministic_and_writes_acdc_layout(tmp_path):
    a = tiny_phantom(tmp_path / "a", patients=3, seed=5)
    b = tiny_phantom(tmp_path / "b", patients=3, seed=5)
    va, vb = load_dataset(a), load_dataset(b)
    assert [v.case_id for v in va] == [f"patient00{p}_frame{f}" for p in (1, 2, 3) for f in ("01", "10")]
    for x, y in zip(va, vb):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.scribble, y.scribble)
        assert x.spacing == pytest.approx(TINY_SPACING) and x.image.shape == TINY_SHAPE
    meta = json.loads((a / "phantom.json").read_text())
    assert meta["seed"] == 5 and len(meta["cases"]) == 6
    other = load_dataset(tiny_phantom(tmp_path / "c", patients=1, seed=6))
    assert not np.array_equal(other[0].image, va[0].image)


def test_scribbles_are_sparse_connected_strokes_inside_their_class():
    rng = np.random.default_rng(0)
    _, label, _ = phantom_case(rng, frame="ED")
    scr = synthesise_scribbles(label, 4, seed=1)
    assert scr.shape == label.shape and scr.dtype == np.uint8
    annotated = scr != 4
    assert 0.002 < annotated.mean() < 0.05                       # sparse, as real scribbles (~1 %)
    np.testing.assert_array_equal(scr[annotated], label[annotated])  # a scribble never crosses its class
    for z in range(label.shape[0]):
        for cls in np.unique(label[z]):
            if (label[z] == cls).sum() < 10:
                continue
            stroke = scr[z] == cls
            assert stroke.sum() >= 2, f"class {cls} of slice {z} got no stroke"
            _, n = ndimage.label(stroke, structure=np.ones((3, 3)))
            assert n == 1, f"class {cls} of slice {z}: {n} pieces, expected one connected stroke"
    np.testing.assert_array_equal(scr, synthesise_scribbles(label, 4, seed=1))
    assert not np.array_equal(scr, synthesise_scribbles(label, 4, seed=2))
    with pytest.raises(ValueError, match="label values"):
        synthesise_scribbles(label + 2, 4)


def test_ensure_scribbles_fills_missing_and_rejects_unlabelled(tmp_path):
    vols = load_dataset(tiny_phantom(tmp_path, patients=1))
    original = vols[0].scribble.copy()
    vols[1].scribble = None
    assert ensure_scribbles(vols) == 1 and vols[1].scribble is not None
    np.testing.assert_array_equal(vols[0].scribble, original)
    assert ensure_scribbles(vols, force=True) == 2
    vols[0].scribble, vols[0].label = None, None
    with pytest.raises(DataError, match="patient001_frame01.*neither scribbles nor a dense label"):
        ensure_scribbles(vols)


def test_splits_are_by_patient_and_disjoint(tmp_path):
    patients = [f"patient{i:03d}" for i in range(21, 101)]
    split = split_patients(patients + patients, val_fraction=0.1, test_fraction=0.2, seed=2022)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (56, 8, 16)
    assert not (set(split["train"]) & set(split["val"]) or set(split["train"]) & set(split["test"])
                or set(split["val"]) & set(split["test"]))
    assert split == split_patients(patients, val_fraction=0.1, test_fraction=0.2, seed=2022)
    assert split != split_patients(patients, val_fraction=0.1, test_fraction=0.2, seed=1)
    tiny = split_patients(["a", "b", "c"], val_fraction=0.01, test_fraction=0.01)
    assert all(len(tiny[k]) == 1 for k in tiny)
    # extreme fractions: every part keeps a patient, the parts stay disjoint and cover everyone
    for n, val, test in ((3, 0.05, 0.9), (10, 0.05, 0.9), (10, 0.9, 0.05), (4, 0.45, 0.45)):
        names = [f"p{i}" for i in range(n)]
        parts = split_patients(names, val_fraction=val, test_fraction=test)
        assert all(parts[k] for k in parts), (n, val, test, parts)
        assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(names)
    with pytest.raises(ValueError, match="at least 3 patients"):
        split_patients(["a", "b"])
    with pytest.raises(DataError, match="'p1' is in both"):
        check_split({"train": ["p1"], "val": ["p1"], "test": ["p2"]})
    bad = tmp_path / "split.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="split.json: not valid JSON"):
        load_split(bad)
    vols = load_dataset(tiny_phantom(tmp_path / "d", patients=3))
    parts = partition(vols, {"train": ["patient001"], "val": ["patient002"], "test": ["patient003"]})
    assert [v.case_id for v in parts["val"]] == ["patient002_frame01", "patient002_frame10"]
    with pytest.raises(DataError, match="not in the data"):
        partition(vols, {"train": ["patient001"], "val": ["patient009"], "test": ["patient003"]})
