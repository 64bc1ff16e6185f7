"""Dice and HD95 of examples/scribseg/evaluation.py on hand-made masks with known answers, voxel
spacing included, and the honest handling of empty predictions."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import examples_support  # noqa: F401  (puts examples/ on sys.path)
from scribseg.evaluation import directed_surface_distances, format_table, score_case, summarise


def _box(shape, z, y, x, value=1):
    a = np.zeros(shape, np.uint8)
    a[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = value
    return a


def test_identical_masks():
    gt = _box((6, 20, 20), (1, 5), (4, 12), (4, 12))
    (row,) = score_case(gt, gt, 2, (5.0, 1.5, 1.5))
    assert row["status"] == "ok" and row["dice"] == pytest.approx(1.0) and row["hd95"] == pytest.approx(0.0)


@pytest.mark.parametrize("axis,spacing,expected", [(2, (10.0, 1.0, 1.5), 4.5), (1, (10.0, 0.7, 1.5), 2.1),
                                                   (0, (8.0, 1.0, 1.0), 24.0)])
def test_single_voxels_distance_follows_spacing(axis, spacing, expected):
    pred = np.zeros((8, 8, 8), np.uint8)
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2, 2, 2] = 1
    idx = [2, 2, 2]
    idx[axis] += 3
    pred[tuple(idx)] = 1
    (row,) = score_case(pred, gt, 2, spacing)
    assert row["dice"] == 0.0 and row["hd95"] == pytest.approx(expected)   # 3 voxels along the axis


def test_shifted_slab_dice_and_hd95():
    # 4 x 10 x 10 box, prediction shifted by 2 voxels in x (1.5 mm): overlap 4 x 10 x 8
    gt = _box((6, 16, 20), (1, 5), (3, 13), (3, 13))
    pred = _box((6, 16, 20), (1, 5), (3, 13), (5, 15))
    (row,) = score_case(pred, gt, 2, (8.0, 1.25, 1.5))
    assert row["dice"] == pytest.approx(2 * 320 / 800)
    # every boundary voxel of one box is at most 2 voxels (3 mm) in x from the other's boundary,
    # and the shifted faces are exactly that far: the 95th percentile is 3 mm
    assert row["hd95"] == pytest.approx(3.0)


def _brute_surface(m):
    """Coordinates of the voxels of m with a face neighbour outside m or outside the volume."""
    padded = np.pad(m, 1, constant_values=False)
    inner = np.ones_like(m)
    for axis in range(m.ndim):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[tuple(slice(1, -1) for _ in m.shape)]
    return np.argwhere(m & ~inner)


def _brute_hd95(pred, gt, spacing):
    """MedPy's hd95 written out: every pairwise distance between the two surfaces, the nearest in
    each direction, both directions pooled, 95th percentile."""
    a = _brute_surface(pred) * np.asarray(spacing, float)
    b = _brute_surface(gt) * np.asarray(spacing, float)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def _blobs(rng, shape, density):
    from scipy import ndimage

    return ndimage.binary_dilation(rng.random(shape) < density, iterations=int(rng.integers(0, 2)))


def test_hd95_matches_the_written_out_definition():
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(30):
        shape = tuple(int(v) for v in rng.integers(3, 12, size=3))
        pred, gt = _blobs(rng, shape, 0.04), _blobs(rng, shape, 0.04)
        if not pred.any() or not gt.any():
            continue
        spacing = tuple(float(v) for v in rng.uniform(0.5, 6.0, size=3))
        (row,) = score_case(pred.astype(np.uint8), gt.astype(np.uint8), 2, spacing)
        assert row["hd95"] == pytest.approx(_brute_hd95(pred, gt, spacing), rel=1e-12, abs=1e-12)
        checked += 1
    assert checked >= 20


def test_hd95_pools_both_directions_unlike_monai():
    """A far false-positive strip: MONAI's percentile=95 is the larger one-way percentile; the
    pooled one (MedPy, the papers) is smaller. Both share the one-way distance sets."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    gt = _box((6, 60, 40), (1, 3), (5, 25), (5, 25))
    pred = gt.copy()
    pred[4, 44:50, 2:32] = 1
    spacing = (5.0, 1.5, 1.5)
    (row,) = score_case(pred, gt, 2, spacing)
    to_gt, to_pred = directed_surface_distances(pred.astype(bool), gt.astype(bool), spacing)
    assert row["hd95"] == pytest.approx(float(np.percentile(np.concatenate([to_gt, to_pred]), 95)))
    assert row["hd95"] == pytest.approx(_brute_hd95(pred.astype(bool), gt.astype(bool), spacing))
    with warnings.catch_warnings():   # MONAI 1.5 warns about an argument of its own internal call
        warnings.simplefilter("ignore", FutureWarning)
        monai = float(compute_hausdorff_distance(torch.from_numpy(pred[None, None].astype(np.float32)),
                                                 torch.from_numpy(gt[None, None].astype(np.float32)),
                                                 include_background=True, percentile=95,
                                                 spacing=list(spacing)).reshape(-1)[0])
    assert monai == pytest.approx(max(np.percentile(to_gt, 95), np.percentile(to_pred, 95)), rel=1e-5)
    assert row["hd95"] < monai - 1.0


def test_surface_distances_crop_keeps_the_volume_edge():
    # masks touching the volume's faces: the edge voxels are surface, as on the whole volume
    gt = np.ones((3, 6, 6), bool)
    pred = np.zeros((3, 6, 6), bool)
    pred[:, :, :3] = True
    to_gt, to_pred = directed_surface_distances(pred, gt, (2.0, 1.0, 1.0))
    assert to_gt.size == len(_brute_surface(pred)) and to_pred.size == len(_brute_surface(gt))
    assert score_case(pred.astype(np.uint8), gt.astype(np.uint8), 2, (2.0, 1.0, 1.0))[0]["hd95"] == \
        pytest.approx(_brute_hd95(pred, gt, (2.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="non-empty"):
        directed_surface_distances(np.zeros((2, 2, 2), bool), gt[:2, :2, :2], (1.0, 1.0, 1.0))


def test_partial_overlap_in_z():
    gt = _box((8, 10, 10), (0, 4), (2, 8), (2, 8))
    pred = _box((8, 10, 10), (0, 2), (2, 8), (2, 8))
    (row,) = score_case(pred, gt, 2, None)
    assert row["dice"] == pytest.approx(2 * 72 / (144 + 72))


def test_empty_cases_are_counted_not_scored():
    gt = np.zeros((4, 10, 10), np.uint8)
    gt[1:3, 2:6, 2:6] = 1
    gt[1:3, 6:9, 6:9] = 2
    pred = np.zeros_like(gt)
    pred[1:3, 2:6, 2:6] = 1
    pred[0, 0, 0] = 3
    rows = score_case(pred, gt, 5, (5.0, 1.0, 1.0))
    by = {r["class"]: r for r in rows}
    assert by[1]["status"] == "ok" and by[1]["dice"] == pytest.approx(1.0)
    assert by[2]["status"] == "empty_pred" and by[2]["dice"] == 0.0 and math.isnan(by[2]["hd95"])
    assert by[3]["status"] == "empty_gt" and by[3]["dice"] == 0.0 and math.isnan(by[3]["hd95"])
    assert by[4]["status"] == "both_empty" and by[4]["dice"] == 1.0 and math.isnan(by[4]["hd95"])
    summary = summarise(rows, ("a", "b", "c", "d"))
    b = summary[1]
    assert b["empty_pred"] == 1 and b["hd95_cases"] == 0 and math.isnan(b["hd95_mean"]) and b["dice_mean"] == 0.0
    assert summary[-1]["class"] == "mean" and summary[-1]["empty_pred"] == 1
    assert "n/a" in format_table(summary)


def test_summary_hd95_only_over_defined_cases():
    gt = _box((4, 10, 10), (1, 3), (2, 6), (2, 6))
    shifted = np.roll(gt, 1, axis=2)
    rows = score_case(shifted, gt, 2, (1.0, 1.0, 2.0)) + score_case(np.zeros_like(gt), gt, 2, (1.0, 1.0, 2.0))
    (s, mean) = summarise(rows, ("fg",))
    assert s["hd95_cases"] == 1 and s["hd95_mean"] == pytest.approx(rows[0]["hd95"])
    assert s["empty_pred"] == 1 and s["dice_mean"] == pytest.approx(rows[0]["dice"] / 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="prediction shape"):
        score_case(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)), 2, None)
    with pytest.raises(ValueError, match="spacing"):
        score_case(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), 2, (1.0, 1.0))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        score_case(np.ones(4), np.ones(4), 2, None)
    with pytest.raises(TypeError, match="spacing must be a sequence"):
        score_case(np.ones((2, 3, 3)), np.ones((2, 3, 3)), 2, 1.0)
    for bad in ((1.0, 1.0, 0.0), (1.0, 1.0, float("nan"))):
        with pytest.raises(ValueError, match="finite voxel sizes > 0"):
            score_case(np.ones((2, 3, 3)), np.ones((2, 3, 3)), 2, bad)


@pytest.mark.parametrize("size", [64, 96, 256])
def test_inference_resizes_back_onto_the_same_pixel_grid(size):
    """Slice-wise inference resizes the image to size x size (bilinear, align_corners=False) and
    the label map back with the same half-pixel geometry (nearest-exact): a model that reproduces
    its input's structures scores Dice 1 and HD95 0. torch's legacy "nearest" shifts the map by up
    to a pixel (Dice 0.93-0.97 here)."""
    import torch

    from scribseg.evaluation import predict_volume

    class Threshold(torch.nn.Module):  # logits of "background" and "foreground" from the intensity
        def forward(self, x):
            return torch.cat([-(x ** 2), -((x - 1) ** 2)], 1), None

    label = np.zeros((3, 57, 43), np.uint8)
    label[:, 10:30, 5:25] = 1
    label[:, 33:50, 20:40] = 1
    label[1, 5:9, 30:33] = 1
    pred = predict_volume(Threshold(), label.astype(np.float32), size)
    assert np.array_equal(pred, label)
    (row,) = score_case(pred, label, 2, (5.0, 1.5, 1.5))
    assert row["dice"] == 1.0 and row["hd95"] == 0.0
