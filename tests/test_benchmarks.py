"""The benchmark machinery (suites, measurement, result files, tables, plots, README sections) on
the quick shapes. Timing values are not asserted (targets are shown by committed results)."""
import json
import os
import time

import pytest
import torch

from benchmarks import common, report
from benchmarks.__main__ import SUITES, main
from benchmarks.bench_attentive_similarity import SUITE as ASL
from benchmarks.bench_masked_crf import SUITE as CRF
from benchmarks.bench_spatial_attention import SUITE as ATTENTION
from benchmarks.bench_train_step import SUITE as TRAIN

CPU = torch.device("cpu")


@pytest.mark.parametrize("suite,providers", [
    (CRF, ["reference", "cpu"]),
    (ASL, ["reference", "cpu"]),
    (ATTENTION, ["reference", "cpu", "sdpa"]),
    (TRAIN, ["unet+pce", "method-fused"]),
], ids=lambda x: getattr(x, "name", None) or "-".join(x))
def test_suite_rows(suite, providers):
    rows = common.run_suite(suite, CPU, quick=True, modes=common.MODES, providers=providers, warmup=0, repeat=1,
                            log=lambda line: None)
    assert {r["provider"] for r in rows} == set(providers)
    ran = [r for r in rows if r.get("median_ms") is not None]
    assert ran, rows
    for r in ran:
        assert r["median_ms"] > 0
        assert r["device"].startswith(common.device_name(CPU).split("(")[0].strip())
        for key in common.environment_keys():
            assert key in r
    for r in rows:
        if r.get("median_ms") is None:
            assert r["skipped"]  # every skipped row says why
    common.add_ratios(rows, suite.reference)
    assert any(r.get("speedup") == pytest.approx(1.0) for r in rows if r["provider"] == suite.reference)
    assert suite.reference in common.table(rows)


def test_unavailable_providers_are_recorded_with_the_reason():
    rows = common.run_suite(CRF, CPU, quick=True, modes=["full"], providers=["cuda", "triton"], warmup=0, repeat=1,
                            log=lambda line: None)
    assert rows and all(r["median_ms"] is None and r["skipped"] for r in rows)
    assert any("CUDA" in r["skipped"] or "cuda" in r["skipped"] for r in rows if r["provider"] == "cuda")


def test_train_step_runs_the_optimizer_and_full_mode_only():
    work = TRAIN.build("unet+pce", TRAIN.cases(True, "cpu")[0], CPU)
    assert tuple(work.modes) == ("full",)
    before = [p.detach().clone() for p in work.leaves]
    work.backward(work.forward())
    work.after_backward()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, work.leaves))
    rows = common.run_suite(TRAIN, CPU, quick=True, modes=common.MODES, providers=["unet+pce"], warmup=0, repeat=1,
                            log=lambda line: None)
    assert [r["mode"] for r in rows] == ["full"]


def test_train_step_under_autocast_steps_the_optimizer():
    work = TRAIN.build("method-fused", dict(B=2, size=64, amp="bf16"), CPU)  # the CPU's autocast dtype
    before = [p.detach().clone() for p in work.leaves]
    loss = work.forward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    work.backward(loss)
    work.after_backward()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, work.leaves))


def test_workload_context_wraps_every_measurement():
    active, entered = [], []

    class Context:
        def __enter__(self):
            active.append(True)
            entered.append(True)

        def __exit__(self, *exc):
            active.pop()

    x = torch.rand(8, requires_grad=True)

    def forward():
        assert active, "measured outside the workload's context"
        return (x * x).sum()

    work = common.Workload(forward, [x], context=Context)
    for mode in common.MODES:
        row = common.measure(work, mode, CPU, warmup=1, repeat=2)
        assert row["median_ms"] > 0
    assert len(entered) == len(common.MODES) and not active


def test_train_step_tf32_case_sets_and_restores_torch_matmul_precision():
    matmul = torch.backends.cuda.matmul
    assert "matmul=tf32" in " ".join(common.case_label(dict(c, suite="", provider="", mode=""))
                                     for c in TRAIN.cases(False, "cuda"))
    assert all("matmul" not in c for c in TRAIN.cases(False, "cpu"))
    before = matmul.fp32_precision
    with TRAIN.build("unet+pce", dict(B=2, size=64, matmul="tf32"), CPU).context():
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    assert TRAIN.build("unet+pce", dict(B=2, size=64), CPU).context is None
    assert "amp=fp16" in " ".join(common.case_label(dict(c, suite="", provider="", mode=""))
                                  for c in TRAIN.cases(False, "cuda"))
    rows = common.run_suite(TRAIN, CPU, quick=True, modes=["full"], providers=["method-triton", "method-cuda"],
                            warmup=0, repeat=1, log=lambda line: None)
    assert all(r["median_ms"] is None and "on a GPU only" in r["skipped"] for r in rows)


def test_runner_writes_results_plots_and_readme_sections(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["--suite", "masked_crf", "--quick", "--providers", "reference", "cpu", "--warmup", "0",
                 "--repeat", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed
    files = sorted(os.listdir(out))
    json_files = [f for f in files if f.endswith(".json")]
    assert len(json_files) == 1 and any(f.endswith(".csv") for f in files) and any(f.endswith(".png") for f in files)
    rows = json.loads((out / json_files[0]).read_text())
    assert all(r["suite"] == "masked_crf" for r in rows)
    readme = tmp_path / "README.md"
    name = json_files[0][:-5]
    readme.write_text(f"intro\n<!-- bench:{name}:begin -->\nold\n<!-- bench:{name}:end -->\nend\n")
    assert report.update_readme(str(readme), str(out)) == [name]
    text = readme.read_text()
    assert "old" not in text and "| cpu |" in text and text.startswith("intro") and text.endswith("end\n")


def test_a_stopped_run_keeps_its_rows_apart_from_complete_results(tmp_path, monkeypatch):
    """A suite killed mid-way (a time limit on the GPU machine) leaves the rows it measured in
    <suite>-<device>.partial.json and does not touch the complete results of an earlier run."""
    out = tmp_path / "results"
    args = ["--suite", "masked_crf", "--quick", "--providers", "reference", "cpu", "--modes", "forward", "full",
            "--warmup", "0", "--repeat", "1", "--out", str(out), "--no-plots"]
    assert main(args) == 0
    complete = sorted(out.glob("*.json"))
    assert len(complete) == 1 and not complete[0].name.endswith(".partial.json")
    before = complete[0].read_text()
    measure, calls = common.measure, []

    def stopped_after_three(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt("time limit")
        calls.append(1)
        return measure(*a, **k)

    monkeypatch.setattr(common, "measure", stopped_after_three)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    partial = out / complete[0].name.replace(".json", ".partial.json")
    rows = json.loads(partial.read_text())
    assert len(rows) == 3 and all(r["median_ms"] > 0 for r in rows)
    assert complete[0].read_text() == before
    monkeypatch.setattr(common, "measure", measure)
    assert main(args) == 0 and not partial.exists()


def test_every_suite_is_registered():
    import importlib

    for name, module in SUITES.items():
        assert importlib.import_module(module).SUITE.name == name


def test_readme_tables_are_generated_from_the_committed_results(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = os.path.join(root, "README.md")
    copy = tmp_path / "README.md"
    copy.write_text(open(readme).read())
    updated = report.update_readme(str(copy), common.RESULTS_DIR)
    assert updated, "README.md has no bench sections"
    assert copy.read_text() == open(readme).read(), "run python -m benchmarks.report --readme README.md"


def test_a_case_on_two_series_is_plotted_on_both(tmp_path):
    base = dict(suite="masked_crf", mode="full", device="this CPU", peak_mib=10.0)
    rows = [dict(base, provider="cpu", size=256, radius=5, median_ms=80.0, series=["size", "radius"]),
            dict(base, provider="cpu", size=512, radius=5, median_ms=300.0, series="size"),
            dict(base, provider="cpu", size=256, radius=10, median_ms=180.0, series="radius"),
            dict(base, provider="cpu", size=128, radius=5, median_ms=None, series="size")]
    assert [report.series_of(r) for r in rows[:3]] == [["size", "radius"], ["size"], ["radius"]]
    assert report.series_of(dict(series=None)) == []
    groups = report.plot_groups(rows)
    assert sorted(groups) == [("radius", "full", ""), ("size", "full", "")]
    assert [r["median_ms"] for r in groups[("size", "full", "")]] == [80.0, 300.0]
    assert [r["median_ms"] for r in groups[("radius", "full", "")]] == [80.0, 180.0]
    pytest.importorskip("matplotlib")  # the grouping above needs no plotting library
    path = tmp_path / "masked_crf-test.json"
    path.write_text(json.dumps(rows))
    written = sorted(os.path.basename(p) for p in report.plot_results(str(path)))
    assert written == ["masked_crf-test-radius-full.png", "masked_crf-test-size-full.png"]


def test_short_steps_take_more_samples_and_slow_ones_fewer(monkeypatch):
    """``repeat`` samples; a step far shorter than MIN_SECONDS takes more, at most MAX_REPEAT; one
    whose ``repeat`` samples would pass MAX_SECONDS as many as fit in it, at least
    MIN_SLOW_SAMPLES; the row says how many, and its case label does not depend on it."""
    assert common.sample_count(0.0, 3) == common.MAX_REPEAT  # below the clock's resolution
    assert common.sample_count(1e-3, 10) == 100  # 0.1 s of 1 ms steps
    assert common.sample_count(1e-6, 10) == common.MAX_REPEAT
    assert common.sample_count(0.05, 10) == 10  # 0.5 s: as asked
    assert common.sample_count(0.25, 10) == 8  # 2.5 s asked: 2 s of them
    assert common.sample_count(0.6, 10) == 3 and common.sample_count(5.0, 10) == 3
    assert common.sample_count(5.0, 2) == 2  # never more than asked
    calls = []

    def step():
        calls.append(None)

    monkeypatch.setattr(common, "MIN_SECONDS", 0.0)
    seconds, count = common._median_time(step, CPU, warmup=1, repeat=3)
    assert count == 3 and len(calls) == 1 + 1 + 3 and seconds >= 0  # warm-up, sizing, samples
    monkeypatch.setattr(common, "MAX_REPEAT", 40)
    monkeypatch.setattr(common, "MIN_SECONDS", 10.0)
    _, count = common._median_time(step, CPU, warmup=0, repeat=3)
    assert count == 40
    monkeypatch.setattr(common, "MIN_SECONDS", 0.1)
    monkeypatch.setattr(common, "MAX_SECONDS", 0.02)
    _, count = common._median_time(lambda: time.sleep(0.01), CPU, warmup=0, repeat=10)
    assert count == common.MIN_SLOW_SAMPLES
    x = torch.rand(8, requires_grad=True)
    row = common.measure(common.Workload(lambda: (x * x).sum(), [x]), "full", CPU, warmup=0, repeat=2)
    assert 2 <= row["samples"] <= 40 and "timing" not in row  # CPU rows: a synchronised clock
    label = common.case_label(dict(row, suite="s", provider="p", mode="full"))
    assert "samples" not in label


def test_timing_must_be_known():
    with pytest.raises(ValueError, match="timing"):
        common._median_time(lambda: None, CPU, warmup=0, repeat=1, timing="async")


def test_table_header_names_the_gpu_timing():
    row = dict(suite="masked_crf", provider="reference", mode="full", device="NVIDIA X", device_type="cuda",
               torch="2", git="abc", date="2026-11-27T00:00:00Z", median_ms=1.0, peak_mib=1.0)
    assert "each after a synchronisation" in report.markdown_table([row])  # rows from before "timing"
    assert "queued ahead" in report.markdown_table([dict(row, timing="queued")])
    assert "CUDA-event" not in report.markdown_table([dict(row, device_type="cpu")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("timing", common.TIMINGS)
def test_gpu_timings_measure_the_kernels(timing):
    """A GPU-bound step (matmuls of a few ms): either timing gives its kernel time, within 25 % of
    the time of the same chain measured by one pair of events around 20 steps."""
    a = torch.randn(4096, 4096, device="cuda")

    def step():
        for _ in range(4):
            a @ a

    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        step()
    end.record()
    end.synchronize()
    per_step = start.elapsed_time(end) / 20 / 1e3
    seconds, count = common._median_time(step, torch.device("cuda"), warmup=1, repeat=5, timing=timing)
    assert count >= 5
    assert 0.75 * per_step <= seconds <= 1.25 * per_step


def test_rows_record_attention_tiles_set_for_a_tuning_run(monkeypatch, tmp_path):
    """A tuning run's tiles are recorded where they apply (the GPU, suites running the Triton
    attention), go to a file of their own (never replacing the default tiles' results) and head
    the table."""
    from attenscribble_ops.triton import spatial_attention

    assert common.TILES_VARIABLE == spatial_attention.TILES_VARIABLE
    gpu = torch.device("cuda")
    assert common.tuning_tiles("attention", gpu) is None
    monkeypatch.setenv(common.TILES_VARIABLE, "64x32x4,64x32x4,32x32x8x1")
    assert common.tuning_tiles("attention", gpu) == "64x32x4,64x32x4,32x32x8x1"
    assert common.tuning_tiles("masked_crf", gpu) is None and common.tuning_tiles("attention", CPU) is None
    rows = common.run_suite(CRF, CPU, quick=True, modes=["full"], providers=["reference"], warmup=0, repeat=1,
                            log=lambda line: None)
    assert all("attention_tiles" not in r for r in rows)
    row = dict(common.environment(CPU), suite="attention", provider="triton", mode="full", median_ms=1.0,
               peak_mib=1.0, attention_tiles="64x32x4,64x32x4,32x32x8x1")
    assert "attention_tiles" not in common.case_label(row)
    assert "Triton attention tiles 64x32x4,64x32x4,32x32x8x1" in report.markdown_table([row])
    plain = common.write_results([dict(row, attention_tiles=None)], "attention", CPU, str(tmp_path), csv=False)
    tuned = common.write_results([row], "attention", CPU, str(tmp_path), csv=False)
    assert plain != tuned and "tiles-64x32x4-64x32x4-32x32x8x1" in tuned
    assert os.path.exists(plain) and os.path.exists(tuned)
