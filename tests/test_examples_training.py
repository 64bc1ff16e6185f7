"""Training of examples/: a two-iteration smoke test of the full objective, resume after an
interruption, atomic checkpoints, the model's pluggable attention stage, AMP on the CPU."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from examples_support import tiny_phantom

from scribseg.engine import TrainConfig, load_checkpoint, save_atomic, train
from scribseg.model import UNet
from scribseg.objective import LossConfig, ScribbleModel


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_phantom(tmp_path_factory.mktemp("phantom"), patients=5)


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), size=32, batch_size=2, iterations=2, val_every=1, ckpt_every=1,
                val_fraction=0.2, test_fraction=0.2, seed=7, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_two_iterations_full_objective(data, tmp_path):
    summary = train(_cfg(data, tmp_path), log=lambda *a: None)
    hist = summary["history"]["train"]
    assert [h["iteration"] for h in hist] == [0, 1]
    assert "asl" not in hist[0] and "asl" in hist[1]            # ASL from the second iteration
    for h in hist:
        assert all(math.isfinite(h[k]) for k in ("loss", "ce", "crf"))
        assert h["loss"] > h["ce"] > 0
    assert hist[1]["loss"] == pytest.approx(hist[1]["ce"] + 0.1 * hist[1]["crf"] + 0.1 * hist[1]["asl"], rel=1e-5)
    assert hist[1]["lr"] == pytest.approx(0.01 * (1 - 1 / 2) ** 0.9)
    for name in ("last.pt", "best.pt", "split.json", "config.json", "history.json", "metrics_test.csv",
                 "metrics_test.json", "figures/curves.png", "figures/test_cases.png"):
        assert (tmp_path / name).is_file(), name
    result = json.loads((tmp_path / "metrics_test.json").read_text())
    assert [s["class"] for s in result["summary"]] == ["RV", "MYO", "LV", "mean"]
    assert result["unit"] == "mm" and result["selected_iteration"] in (1, 2)
    split = json.loads((tmp_path / "split.json").read_text())
    assert set(result["test_patients"]) == set(split["test"])
    assert not set(split["test"]) & (set(split["val"]) | set(split["train"]))
    rows = result["cases"]
    assert {r["status"] for r in rows} <= {"ok", "empty_pred", "empty_gt", "both_empty"}
    assert all(math.isnan(r["hd95"]) for r in rows if r["status"] != "ok")
    assert (tmp_path / "figures/curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_interruption_is_exact(data, tmp_path):
    cfg = _cfg(data, tmp_path / "straight", iterations=3, val_every=3)
    straight = train(cfg, log=lambda *a: None)
    part = _cfg(data, tmp_path / "cut", iterations=3, val_every=3, stop_after=2)
    first = train(part, log=lambda *a: None)
    assert first["stopped_at"] == 2 and "test" not in first
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["iteration"] == 2
    resumed = train(dataclasses.replace(part, stop_after=None, resume=True), log=lambda *a: None)
    a = [h["loss"] for h in straight["history"]["train"]]
    b = [h["loss"] for h in resumed["history"]["train"]]
    assert len(b) == 3 and a == b and "asl" in straight["history"]["train"][2]
    s1 = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    s2 = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert straight["test"]["summary"] == resumed["test"]["summary"]
    assert "scaler" in load_checkpoint(tmp_path / "cut" / "last.pt")  # the fp16 loss scale (empty: AMP off)


def test_official_asl_gate_needs_dense_labels(tmp_path):
    """--asl-gate label reads each training slice's dense label: volumes without one would make the
    gate 0 everywhere (ASL silently off), so the run stops and names the remedy."""
    from scribseg.volume import DataError

    root = tiny_phantom(tmp_path / "d", patients=4)
    for gt in root.rglob("*_gt.nii.gz"):
        gt.unlink()
    with pytest.raises(DataError, match="--asl-gate label .* have none .* use --asl-gate scribble"):
        train(_cfg(root, tmp_path / "run", val_fraction=0.25, test_fraction=0.25), log=lambda *a: None)


def test_resume_refuses_another_split(data, tmp_path):
    train(_cfg(data, tmp_path, iterations=2, stop_after=1, final_eval=False), log=lambda *a: None)
    with pytest.raises(RuntimeError, match="split differs"):
        train(_cfg(data, tmp_path, iterations=2, seed=8, resume=True), log=lambda *a: None)


def test_amp_bf16_on_cpu_and_pce_only(data, tmp_path):
    s = train(_cfg(data, tmp_path / "amp", amp=True, final_eval=False), log=lambda *a: None)
    assert all(math.isfinite(h["loss"]) for h in s["history"]["train"]) and "asl" in s["history"]["train"][1]
    s = train(_cfg(data, tmp_path / "pce", iterations=1, attention_stage=None, final_eval=False,
                   loss=LossConfig(lambda_crf=0.0, lambda_asl=0.0)), log=lambda *a: None)
    assert set(s["history"]["train"][0]) >= {"ce", "loss"} and "crf" not in s["history"]["train"][0]


@pytest.mark.parametrize("stage", [None, 0, 1, 2, 3, 4])
def test_unet_attention_at_any_stage(stage):
    net = UNet(1, 4, attention_stage=stage)
    logits, sim = net(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 4, 32, 32)
    if stage is None:
        assert sim is None and net.attention is None
    else:
        side = 32 >> stage
        assert sim.grid == (side, side) and sim.q.shape == (2, 1, side * side, (16, 32, 64, 128, 256)[stage])


def test_model_and_config_errors():
    with pytest.raises(ValueError, match="attention_stage"):
        UNet(attention_stage=5)
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet()(torch.rand(1, 1, 40, 40))
    with pytest.raises(ValueError, match="asl_gate"):
        LossConfig(asl_gate="maybe")
    with pytest.raises(ValueError, match="needs the attention block"):
        ScribbleModel(4, LossConfig(), attention_stage=None)
    assert LossConfig().variant == "pCE + MCRF + ASL"
    assert LossConfig(dense=True).variant == "full supervision"


def test_window_scaling_keeps_the_official_extent():
    official = LossConfig()
    assert official.scaled(256, 64) == official
    half = official.scaled(128, 32)
    assert (half.crf_radius, half.crf_sigma_xy, half.asl_radius, half.asl_sigma) == (2, 3.0, 2, 3.0)
    quarter = official.scaled(64, 16)
    assert (quarter.crf_radius, quarter.crf_sigma_xy, quarter.asl_radius, quarter.asl_sigma) == (1, 1.5, 1, 1.5)
    assert quarter.crf_sigma_image == official.crf_sigma_image and quarter.lambda_asl == official.lambda_asl


def test_checkpoints_are_atomic(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"model": {"w": torch.ones(2)}, "iteration": 3}, path)
    with pytest.raises(Exception):
        save_atomic({"model": {}, "iteration": 4, "bad": lambda: 0}, path)   # unpicklable: save fails
    assert load_checkpoint(path)["iteration"] == 3                            # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]                   # no temporary left
    path.write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(RuntimeError, match="ck.pt: cannot read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nope.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("argv,match", [
    (["--val-every", "0"], "--val-every must be >= 1"),
    (["--ckpt-every", "0"], "--ckpt-every must be >= 1"),
    (["--size", "-16"], "--size must be a positive multiple of 16"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--size", "16", "--batch-size", "1"], "BatchNorm"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"),
    (["--lambda-crf", "nan"], "--lambda-crf must be a finite number >= 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], "must leave patients to train on"),
    (["--spacing", "1,2,inf"], "--spacing must be three positive numbers"),
    (["--device", "bogus"], "--device must be auto or a torch device"),
    (["--attention-stage", "5"], "--attention-stage must be an encoder stage 0-4, or -1"),
    (["--attention-stage", "-2"], "--attention-stage must be an encoder stage 0-4, or -1"),
    (["--attention-heads", "3"], "--attention-heads must divide the 64 channels of stage 2"),
    (["--attention-heads", "0"], "--attention-heads must divide the 64 channels of stage 2"),
    (["--attention-stage", "-1"], "needs the attention block"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "sees no CUDA device")]))
def test_command_line_values_are_checked_before_the_run(argv, match, capsys):
    """Each entry point (train, demo, ablation) exits 2 with "error: ..." naming the option."""
    import ablation
    import demo
    import train as train_cli

    for entry, extra in ((train_cli.main, ["--data", "none", "--out", "none"]), (demo.main, []),
                         (ablation.main, ["--data", "none", "--out", "none"])):
        with pytest.raises(SystemExit) as exit_info:
            entry(extra + argv)
        assert exit_info.value.code == 2
        assert match in capsys.readouterr().err
