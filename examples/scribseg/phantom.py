"""A synthetic short-axis cardiac MR phantom: the embedded default data set, so every example and
test runs without a download.

Each case is a stack of short-axis slices (realistic anisotropic spacing, about 1.5 x 1.5 mm in
plane and 6-10 mm between slices) with the ACDC classes: 1 RV (a crescent beside the septum),
2 myocardium (a ring), 3 LV blood pool (an ellipse), 0 background (body, lungs, liver, random
blobs). Shape, size, orientation, position, intensities, noise level and a smooth multiplicative
bias field are random; the heart tapers from base to apex, the RV ends before the apex, and the
end-systolic frame has a smaller cavity and a thicker wall than the end-diastolic one. Images get
partial-volume blur and Rician noise and are stored as int16 "scanner" values, so the readers'
preprocessing (99th-percentile clip, min-max) is exercised as on real data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from .readers import ACDC_CLASSES, write_nifti
from .scribbles import synthesise_scribbles

FRAMES = {"ED": 1, "ES": 10}


def _ellipse(yy, xx, cy, cx, ry, rx, theta) -> np.ndarray:
    """Inside-ellipse test on mm grids: centre (cy, cx), radii (ry, rx), rotation theta."""
    c, s = np.cos(theta), np.sin(theta)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _bias_field(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    """exp of a random second-order polynomial in (z, y, x) scaled to about +-strength."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    terms = [x, y, z * 0.3, x * y, x ** 2, y ** 2]
    poly = sum(rng.normal() * t for t in terms)
    poly = poly / (np.abs(poly).max() + 1e-6)
    return np.exp(strength * poly)


def phantom_case(rng: np.random.Generator, *, frame: str = "ED", anatomy: Optional[dict] = None,
                 shape: Optional[tuple[int, int, int]] = None,
                 spacing: Optional[tuple[float, float, float]] = None) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One (image int16, label uint8, spacing (z, y, x) mm) phantom volume.

    ``anatomy`` (from :func:`random_anatomy`) fixes the patient so ED and ES frames share it."""
    anatomy = anatomy or random_anatomy(rng)
    if spacing is None:
        inplane = anatomy["inplane_mm"]
        spacing = (anatomy["slice_mm"], inplane, inplane)
    nz, ny, nx = shape or anatomy["shape"]
    yy, xx = np.meshgrid(np.arange(ny) * spacing[1], np.arange(nx) * spacing[2], indexing="ij")
    height, width = ny * spacing[1], nx * spacing[2]
    cy, cx = anatomy["centre"][0] * height, anatomy["centre"][1] * width
    es = frame == "ES"
    cavity = anatomy["lv_radius"] * (0.72 if es else 1.0)
    wall = anatomy["wall"] * (1.35 if es else 1.0)
    theta, elong = anatomy["theta"], anatomy["elongation"]
    label = np.zeros((nz, ny, nx), np.uint8)
    fat = np.zeros((nz, ny, nx), bool)  # epicardial fat: a bright rim outside the myocardium (background)
    body = _ellipse(yy, xx, height / 2, width / 2, 0.46 * height, 0.48 * width, 0.0)
    lungs = [_ellipse(yy, xx, cy + d * 0.15 * height, cx + d * anatomy["lung_dx"] * width, 0.2 * height,
                      0.13 * width, 0.3 * d) for d in (-1, 1)]
    liver = _ellipse(yy, xx, cy + 0.3 * height, cx - 0.2 * width, 0.16 * height, 0.22 * width, 0.4)
    for k in range(nz):
        t = k / max(nz - 1, 1)  # 0 at the base, 1 at the apex
        taper = 1.0 - 0.55 * t ** 1.4
        r_lv = cavity * taper * (0.0 if t > 0.92 else 1.0)
        r_out = (cavity * taper) + wall * (0.85 + 0.15 * taper)
        outer = _ellipse(yy, xx, cy, cx, r_out * elong, r_out, theta)
        inner = _ellipse(yy, xx, cy, cx, r_lv * elong, r_lv, theta) if r_lv > 0 else np.zeros_like(outer)
        fat[k] = _ellipse(yy, xx, cy, cx, (r_out + anatomy["fat_mm"]) * elong, r_out + anatomy["fat_mm"], theta)
        if t < 0.8:
            phi = anatomy["rv_angle"]
            dist = r_out * 1.0
            rv_c = (cy + dist * np.sin(phi), cx + dist * np.cos(phi))
            rv_r = anatomy["rv_scale"] * r_out * (1.0 - 0.6 * t) * (0.8 if es else 1.0)
            rv = _ellipse(yy, xx, rv_c[0], rv_c[1], rv_r * 1.25, rv_r * 0.8, phi + np.pi / 2)
            keep_out = ndimage.binary_dilation(outer, iterations=max(1, int(round(2.0 / spacing[1]))))
            label[k][rv & ~keep_out & body] = 1
        label[k][outer & ~inner] = 2
        label[k][inner] = 3
    intens = anatomy["intensity"]
    image = np.full(label.shape, 0.02, np.float32)
    image[:, body] = intens["body"]
    for lung in lungs:
        image[:, lung & body] = intens["lung"]
    image[:, liver & body] = intens["liver"]
    for blob in anatomy["blobs"]:
        mask = _ellipse(yy, xx, blob[0] * height, blob[1] * width, blob[2] * height, blob[3] * width, blob[4])
        image[:, mask & body] = blob[5]
    image[fat & body[None]] = intens["fat"]
    image[label == 1] = intens["rv"]
    image[label == 2] = intens["myo"]
    image[label == 3] = intens["lv"]
    image = ndimage.gaussian_filter(image, sigma=(0.0, 0.8, 0.8))
    image *= _bias_field(image.shape, rng, anatomy["bias"])
    noise = anatomy["noise"]
    image = np.sqrt((image + rng.normal(0, noise, image.shape)) ** 2 + rng.normal(0, noise, image.shape) ** 2)
    scanner = np.clip(image * anatomy["gain"], 0, 32000).astype(np.int16)
    return scanner, label, tuple(float(s) for s in spacing)


def random_anatomy(rng: np.random.Generator) -> dict:
    """Random patient-level parameters (shared by the ED and ES frames)."""
    lv = rng.uniform(0.62, 0.9)
    return {
        "shape": (int(rng.integers(6, 11)), int(rng.integers(112, 161)), int(rng.integers(112, 161))),
        "inplane_mm": float(rng.uniform(1.35, 1.7)),
        "slice_mm": float(rng.choice([6.5, 8.0, 10.0])),
        "centre": (float(rng.uniform(0.4, 0.6)), float(rng.uniform(0.42, 0.6))),
        "lv_radius": float(rng.uniform(17, 27)),
        "wall": float(rng.uniform(6, 10)),
        "theta": float(rng.uniform(0, np.pi)),
        "elongation": float(rng.uniform(0.8, 1.25)),
        "rv_angle": float(np.pi + rng.uniform(-0.6, 0.6)),
        "rv_scale": float(rng.uniform(0.95, 1.35)),
        "fat_mm": float(rng.uniform(0.0, 3.0)),
        "lung_dx": float(rng.uniform(0.22, 0.3)),
        "intensity": {"lv": lv, "rv": float(np.clip(lv + rng.uniform(-0.08, 0.05), 0.5, 1.0)),
                      "myo": float(rng.uniform(0.12, 0.28)), "body": float(rng.uniform(0.32, 0.48)),
                      "fat": float(rng.uniform(0.55, 0.85)),
                      "lung": float(rng.uniform(0.03, 0.1)), "liver": float(rng.uniform(0.35, 0.55))},
        "blobs": [(float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.03, 0.08)),
                   float(rng.uniform(0.03, 0.08)), float(rng.uniform(0, np.pi)), float(rng.uniform(0.15, 0.8)))
                  for _ in range(int(rng.integers(2, 6)))],
        "bias": float(rng.uniform(0.1, 0.35)),
        "noise": float(rng.uniform(0.02, 0.06)),
        "gain": float(rng.uniform(300, 1500)),
    }


def write_phantom_dataset(out_dir, *, patients: int = 20, seed: int = 0, scribbles: bool = True,
                          first_id: int = 1, shape: Optional[tuple[int, int, int]] = None,
                          spacing: Optional[tuple[float, float, float]] = None) -> list[Path]:
    """Write ``patients`` phantom patients (ED and ES frames) in the ACDC release layout:
    ``patientNNN/patientNNN_frameMM.nii.gz`` with ``_gt`` and (synthesised) ``_scribble`` files,
    plus ``phantom.json`` with the generation parameters. Returns the image paths.

    ``shape`` / ``spacing`` (z, y, x) fix the volume size (e.g. tiny volumes for tests); by default
    both are random per patient."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, manifest = [], {"seed": seed, "patients": patients, "classes": list(ACDC_CLASSES), "cases": {}}
    for p in range(first_id, first_id + patients):
        rng = np.random.default_rng([seed, p])
        anatomy = random_anatomy(rng)
        pdir = out_dir / f"patient{p:03d}"
        pdir.mkdir(exist_ok=True)
        for frame, number in FRAMES.items():
            image, label, voxel = phantom_case(rng, frame=frame, anatomy=anatomy, shape=shape, spacing=spacing)
            stem = pdir / f"patient{p:03d}_frame{number:02d}"
            write_nifti(f"{stem}.nii.gz", image, voxel, np.int16)
            write_nifti(f"{stem}_gt.nii.gz", label, voxel, np.uint8)
            if scribbles:
                scr = synthesise_scribbles(label, 4, seed=[seed, p, number])
                write_nifti(f"{stem}_scribble.nii.gz", scr, voxel, np.uint8)
            written.append(Path(f"{stem}.nii.gz"))
            manifest["cases"][stem.name] = {"frame": frame, "shape": list(image.shape), "spacing_zyx_mm": voxel}
    (out_dir / "phantom.json").write_text(json.dumps(manifest, indent=1))
    return written


def ensure_phantom(out_dir, *, patients: int = 20, seed: int = 0) -> Path:
    """Generate the phantom set in ``out_dir`` unless a complete one with these settings is there."""
    out_dir = Path(out_dir)
    meta = out_dir / "phantom.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        if info.get("seed") == seed and info.get("patients") == patients:
            return out_dir
    write_phantom_dataset(out_dir, patients=patients, seed=seed)
    return out_dir
