"""Patient-level splits: training, validation (model selection) and test (reported once), never
by slice or by frame, so no patient is on two sides."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .volume import DataError, Volume

SPLITS = ("train", "val", "test")


def split_patients(patients: Sequence[str], *, val_fraction: float = 0.1, test_fraction: float = 0.2,
                   seed: int = 2022) -> dict[str, list[str]]:
    """Shuffle the distinct patients with ``seed`` and cut them into train / val / test.

    Validation and test each get at least one patient (and training keeps at least one)."""
    unique = sorted(set(patients))
    if len(unique) < 3:
        raise ValueError(f"need at least 3 patients for train/val/test splits, got {len(unique)}: {unique}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
                         "and sum to less than 1")
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    # at least one patient in each part: test leaves two, validation then leaves one to train on
    n_test = min(max(1, int(round(test_fraction * len(unique)))), len(unique) - 2)
    n_val = min(max(1, int(round(val_fraction * len(unique)))), len(unique) - n_test - 1)
    split = {"test": sorted(shuffled[:n_test]), "val": sorted(shuffled[n_test:n_test + n_val]),
             "train": sorted(shuffled[n_test + n_val:])}
    return split


def check_split(split: dict, where: str = "split") -> dict[str, list[str]]:
    """Validate a split mapping (keys train/val/test, disjoint lists of patient ids)."""
    if not isinstance(split, dict) or set(split) != set(SPLITS):
        raise DataError(f"{where}: a split must map exactly {SPLITS} to lists of patient ids, got "
                        f"{sorted(split) if isinstance(split, dict) else type(split).__name__}")
    seen: dict[str, str] = {}
    for name in SPLITS:
        if not isinstance(split[name], list) or not split[name]:
            raise DataError(f"{where}: '{name}' must be a non-empty list of patient ids")
        for p in split[name]:
            if p in seen:
                raise DataError(f"{where}: patient {p!r} is in both '{seen[p]}' and '{name}'")
            seen[p] = name
    return {k: [str(p) for p in split[k]] for k in SPLITS}


def load_split(path) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    return check_split(data, str(path))


def save_split(split: dict, path) -> None:
    Path(path).write_text(json.dumps(split, indent=1))


def partition(volumes: Sequence[Volume], split: dict[str, list[str]],
              strict: bool = True) -> dict[str, list[Volume]]:
    """Volumes per split. With ``strict``, a split patient missing from the data is an error."""
    by_patient: dict[str, list[Volume]] = {}
    for v in volumes:
        by_patient.setdefault(v.patient, []).append(v)
    out = {}
    for name in SPLITS:
        missing = [p for p in split[name] if p not in by_patient]
        if missing and strict:
            raise DataError(f"split '{name}' names patients not in the data: {missing[:5]}")
        out[name] = [v for p in split[name] for v in by_patient.get(p, [])]
    return out


def make_or_load_split(volumes: Sequence[Volume], split_file: Optional[str], *, val_fraction: float,
                       test_fraction: float, seed: int) -> dict[str, list[str]]:
    if split_file:
        return load_split(split_file)
    return split_patients([v.patient for v in volumes], val_fraction=val_fraction, test_fraction=test_fraction,
                          seed=seed)
