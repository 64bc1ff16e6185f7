"""Scribble synthesis from dense masks, so any densely labelled set becomes a scribble set.

Per slice and per class present (background included), as scribble papers do: erode the class
region (less when it would vanish), skeletonise it, pick one connected skeleton component (weighted
by length) and keep a random connected piece of it (a breadth-first walk from a random point of the
component, stopping at a random fraction of its length). Everything else is "not annotated"
(``ignore_index``; ACDC: 4). Deterministic for a given seed.
"""
from __future__ import annotations

import zlib
from collections import deque
from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


def _eroded(region: np.ndarray, iterations: int) -> np.ndarray:
    """Erode by up to ``iterations`` pixels but at most 40 % of the region's half-thickness (a thin
    ring stays one ring), backing off while the region would vanish."""
    half_thickness = ndimage.distance_transform_edt(region).max()
    for it in range(min(iterations, int(0.4 * half_thickness)), 0, -1):
        er = ndimage.binary_erosion(region, iterations=it, border_value=0)
        if er.sum() >= 3:
            return er
    return region


def _connected_piece(component: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A connected subset of ``component`` with about ``fraction`` of its pixels (BFS from a random
    pixel, 8-connectivity): a piece of the skeleton stroke."""
    coords = np.argwhere(component)
    keep_n = max(1, int(round(fraction * len(coords))))
    start = tuple(coords[rng.integers(len(coords))])
    seen = np.zeros_like(component, dtype=bool)
    seen[start] = True
    queue, kept = deque([start]), []
    h, w = component.shape
    while queue and len(kept) < keep_n:
        r, c = queue.popleft()
        kept.append((r, c))
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and component[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
    out = np.zeros_like(component, dtype=bool)
    rows, cols = zip(*kept)
    out[list(rows), list(cols)] = True
    return out


def _chord(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A straight stroke: the segment, inside ``region``, of a line at a random angle through a
    random interior point (used where a skeleton is too short to be a stroke, e.g. a disc)."""
    coords = np.argwhere(region)
    r0, c0 = coords[rng.integers(len(coords))]
    angle = rng.uniform(0, np.pi)
    dr, dc = np.sin(angle), np.cos(angle)
    out = np.zeros_like(region, dtype=bool)
    h, w = region.shape
    for sign in (1, -1):
        step = 0
        while True:
            r = int(round(r0 + sign * step * dr))
            c = int(round(c0 + sign * step * dc))
            if not (0 <= r < h and 0 <= c < w) or not region[r, c]:
                break
            out[r, c] = True
            step += 1
    return out


def scribble_slice(label: np.ndarray, num_classes: int, rng: np.random.Generator, *, erosion: int = 3,
                   fraction: tuple[float, float] = (0.5, 1.0), min_pixels: int = 10,
                   ignore_index: Optional[int] = None) -> np.ndarray:
    """Scribbles for one 2-D dense label map (values 0..num_classes-1)."""
    from skimage.morphology import skeletonize

    if label.ndim != 2:
        raise ValueError(f"label must be a 2-D slice, got shape {label.shape}")
    ignore_index = num_classes if ignore_index is None else ignore_index
    out = np.full(label.shape, ignore_index, dtype=np.uint8)
    for cls in range(num_classes):
        region = label == cls
        if region.sum() < min_pixels:
            continue
        skeleton = skeletonize(_eroded(region, erosion))
        if not skeleton.any():
            continue
        comps, n = ndimage.label(skeleton, structure=_EIGHT)
        sizes = np.bincount(comps.ravel())[1:].astype(float)
        pick = 1 + rng.choice(n, p=sizes / sizes.sum())
        if sizes[pick - 1] < 0.5 * np.sqrt(region.sum()):
            # the skeleton of a compact blob is (nearly) a point: draw a chord through it instead
            piece = _connected_piece(_chord(_eroded(region, erosion), rng), float(rng.uniform(*fraction)), rng)
        else:
            piece = _connected_piece(comps == pick, float(rng.uniform(*fraction)), rng)
        out[piece & region] = cls
    return out


def synthesise_scribbles(label: np.ndarray, num_classes: int, *, seed: Union[int, Sequence[int]] = 0, **kwargs) -> np.ndarray:
    """(Z, H, W) dense labels -> (Z, H, W) uint8 scribbles, ``num_classes`` = not annotated."""
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be a (slices, rows, cols) volume, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values must lie in [0, {num_classes - 1}], found {np.unique(label)[:10].tolist()}")
    rng = np.random.default_rng(seed)
    return np.stack([scribble_slice(s, num_classes, rng, **kwargs) for s in label]) if len(label) else \
        np.zeros(label.shape, np.uint8)


def ensure_scribbles(volumes, *, seed: int = 0, force: bool = False) -> int:
    """Give every volume without scribbles (or all, with ``force``) synthesised ones; returns how
    many were synthesised. Volumes without dense labels are an error (nothing to synthesise from)."""
    from .volume import DataError

    made = 0
    for vol in volumes:
        if vol.scribble is not None and not force:
            continue
        if vol.label is None:
            raise DataError(f"{vol.source or vol.case_id}: has neither scribbles nor a dense label to synthesise them from")
        # seeded by the case name, so a case gets the same scribbles whatever else is loaded
        vol.scribble = synthesise_scribbles(vol.label, vol.num_classes, seed=[seed, zlib.crc32(vol.case_id.encode())])
        made += 1
    return made
