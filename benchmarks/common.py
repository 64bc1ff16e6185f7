"""Shared benchmark machinery: the environment every result row carries, timing and peak memory of
forward / backward / full (forward + backward), result files and the comparison table.

A suite module (bench_<op>.py) defines ``SUITE = Suite(name, cases, providers, build)`` where
``build(provider, case, device)`` returns a :class:`Workload` or raises :class:`Unavailable`.
Suites run from the one-command runner (``python -m benchmarks``) and from pytest-benchmark
(``pytest benchmarks``) through the same builders.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import statistics
import subprocess
import time
from typing import Callable, ContextManager, Iterable, Optional, Sequence

import torch

from attenscribble_ops.testing import device_name, peak_memory

MODES = ("forward", "backward", "full")

# The "backward" mode replays one graph's backward (retain_graph=True); compiled backwards that
# donate their buffers refuse that. Donation saves memory in the compiled reference, so the "full"
# mode (what the tables compare) is measured with it on, the other modes without.
import torch._functorch.config  # noqa: E402

_DONATED_BUFFER = getattr(torch._functorch.config, "donated_buffer", None)
TILES_VARIABLE = "ATTENSCRIBBLE_TRITON_ATTENTION_TILES"  # read without importing Triton
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Unavailable(Exception):
    """A provider cannot run this case here (the message says why); the row records it."""


@dataclasses.dataclass
class Workload:
    """``forward()`` returns a scalar loss (or a tensor; its sum is differentiated) built from
    ``leaves``, the tensors whose gradients the backward computes. With ``grad_outputs``,
    ``forward()`` returns a tuple of outputs and the backward seeds them with these gradients
    (None: a scalar output seeded with 1). ``after_backward`` runs after each backward of the
    "full" mode (e.g. an optimizer step); ``modes`` limits the modes the workload has; ``context()``,
    if given, is entered around each of its measurements (timing and memory alike)."""

    forward: Callable[[], object]
    leaves: Sequence[torch.Tensor]
    info: dict = dataclasses.field(default_factory=dict)  # recorded in the row (e.g. input sizes)
    grad_outputs: Optional[Sequence[Optional[torch.Tensor]]] = None
    after_backward: Optional[Callable[[], None]] = None
    modes: Sequence[str] = MODES
    context: Optional[Callable[[], ContextManager]] = None  # entered around every measurement (e.g. a precision)

    def backward(self, result, retain_graph: bool = False) -> None:
        if self.grad_outputs is None:
            result.sum().backward(retain_graph=retain_graph)
            return
        pairs = [(o, g) for o, g in zip(result, self.grad_outputs)]
        outputs = [o if g is not None else o.sum() for o, g in pairs]
        grads = [g for _, g in pairs]
        torch.autograd.backward(outputs, [g if g is not None else None for g in grads], retain_graph=retain_graph)


@dataclasses.dataclass
class Suite:
    name: str
    cases: Callable[[bool, str], list[dict]]          # (quick, device_type) -> case dicts
    providers: Callable[[str], list[str]]             # device_type -> provider names
    build: Callable[[str, dict, torch.device], Workload]
    reference: str = "reference"
    modes: Sequence[str] = MODES                      # the modes this suite has


@functools.lru_cache(maxsize=None)
def _git_revision() -> str:
    """The checkout's revision (+dirty), or ATTENSCRIBBLE_GIT_REVISION where the tree has no .git
    (the GPU machine receives a copy of the working tree without it)."""
    if os.environ.get("ATTENSCRIBBLE_GIT_REVISION"):
        return os.environ["ATTENSCRIBBLE_GIT_REVISION"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed or broken: recorded, not fatal
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "git": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


# How the GPU rows are timed (recorded in each row as "timing"):
# "queued": launches queued ahead, one pair of CUDA events around each iteration and one
#   synchronisation at the end, as triton.testing.do_bench and torch.utils.benchmark time GPU work.
#   An iteration's host work overlaps the kernels of the one before, as in a training loop, so a
#   sample is the iteration's GPU time, or the host time between its two events (its Python and
#   launches up to the last) where that is longer.
# "synced": a synchronisation before each iteration (results up to git 1ca6462b42b4). Every
#   sample then also holds the host path up to the first launch, which dominates sub-millisecond
#   workloads (a masked CRF forward: 161 us of Python and launches on the development machine).
TIMINGS = ("queued", "synced")
# A row takes ``repeat`` samples, and as many more as add up to about MIN_SECONDS (at most
# MAX_REPEAT): a 1 ms step takes 100, so that short rows are not a median of ten samples of launch
# jitter. A slow row whose ``repeat`` samples would take more than MAX_SECONDS takes as many as fit
# in it, at least MIN_SLOW_SAMPLES: a 0.6 s step 3 instead of 10, so that a lent GPU's few minutes
# go to more rows (a long GPU step varies little from sample to sample).
MIN_SECONDS = 0.1
MAX_REPEAT = 500
MAX_SECONDS = 2.0
MIN_SLOW_SAMPLES = 3


def sample_count(estimate: float, repeat: int) -> int:
    """Samples of a step that took ``estimate`` seconds once (MIN_SECONDS and MAX_SECONDS above)."""
    if estimate <= 0:  # below the clock's resolution: the most samples
        return max(repeat, MAX_REPEAT)
    if estimate * repeat > MAX_SECONDS:
        return min(repeat, max(MIN_SLOW_SAMPLES, int(MAX_SECONDS / estimate)))
    return max(repeat, min(MAX_REPEAT, int(MIN_SECONDS / estimate)))


def _median_time(step: Callable[[], None], device: torch.device, warmup: int, repeat: int,
                 setup: Optional[Callable[[], None]] = None, timing: str = "queued") -> tuple[float, int]:
    """(median seconds of ``step``, samples taken): CUDA events on the GPU (``timing`` above), a
    synchronised clock on the CPU. ``repeat`` samples, more for short steps and fewer for slow ones
    (:func:`sample_count`)."""
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    for _ in range(warmup):
        if setup:
            setup()
        step()
    _sync(device)
    if setup:
        setup()
    t0 = time.perf_counter()
    step()  # one more, timed on the host, to size the run
    _sync(device)
    estimate = time.perf_counter() - t0
    count = sample_count(estimate, repeat)
    if device.type != "cuda":
        times = []
        for _ in range(count):
            if setup:
                setup()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), count
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    for start, end in events:
        if setup:
            setup()
        if timing == "synced":
            _sync(device)
        start.record()
        step()
        end.record()
        if timing == "synced":
            end.synchronize()
    _sync(device)
    return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events), count


def steps(work: Workload):
    """``(forward, backward, full, state)``: the callables each mode times (shared by the runner
    and pytest-benchmark). ``backward`` replays the graph of the last ``forward``."""
    state = {}

    def forward():
        state["loss"] = work.forward()

    def backward():
        work.backward(state["loss"], retain_graph=True)

    def full():
        _clear_grads(work.leaves)
        work.backward(work.forward())
        if work.after_backward is not None:
            work.after_backward()

    return forward, backward, full, state


def measure(work: Workload, mode: str, device: torch.device, *, warmup: int, repeat: int,
            timing: str = "queued") -> dict:
    """Median time (ms), samples taken and peak extra memory (MiB) of one mode of a workload."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "full" and _DONATED_BUFFER is not None:
        torch._functorch.config.donated_buffer = False
    try:
        with work.context() if work.context is not None else contextlib.nullcontext():
            return _measure_mode(work, mode, device, warmup, repeat, timing)
    finally:
        if _DONATED_BUFFER is not None:
            torch._functorch.config.donated_buffer = _DONATED_BUFFER


def _measure_mode(work: Workload, mode: str, device: torch.device, warmup: int, repeat: int, timing: str) -> dict:
    leaves = work.leaves
    forward, backward, full, state = steps(work)
    try:
        if mode == "forward":
            seconds, count = _median_time(forward, device, warmup, repeat, timing=timing)
            peak = peak_memory(forward, device)
        elif mode == "backward":
            forward()
            seconds, count = _median_time(backward, device, warmup, repeat, setup=lambda: _clear_grads(leaves),
                                          timing=timing)
            _clear_grads(leaves)
            peak = peak_memory(backward, device)
        else:
            seconds, count = _median_time(full, device, warmup, repeat, timing=timing)
            _clear_grads(leaves)
            peak = peak_memory(full, device)
    finally:
        state.clear()
    return {"median_ms": seconds * 1e3, "samples": count, "peak_mib": None if peak is None else peak / 2**20,
            **({"timing": timing} if device.type == "cuda" else {})}


def tuning_tiles(suite_name: str, device: torch.device) -> Optional[str]:
    """The Triton attention's tiles set for a tuning run (TILES_VARIABLE), where they apply: on a
    GPU, in the suites that run that attention (all but the masked CRF's)."""
    tiles = os.environ.get(TILES_VARIABLE)
    return tiles if tiles and device.type == "cuda" and suite_name != "masked_crf" else None


def run_suite(suite: Suite, device: torch.device, *, quick: bool, modes: Iterable[str],
              providers: Optional[Sequence[str]] = None, warmup: int = 2, repeat: int = 10,
              timing: str = "queued", log: Callable[[str], None] = print,
              on_row: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Measure every case x provider x mode of ``suite``; ``on_row(rows)`` after each row (the
    command line saves the rows so far as partial results, so a run stopped by a time limit keeps
    what it measured)."""
    env = environment(device)
    tiles = tuning_tiles(suite.name, device)
    if tiles:  # recorded, and the results go to their own file (write_results)
        env["attention_tiles"] = tiles
    rows = []
    names = [p for p in suite.providers(device.type) if providers is None or p in providers]
    modes = [m for m in modes if m in suite.modes]
    for case in suite.cases(quick, device.type):
        for provider in names:
            for mode in modes:
                row = {"suite": suite.name, "provider": provider, "mode": mode, **case, **env}
                try:
                    work = suite.build(provider, case, device)
                    if mode not in work.modes:
                        raise Unavailable(f"this workload is timed in the modes {tuple(work.modes)} only")
                    row.update(work.info)
                    row.update(measure(work, mode, device, warmup=warmup, repeat=repeat, timing=timing))
                    grads = sum(t.numel() * t.element_size() for t in work.leaves) if mode != "forward" else 0
                    inputs = sum(t.numel() * t.element_size() for t in work.leaves)
                    if row["peak_mib"] is not None and inputs:
                        # the memory targets: extra beyond the gradients, in units of the inputs
                        row["extra_over_inputs"] = (row["peak_mib"] * 2**20 - grads) / inputs
                except Unavailable as exc:
                    row.update(median_ms=None, peak_mib=None, skipped=str(exc))
                except torch.cuda.OutOfMemoryError as exc:
                    row.update(median_ms=None, peak_mib=None, skipped=f"out of memory: {str(exc)[:120]}")
                finally:
                    work = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                log(format_row(row))
                if on_row is not None:
                    on_row(rows)
    return rows


def case_label(row: dict) -> str:
    skip = {"suite", "provider", "mode", "median_ms", "peak_mib", "skipped", "speedup", "memory_ratio",
            "extra_over_inputs", "series", "samples", "timing", "attention_tiles"}
    skip |= set(environment_keys())
    return " ".join(f"{k}={v}" for k, v in row.items() if k not in skip)


def environment_keys() -> tuple[str, ...]:
    return ("device", "device_type", "torch", "cuda", "triton", "git", "date")


def format_row(row: dict) -> str:
    if row.get("median_ms") is None:
        return f"  {row['provider']:<18} {row['mode']:<8} {case_label(row):<48} skipped: {row.get('skipped')}"
    mem = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.1f} MiB"
    return f"  {row['provider']:<18} {row['mode']:<8} {case_label(row):<48} {row['median_ms']:>10.3f} ms {mem:>12}"


def add_ratios(rows: list[dict], reference: str = "reference") -> list[dict]:
    """Speed-up and memory ratio of every row against the reference row of the same case and mode."""
    index = {(case_label(r), r["mode"]): r for r in rows if r["provider"] == reference and r.get("median_ms")}
    for r in rows:
        ref = index.get((case_label(r), r["mode"]))
        if ref and r.get("median_ms"):
            r["speedup"] = ref["median_ms"] / r["median_ms"]
            if ref.get("peak_mib") and r.get("peak_mib"):
                r["memory_ratio"] = r["peak_mib"] / ref["peak_mib"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'provider':<18} {'mode':<8} {'case':<48} {'median':>12} {'peak extra':>12} {'speed-up':>9} "
             f"{'memory':>8}"]
    for r in rows:
        if r.get("median_ms") is None:
            lines.append(f"{r['provider']:<18} {r['mode']:<8} {case_label(r):<48} skipped: {r.get('skipped')}")
            continue
        mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f} MiB"
        speed = f"{r['speedup']:.1f}x" if "speedup" in r else ""
        ratio = f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else ""
        lines.append(f"{r['provider']:<18} {r['mode']:<8} {case_label(r):<48} {r['median_ms']:>9.3f} ms "
                     f"{mem:>12} {speed:>9} {ratio:>8}")
    return "\n".join(lines)


def slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in keep.split("-") if part)[:60]


def dumps_rows(rows: list[dict]) -> str:
    """A JSON array with one row per line (diffs of committed results stay readable)."""
    return "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"


def write_results(rows: list[dict], suite: str, device: torch.device, out_dir: str = RESULTS_DIR,
                  csv: bool = True, partial: bool = False) -> str:
    """Write rows to ``<out_dir>/<suite>-<device slug>.json`` (and .csv); returns the JSON path.
    ``partial``: the rows of a run still going, to ``<...>.partial.json`` (JSON only), which the
    complete write removes; a run stopped by a time limit leaves it, and never overwrites complete
    results."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{suite}-{slug(device_name(device).split('(')[0])}")
    tiles = {r["attention_tiles"] for r in rows if r.get("attention_tiles")}
    if tiles:  # a tuning run never replaces the results of the default tiles
        stem += "-tiles-" + slug("-".join(sorted(tiles)))
    if partial:
        with open(stem + ".partial.json.tmp", "w") as f:
            f.write(dumps_rows(rows))
        os.replace(stem + ".partial.json.tmp", stem + ".partial.json")
        return stem + ".partial.json"
    with open(stem + ".json", "w") as f:
        f.write(dumps_rows(rows))
    if os.path.exists(stem + ".partial.json"):
        os.remove(stem + ".partial.json")
    if not csv:
        return stem + ".json"
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(stem + ".csv", "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(k) is None else str(r.get(k)).replace(",", ";") for k in keys) + "\n")
    return stem + ".json"
