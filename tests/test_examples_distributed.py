"""examples/train.py under torchrun: two processes, DDP over gloo on the CPU; and the
reference-vs-auto backend comparison of examples/compare_backends.py in small."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from examples_support import EXAMPLES, tiny_phantom


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_phantom(tmp_path_factory.mktemp("phantom"), patients=5)


def test_two_process_ddp_gloo(data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "train.py"), "--data", str(data), "--out", str(out), "--size", "32", "--batch-size", "2",
           "--iterations", "2", "--val-every", "2", "--ckpt-every", "1", "--val-fraction", "0.2",
           "--test-fraction", "0.2", "--threads", "1", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hist = json.loads((out / "history.json").read_text())["train"]
    assert len(hist) == 2 and all("loss_all_ranks" in h for h in hist)
    # each rank draws its own batch: the mean over ranks is not rank 0's loss
    assert any(abs(h["loss_all_ranks"] - h["loss"]) > 1e-6 for h in hist)
    assert (out / "metrics_test.json").is_file() and (out / "last.pt").is_file()
    assert proc.stdout.count("validation mean Dice") == 1           # only rank 0 validates and logs


def test_backend_comparison_small(data, tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    from compare_backends import compare

    rep = compare(str(data), str(tmp_path), size=32, batch_size=2, iterations=2, val_fraction=0.2,
                  test_fraction=0.2, log=lambda *a: None)
    ref, auto = rep["runs"]["reference"], rep["runs"]["auto"]
    assert set(ref["resolved"].values()) == {"reference"}
    assert set(auto["resolved"]) == {"masked_crf", "attentive_similarity", "spatial_attention"}
    assert all(v in ("reference", "cpu", "cuda", "triton") for v in auto["resolved"].values())
    assert len(ref["losses"]) == len(auto["losses"]) == 2
    assert rep["losses_match"] and rep["metrics_match"], (rep["max_loss_rel_diff"], rep["max_dice_abs_diff"])
    for r in (ref, auto):
        assert r["step_seconds"] > 0 and r["losses_seconds"] > 0
    assert (tmp_path / "compare.md").read_text().count("|") > 10
    assert "auto ->" in rep["explain"]
