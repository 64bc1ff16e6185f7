"""Masked CRF loss benchmark: providers x shapes x modes, median time and peak extra memory.

    python benchmarks/bench_masked_crf.py                       # every provider that runs here
    python benchmarks/bench_masked_crf.py --providers cpu --shapes official official-r10 --modes full
    python benchmarks/bench_masked_crf.py --report benchmarks/results/<file>.json   # markdown table

Providers: "reference" (the unfold implementation, eager), "reference-compile" (the same under
torch.compile), and the fused backends "cpu", "cuda", "triton" (Triton only on a GPU: interpreter
timings mean nothing). Modes: "forward" (no autograd graph), "backward" (the backward of a
retained graph), "full" (forward + backward). Every row carries the device name, the library,
torch, CUDA and Triton versions and the git revision; results go to benchmarks/results/ as JSON
and CSV (named after the device) and a table is printed. Memory is the peak over what was
allocated before the call (CUDA allocator statistics; on CPUs the process's peak resident set,
coarser), reported with the size of probs so that the "extra beyond inputs and gradient" figure
can be read directly.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
from typing import Optional

import torch

import attenscribble_ops as ops
from attenscribble_ops import backends
from attenscribble_ops.testing import make_crf_inputs, peak_memory, time_it

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    classes: int
    spatial: tuple
    radius: object


# "official": the AttenScribble ACDC run (B = 12, 4 classes, 256^2, r = 5).
SHAPES = {
    "official": Shape(12, 4, (256, 256), 5),
    "official-r10": Shape(12, 4, (256, 256), 10),
    "small": Shape(2, 4, (128, 128), 5),
    "512": Shape(12, 4, (512, 512), 5),
    "3d": Shape(2, 4, (16, 128, 128), (2, 5, 5)),
}
PROVIDERS = ("reference", "reference-compile", "cpu", "cuda", "triton")
MODES = ("forward", "backward", "full")


def exact_cpu_memory() -> None:
    """Re-executes the script with a fixed glibc mmap threshold (Linux, once). glibc keeps freed
    heap memory resident and raises its mmap threshold after large frees, so later allocations
    reuse resident pages and the resident-set peak misses them; with a fixed threshold every
    allocation above 64 KiB is its own mapping, returned on free, and VmHWM follows the tensors."""
    if platform.system() == "Linux" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})


def reference_estimate_bytes(shape: Shape) -> int:
    """Peak of the unfold reference, about 2.5 window-sized copies of probs (float32)."""
    radius = shape.radius if isinstance(shape.radius, tuple) else (shape.radius,) * len(shape.spatial)
    window = math.prod(2 * r + 1 for r in radius)
    return int(2.5 * 4 * shape.batch * shape.classes * math.prod(shape.spatial) * window)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", text, re.M).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_type": device.type, "attenscribble_ops": ops.__version__,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "threads": torch.get_num_threads(), "git": git_revision(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def why_skip(provider: str, device: torch.device) -> Optional[str]:
    if provider in ("reference", "reference-compile"):
        return None
    if provider == "triton" and device.type != "cuda":
        return "Triton is timed on a GPU only (the CPU interpreter is a correctness tool)"
    return backends.why_not("masked_crf", provider, backends.Meta(device.type, torch.float32, 4))


def loss_function(provider: str, shape: Shape):
    backend = "reference" if provider.startswith("reference") else provider

    def loss(probs, image, mask_dst):
        return ops.masked_crf_loss(probs, image, mask_dst=mask_dst, radius=shape.radius, backend=backend)

    return torch.compile(loss) if provider == "reference-compile" else loss


def measure(provider: str, shape: Shape, mode: str, device: torch.device, repeat: int, warmup: int) -> dict:
    inputs = make_crf_inputs(shape.batch, shape.classes, shape.spatial, device=device)
    probs = inputs["probs"].requires_grad_(mode != "forward")
    loss_fn = loss_function(provider, shape)

    def forward():
        with torch.no_grad():
            loss_fn(probs, inputs["image"], inputs["mask_dst"])

    def full():
        probs.grad = None
        loss_fn(probs, inputs["image"], inputs["mask_dst"]).backward()

    if mode == "backward":
        graph = loss_fn(probs, inputs["image"], inputs["mask_dst"])

        def fn():
            probs.grad = None
            graph.backward(retain_graph=True)
    else:
        fn = forward if mode == "forward" else full
    fn()  # first call: compilation, lazy initialisation
    probs.grad = None  # so that the peak includes allocating the gradient
    memory = peak_memory(fn, device)
    seconds = time_it(fn, device, warmup=warmup, repeat=repeat)
    probs_bytes = probs.numel() * probs.element_size()
    grad_bytes = probs_bytes if mode != "forward" else 0
    row = {"provider": provider, "shape": shape_name(shape), "mode": mode, "batch": shape.batch,
           "classes": shape.classes, "spatial": "x".join(map(str, shape.spatial)), "radius": str(shape.radius),
           "dtype": "float32", "median_ms": seconds * 1e3, "peak_extra_bytes": memory, "probs_bytes": probs_bytes,
           "extra_beyond_grad_over_probs": None if memory is None else (memory - grad_bytes) / probs_bytes,
           "repeat": repeat}
    del fn
    return row


def shape_name(shape: Shape) -> str:
    return next((k for k, v in SHAPES.items() if v == shape), "custom")


def write(rows: list, env: dict, tag: str) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", env["device"].split(" (")[0]).strip("_")
    stem = RESULTS / f"masked_crf_{env['device_type']}_{slug}{tag}"
    full_rows = [{**env, **row} for row in rows]
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows, "speedups": speedups(rows)},
                                                    indent=2) + "\n")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(full_rows[0]))
        writer.writeheader()
        writer.writerows(full_rows)
    return stem


def speedups(rows: list) -> list:
    """Median time of the eager reference over each provider's, per shape and mode."""
    ref = {(r["shape"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "reference"}
    return [{"provider": r["provider"], "shape": r["shape"], "mode": r["mode"],
             "speedup_vs_reference": ref[(r["shape"], r["mode"])] / r["median_ms"]}
            for r in rows if r["provider"] != "reference" and (r["shape"], r["mode"]) in ref]


def report(path: str) -> str:
    """A markdown table of a saved result file (the tables in docs/ are pasted from this)."""
    data = json.loads(pathlib.Path(path).read_text())
    env = data["environment"]
    speed = {(r["provider"], r["shape"], r["mode"]): r["speedup_vs_reference"] for r in data["speedups"]}
    lines = [f"{env['device']}, torch {env['torch']}, git {env['git']}, {env['date']}", "",
             "| shape | provider | mode | median ms | x reference | peak extra MiB | extra beyond grad / probs |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        mem = r["peak_extra_bytes"]
        ratio = r["extra_beyond_grad_over_probs"]
        sp = speed.get((r["provider"], r["shape"], r["mode"]))
        lines.append(f"| {r['shape']} ({r['spatial']}, B={r['batch']}, C={r['classes']}, r={r['radius']}) | "
                     f"{r['provider']} | {r['mode']} | {r['median_ms']:.1f} | {'' if sp is None else f'{sp:.1f}'} | "
                     f"{'n/a' if mem is None else f'{mem / 2 ** 20:.1f}'} | "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--shapes", nargs="+", default=["official", "official-r10"], choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reference-limit-gib", type=float, default=8.0,
                        help="skip the reference providers where their estimated peak memory is above this")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--report", metavar="JSON", help="print a markdown table of a saved result file and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    device = torch.device(args.device)
    if device.type == "cpu":
        exact_cpu_memory()
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | git {env['git']}", flush=True)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        for provider in args.providers:
            reason = why_skip(provider, device)
            estimate = reference_estimate_bytes(shape) / 2 ** 30
            if reason is None and provider.startswith("reference") and estimate > args.reference_limit_gib:
                reason = f"its estimated {estimate:.1f} GiB exceed --reference-limit-gib {args.reference_limit_gib}"
            if reason is not None:
                print(f"  skip {provider} on {name}: {reason}", flush=True)
                continue
            for mode in args.modes:
                row = measure(provider, shape, mode, device, args.repeat, args.warmup)
                rows.append(row)
                mem = row["peak_extra_bytes"]
                print(f"  {name:13s} {provider:18s} {mode:8s} {row['median_ms']:10.2f} ms  peak extra "
                      f"{'n/a' if mem is None else f'{mem / 2 ** 20:9.1f} MiB'}  (probs {row['probs_bytes'] / 2 ** 20:.0f}"
                      f" MiB)", flush=True)
    for s in speedups(rows):
        print(f"  speedup {s['provider']:18s} {s['shape']:13s} {s['mode']:8s} {s['speedup_vs_reference']:8.1f}x")
    if rows:
        print(f"written {write(rows, env, args.tag)}.{{json,csv}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
