"""Benchmark of the attentive similarity loss and the spatial attention it hands its LSE to.

Providers x shapes x modes, median time and peak extra memory, one JSON row per measurement with
the machine, library versions and git revision. Workloads:

  loss   attentive_similarity_loss from given q, k (the official "ASL from given Q, K")
  block  spatial_attention(q, k, v, tie_qk=True) + the loss with q, k and the LSE handed over,
         backward through both (the attention part of the SSA block plus the loss)
  sdpa   torch's scaled_dot_product_attention alone (the reference point for the GPU target)

Modes: forward (autograd recording), backward (the backward alone, graph retained), full (both;
also the one whose peak memory is recorded: bytes allocated beyond the inputs, outputs and
gradients included). On the CPU every (provider, workload, shape) runs in a fresh process with a
fixed malloc mmap threshold, so freed blocks go back to the system and the resident-set peak
tracks live memory (attenscribble_ops.testing.peak_memory).

Examples:
    python benchmarks/bench_attentive_similarity.py --device cpu --providers reference,cpu \\
        --shapes B12-g64-D64-h1 --workloads loss,block --out benchmarks/results/cpu.jsonl
    python benchmarks/bench_attentive_similarity.py --device cuda --providers reference,cuda,triton,sdpa
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import attenscribble_ops as A  # noqa: E402
from attenscribble_ops.testing import make_similarity_inputs, peak_memory, time_it  # noqa: E402

SHAPE_RE = re.compile(r"B(\d+)-g(\d+)(?:x(\d+))?-D(\d+)-h(\d+)$")
DEFAULT_SHAPES = "B12-g64-D64-h1,B12-g64-D64-h4,B12-g128-D64-h1"
# Above this (tokens x heads) the dense reference needs more memory than a 24 GiB machine has
# (official figures, H100: 13.1 GiB at 4 heads, 61.5 GiB at 128 x 128): not attempted.
REFERENCE_MAX_TOKENS_X_HEADS = 4096 * 2


def parse_shape(name: str) -> dict:
    m = SHAPE_RE.match(name)
    if not m:
        raise SystemExit(f"bad shape {name!r}; expected e.g. B12-g64-D64-h1 or B2-g13x64-D32-h2")
    b, h, w, d, heads = m.groups()
    return dict(batch=int(b), h=int(h), w=int(w or h), dim=int(d), heads=int(heads))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # results files being appended to do not make the measured code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        rev += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(device_name=torch.cuda.get_device_name() if device == "cuda" else cpu_model(), torch=torch.__version__,
               cuda=torch.version.cuda, triton=triton_version, git=rev, threads=torch.get_num_threads())
    if device == "cuda":
        env["tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def build(workload: str, provider: str, shape: dict, device: str, dtype: torch.dtype):
    """Inputs and three closures: forward() -> outputs, backward(outputs), full()."""
    grid = (shape["h"], shape["w"])
    x = make_similarity_inputs(shape["batch"], shape["heads"], grid, shape["dim"], probs_factor=4, dtype=dtype,
                               device=device)
    q, k = x["q"].requires_grad_(), x["k"].requires_grad_()
    probs = x["probs"].requires_grad_()
    hw, hb = x["head_weight"].requires_grad_(), x["head_bias"].requires_grad_()
    v = torch.randn_like(q).requires_grad_()
    grad_out = torch.randn_like(q)
    leaves = (q, k, v, probs, hw, hb)
    backend = "reference" if provider == "reference-compiled" else provider

    def loss_fn(q, k, probs, hw, hb):
        return A.attentive_similarity_loss(q, k, probs, hw, hb, grid=grid, backend=backend)

    def block_fn(q, k, v, probs, hw, hb):
        # as SpatialSelfAttention does: q, k tied to the attention node, LSE handed over
        out, lse, q, k = A.spatial_attention(q, k, v, backend=backend, tie_qk=True)
        return out, A.attentive_similarity_loss(q, k, probs, hw, hb, grid=grid, lse=lse, backend=backend)

    if provider == "reference-compiled":
        loss_fn, block_fn = torch.compile(loss_fn), torch.compile(block_fn)

    if workload == "loss":
        def forward():
            return (loss_fn(q, k, probs, hw, hb),), (None,)
    elif workload == "block":
        def forward():
            out, loss = block_fn(q, k, v, probs, hw, hb)
            return (out, loss), (grad_out, None)
    else:
        def forward():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return (out,), (grad_out,)

    def backward(result, retain=False):
        outputs, grads = result
        torch.autograd.backward(outputs, grads, retain_graph=retain)

    def clear():
        for t in leaves:
            t.grad = None

    def full():
        backward(forward())
        clear()

    return forward, backward, full, clear


def measure(workload, provider, shape_name, device, dtype, modes, repeat) -> list[dict]:
    shape = parse_shape(shape_name)
    forward, backward, full, clear = build(workload, provider, shape, device, dtype)
    rows = []
    base = dict(workload=workload, provider=provider, shape=shape_name, dtype=str(dtype).replace("torch.", ""),
                **shape)
    for mode in modes:
        if mode == "forward":
            with torch.enable_grad():
                seconds = time_it(forward, device, warmup=1, repeat=repeat)
            rows.append(dict(base, mode=mode, median_ms=1e3 * seconds))
        elif mode == "backward":
            result = forward()
            backward(result, retain=True)  # warm-up
            clear()
            times = []
            for _ in range(repeat):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                backward(result, retain=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                clear()
            del result
            times.sort()
            rows.append(dict(base, mode=mode, median_ms=1e3 * times[len(times) // 2]))
        elif mode == "full":
            peak = peak_memory(full, device)  # first call: also the warm-up of the timing below
            seconds = time_it(full, device, warmup=0, repeat=repeat)
            rows.append(dict(base, mode=mode, median_ms=1e3 * seconds,
                             peak_mib=None if peak is None else peak / 2 ** 20))
    return rows


def run_isolated(args, workload, provider, shape) -> list[dict]:
    """One (workload, provider, shape) in a fresh process: clean allocator state for the memory peak."""
    cmd = [sys.executable, os.path.abspath(__file__), "--single", "--device", args.device, "--dtype", args.dtype,
           "--providers", provider, "--workloads", workload, "--shapes", shape, "--modes", args.modes,
           "--repeat", str(args.repeat)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return [dict(workload=workload, provider=provider, shape=shape, error=proc.stderr.strip()[-2000:])]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def skip_reason(workload, provider, shape_name, device) -> str | None:
    shape = parse_shape(shape_name)
    if workload == "sdpa" and provider not in ("sdpa",):
        return "the sdpa workload has only the sdpa provider"
    if provider == "sdpa" and workload != "sdpa":
        return "sdpa runs the sdpa workload only"
    if provider.startswith("reference") and shape["h"] * shape["w"] * shape["heads"] > REFERENCE_MAX_TOKENS_X_HEADS:
        return "the dense reference needs tens of GiB at this size"
    if provider in ("cpu", "cuda", "triton") and device == "cpu" and provider != "cpu":
        return f"{provider} does not run CPU tensors natively"
    return None


def table(path: str, latest: bool = False) -> str:
    """A markdown table of saved rows (the docs' tables are generated with this, never typed).
    latest: only the last row of each (workload, shape, dtype, provider, mode)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if latest:
        last = {}
        for r in rows:
            last[(r.get("workload"), r.get("shape"), r.get("dtype"), r.get("provider"), r.get("mode"))] = r
        rows = [r for r in rows if last[(r.get("workload"), r.get("shape"), r.get("dtype"), r.get("provider"),
                                        r.get("mode"))] is r]
    lines = ["| workload | shape | provider | mode | median ms | peak extra MiB | device | threads | load | git |",
             "|---|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['shape']} | {r['provider']} | error | | | | | | |")
            continue
        peak = "" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"
        load = "" if r.get("load_average") is None else f"{r['load_average']:.1f}"
        lines.append(f"| {r['workload']} | {r['shape']} {r['dtype']} | {r['provider']} | {r['mode']} | "
                     f"{r['median_ms']:.1f} | {peak} | {r['device_name']} | {r['threads']} | {load} | {r['git']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", default=None, help="comma list: reference, reference-compiled, cpu, cuda, "
                        "triton, sdpa (default: reference and the device's fused backends)")
    parser.add_argument("--workloads", default="loss,block")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--modes", default="forward,backward,full")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    parser.add_argument("--table", default=None, help="print a markdown table of a results file and exit")
    parser.add_argument("--latest", action="store_true", help="with --table: the last row per measurement only")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(args.table, args.latest))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat is None:
        args.repeat = 3 if args.device == "cpu" else 20
    dtype = getattr(torch, args.dtype)
    providers = args.providers.split(",") if args.providers else (
        ["reference", "cpu"] if args.device == "cpu" else ["reference", "cuda", "triton", "sdpa"])
    modes = args.modes.split(",")
    env = environment(args.device)
    rows = []
    for workload in args.workloads.split(","):
        for shape in args.shapes.split(","):
            for provider in providers:
                reason = skip_reason(workload, provider, shape, args.device)
                if reason:
                    if not args.single:
                        print(f"skip {workload}/{provider}/{shape}: {reason}", file=sys.stderr)
                    continue
                if args.single:
                    for row in measure(workload, provider, shape, args.device, dtype, modes, args.repeat):
                        print(json.dumps(row), flush=True)
                    continue
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                measured = run_isolated(args, workload, provider, shape) if args.device == "cpu" else \
                    measure(workload, provider, shape, args.device, dtype, modes, args.repeat)
                for row in measured:
                    row.update(env, load_average=load, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out and rows:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
