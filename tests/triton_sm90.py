"""Compiles every Triton kernel of attenscribble_ops for an H100 (sm_90), on a machine with no GPU,
and checks that each compiled variant fits the card; ``--arch`` compiles for another card.

The Triton interpreter, which runs the Triton tests on the CPU, never compiles a kernel: a kernel
that the GPU compiler rejects (a ``tl.dot`` tile under 16, a layout it cannot lower, a dtype
mismatch inside a loop), or one that asks for more shared memory than a block may have, passes
there and fails only on a GPU. Here Triton compiles for real (Triton to PTX, then its bundled
ptxas to a cubin) for a stand-in driver that reports an H100 and launches nothing, while the
library's own launch paths run forward and backward on small CPU tensors, with the GPU's tile
sizes (``attenscribble_ops.triton._target.for_gpu``), in fp32 (the attention's dots as tf32x3, the
default, as tf32 and as exact "ieee"), fp16 and bf16 (and fp64 for the masked CRF). Checked for
every compiled variant:
  * shared memory within the 227 KiB (232448 bytes) a block may opt in to on an H100;
  * registers x threads within the 65536 registers of a multiprocessor;
and every ``*_kernel`` of the package must have compiled at least once. On cards with less shared
memory (``--arch sm_80``, ``sm_86``, ``sm_89``, ``sm_75``) a variant that does not fit is refused
by Triton before it launches, and the attention then launches smaller tiles
(``spatial_attention.launch_fitting``): there the check is that every case runs and every variant
that launched fits; the refused ones are listed. Reported, not checked:
each variant's registers and stack frame (bytes per thread; ptxas puts register spills there).

Run (TRITON_INTERPRET unset; a fresh TRITON_CACHE_DIR compiles every variant again):
    python tests/triton_sm90.py [--json resources.json] [--arch sm_89] [--only "^attention"]
Exit status 0 when everything compiled and fits; the table goes to stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("tests/triton_sm90.py compiles kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

# Per card: the shared memory a block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin),
# multiprocessors; every one has 65536 registers per multiprocessor and 1024 threads per block.
TARGETS = {
    "sm_90": ("NVIDIA H100 (sm_90)", 90, 232448, 132),
    "sm_80": ("NVIDIA A100 (sm_80)", 80, 166912, 108),
    "sm_86": ("NVIDIA A10 / A40 / RTX 30 (sm_86)", 86, 101376, 84),
    "sm_89": ("NVIDIA L4 / L40S / RTX 40 (sm_89)", 89, 101376, 142),
    "sm_75": ("NVIDIA T4 / RTX 20 (sm_75)", 75, 65536, 40),
}


def _card(arch: str) -> dict:
    name, capability, shared, sms = TARGETS[arch]
    return {"name": name, "capability": capability, "target": GPUTarget("cuda", capability, 32),
            "max_shared_mem": shared, "registers": 65536, "max_threads": 1024, "multiprocessors": sms}


H100 = _card("sm_90")  # the card compiled for: main() replaces its entries for --arch
LAUNCHED = set()  # hashes of the compiled kernels launched (refused ones never are)


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": H100["max_shared_mem"], "multiprocessor_count": H100["multiprocessors"],
                "max_num_regs": H100["registers"], "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 0, 0, H100["max_threads"]  # nothing is loaded: registers come from the cubin


class CompileOnlyDriver:
    """Triton's active driver, standing in for an H100: kernels compile for sm_90, launches do nothing."""
    utils = _Utils()

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return H100["target"]

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: LAUNCHED.add(metadata.hash)


ASKED = []  # the tensors whose tiles were asked for: empty if the launch paths stopped asking _target


def _gpu_mode():
    """The library's launch paths on CPU tensors, as on a GPU: the Triton backend accepted for CPU
    tensors (no interpreter), the GPU's tiles, and its checks judging the inputs as CUDA tensors
    (so no interpreter-only refusal of bf16, while the GPU's own refusals stay)."""
    from attenscribble_ops import backends
    from attenscribble_ops.triton import _target

    backends.triton_interpreting = lambda: True
    _target.for_gpu = lambda t: ASKED.append(t.shape) or True
    _target.tf32_tensor_cores = lambda t: H100["capability"] >= 80
    for key, entry in list(backends._REGISTRY.items()):
        if key[1] == "triton" and entry.check is not None:  # judged as for CUDA tensors
            as_cuda = (lambda meta, check=entry.check: check(dataclasses.replace(meta, device_type="cuda")))
            backends._REGISTRY[key] = dataclasses.replace(entry, check=as_cuda)


def _crf_case(dtype, classes, shape, radius, *, channels=1, compat=False, mask_src=False, padding="zeros",
              grad=True):
    import attenscribble_ops as ao
    from attenscribble_ops.testing import make_crf_inputs

    d = make_crf_inputs(2, classes, shape, channels=channels, dtype=dtype, seed=1)
    probs = d["probs"].requires_grad_(grad)
    mu = (1.0 - torch.eye(classes)) if compat else None
    loss = ao.masked_crf_loss(probs, d["image"], radius=radius, mask_dst=d["mask_dst"],
                              mask_src=d["mask_dst"] if mask_src else None, compatibility=mu, padding=padding,
                              backend="triton")
    if grad:
        loss.backward()


def _similarity_case(dtype, heads, dim, *, fused, weighted, grid=(9, 12)):
    import attenscribble_ops as ao
    from attenscribble_ops.testing import make_similarity_inputs

    x = make_similarity_inputs(2, heads, grid, dim, dtype=dtype, seed=2)
    leaves = [x[n].requires_grad_() for n in ("q", "k", "probs", "head_weight", "head_bias")]
    lse = None
    if not fused:  # the window loss with a given normaliser (the block's)
        leaf = torch.randn(2, heads, grid[0] * grid[1], dtype=torch.float32).requires_grad_()
        leaves.append(leaf)
        lse = leaf * 1.0  # with autograd history, as an attention's (a leaf LSE would be recomputed)
    g = torch.tensor([1.0, 0.5], dtype=dtype) if weighted else None
    loss = ao.attentive_similarity_loss(*leaves[:5], grid=x["grid"], sample_weight=g, lse=lse, backend="triton")
    torch.autograd.grad(loss, leaves)


def _attention_case(dtype, heads, dim, dim_v, grid=(9, 12)):
    import attenscribble_ops as ao
    from attenscribble_ops.testing import make_similarity_inputs

    n = grid[0] * grid[1]
    x = make_similarity_inputs(2, heads, grid, dim, dtype=dtype, seed=3)
    q, k = x["q"].requires_grad_(), x["k"].requires_grad_()
    v = torch.randn(2, heads, n, dim_v, dtype=dtype).requires_grad_()
    out, lse = ao.spatial_attention(q, k, v, backend="triton")  # separate q, k gradients
    torch.autograd.grad(out.float().sum() + lse.sum(), [q, k, v])
    out, lse, qt, kt = ao.spatial_attention(q, k, v, backend="triton", tie_qk=True)  # accumulated into
    loss = ao.attentive_similarity_loss(qt, kt, x["probs"], x["head_weight"], x["head_bias"], grid=x["grid"],
                                        lse=lse, backend="triton")
    torch.autograd.grad(loss + out.float().sum(), [q, k, v])


def cases():
    """(name, thunk): the launch paths of the three ops, in each dtype (for fp32 the attention's
    dots in each precision: tf32x3 by default, tf32 where torch allows TF32, exact "ieee"). Token
    counts of 108 and 256: Triton specialises on sizes divisible by 16, so the two compile
    differently."""
    out = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        out += [
            (f"crf 2-D C=4 r=5 {tag}", lambda dt=dtype: _crf_case(dt, 4, (37, 29), 5)),
            (f"crf 2-D C=4 r=5 valid, no grad {tag}",
             lambda dt=dtype: _crf_case(dt, 4, (37, 29), 5, padding="valid", grad=False)),
            (f"crf 2-D C=2 RGB mask_src {tag}",
             lambda dt=dtype: _crf_case(dt, 2, (21, 40), 3, channels=3, mask_src=True)),
            (f"crf 2-D C=16 compatibility {tag}", lambda dt=dtype: _crf_case(dt, 16, (19, 23), 2, compat=True)),
            (f"crf 3-D C=3 r=(1,3,3) {tag}", lambda dt=dtype: _crf_case(dt, 3, (5, 17, 15), (1, 3, 3))),
            (f"similarity fused 1 head D=16 {tag}",
             lambda dt=dtype: _similarity_case(dt, 1, 16, fused=True, weighted=False)),
            (f"similarity window 4 heads D=64 weighted {tag}",
             lambda dt=dtype: _similarity_case(dt, 4, 64, fused=False, weighted=True)),
            (f"similarity fused 2 heads D=64 16x16 {tag}",
             lambda dt=dtype: _similarity_case(dt, 2, 64, fused=True, weighted=False, grid=(16, 16))),
        ]
        shapes = [(2, 64, 64, (9, 12), None), (2, 64, 64, (16, 16), None), (1, 128, 32, (9, 12), None),
                  (1, 128, 128, (16, 16), None), (1, 16, 8, (9, 12), None)]
        if dtype == torch.float32:  # the default fp32 dots are tf32x3; tf32 and exact fp32 (ieee) too
            shapes += [(2, 64, 64, (16, 16), dot) for dot in ("tf32", "ieee")]
            shapes += [(1, 128, 128, (16, 16), dot) for dot in ("tf32", "ieee")]
        for heads, dim, dim_v, grid, dot in shapes:
            name = f"attention {heads} head(s) D={dim} Dv={dim_v} {grid[0]}x{grid[1]} {dot or tag}"
            out.append((name, lambda dt=dtype, a=(heads, dim, dim_v, grid), t=dot:
                        _fp32_dot(t, _attention_case, dt, *a)))
    out += [
        ("crf 2-D C=4 r=5 fp64", lambda: _crf_case(torch.float64, 4, (37, 29), 5)),
        ("crf 2-D C=4 r=5 64x64 (interior tiles) fp32", lambda: _crf_case(torch.float32, 4, (64, 64), 5)),
        ("crf 2-D C=4 r=5 int64 offsets fp32", lambda: _int64_offsets(_crf_case, torch.float32, 4, (37, 29), 5)),
        ("crf 2-D C=2 4 image channels 64x64 fp32",
         lambda: _crf_case(torch.float32, 2, (64, 64), 2, channels=4, mask_src=True)),
        ("crf 3-D C=3 r=(1,3,3) fp64", lambda: _crf_case(torch.float64, 3, (5, 17, 15), (1, 3, 3))),
        ("crf 2-D C=64 compatibility fp32", lambda: _crf_case(torch.float32, 64, (9, 11), 1, compat=True)),
    ]
    return out


def _int64_offsets(fn, *args):
    """Run ``fn`` with the masked CRF kernel indexing in int64, as it does for samples of 2^31
    elements or more."""
    from attenscribble_ops.triton import masked_crf

    before = masked_crf._INT32_OFFSETS_BELOW
    masked_crf._INT32_OFFSETS_BELOW = 1
    try:
        fn(*args)
    finally:
        masked_crf._INT32_OFFSETS_BELOW = before


def _fp32_dot(dot, fn, *args):
    """Run ``fn`` with the fp32 dots ``dot`` ("tf32": torch's fp32 matmuls allowed TF32; "ieee":
    forced exact) or, for None, the default (tf32x3)."""
    from attenscribble_ops import backends
    from attenscribble_ops.testing import cuda_matmul_fp32

    before = backends.triton_fp32_dot
    backends.triton_fp32_dot = "ieee" if dot == "ieee" else None
    try:
        with cuda_matmul_fp32("tf32" if dot == "tf32" else "ieee"):
            fn(*args)
    finally:
        backends.triton_fp32_dot = before


def package_kernels() -> dict:
    """Every ``*_kernel`` JITFunction of attenscribble_ops.triton (the helpers they call are inlined)."""
    from attenscribble_ops.triton import attentive_similarity, masked_crf, spatial_attention

    return {name: obj for module in (masked_crf, spatial_attention, attentive_similarity)
            for name, obj in vars(module).items()
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}


def _cuobjdump() -> str:
    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not bundled.exists():
        sys.exit(f"no cuobjdump at {bundled} (Triton's NVIDIA backend tools)")
    return str(bundled)


def _registers_and_stack(cubin: bytes, tool: str) -> tuple[int, int]:
    """REG and STACK (bytes of stack frame per thread, where ptxas puts register spills) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    reg, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    if reg is None or stack is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG/STACK:\n{text}")
    return int(reg.group(1)), int(stack.group(1))


def _variant(kernel) -> str:
    """The first pointer's dtype, the kernel's constexpr parameters, and the arguments Triton
    specialised as divisible by 16 (pointers and sizes): each combination is its own cubin."""
    src = kernel.src
    names = src.fn.arg_names
    pointer = next((f"{n}:{t}" for n, t in src.signature.items() if str(t).startswith("*")), "")
    values = {names[path[0]]: v for path, v in src.constants.items()
              if len(path) == 1 and src.signature.get(names[path[0]]) == "constexpr"}
    specialised = sorted(names[path[0]] for path, attr in src.attrs.items() if len(path) == 1 and attr)
    return " ".join([pointer] + [f"{k}={v}" for k, v in values.items()] + [f"div16:{','.join(specialised)}"])


def compiled_variants() -> list[dict]:
    tool = _cuobjdump()
    rows = []
    for name, fn in sorted(package_kernels().items()):
        kernels = {k.metadata.hash: k for cache in fn.device_caches.values() for k in cache[0].values()}
        for kernel in kernels.values():
            md = kernel.metadata
            reg, stack = _registers_and_stack(kernel.asm["cubin"], tool)
            threads = md.num_warps * md.warp_size
            rows.append({
                "kernel": name, "variant": _variant(kernel), "num_warps": md.num_warps,
                "num_stages": md.num_stages, "shared_bytes": md.shared, "registers": reg, "stack_bytes": stack,
                "fits": md.shared <= H100["max_shared_mem"] and reg * threads <= H100["registers"]
                and threads <= H100["max_threads"], "launched": md.hash in LAUNCHED,
            })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the compiled variants and their resources here")
    parser.add_argument("--arch", choices=sorted(TARGETS), default="sm_90", help="the card to compile for")
    parser.add_argument("--only", help="only the cases whose name this regular expression matches (re.search)")
    args = parser.parse_args(argv)
    H100.update(_card(args.arch))

    driver.set_active(CompileOnlyDriver())
    import attenscribble_ops  # noqa: F401  (registers the Triton backend)

    _gpu_mode()
    failures = []
    start = time.perf_counter()
    for name, run in cases():
        if args.only and not re.search(args.only, name):
            continue
        t0 = time.perf_counter()
        try:
            run()
        except Exception as e:  # noqa: BLE001 - every case is reported, then the exit status says it
            failures.append(name)
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"compiled {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    rows = compiled_variants()
    print(f"\n{len(rows)} variants of {len(package_kernels())} kernels for {H100['name']}, "
          f"Triton {triton.__version__}, {time.perf_counter() - start:.0f} s")
    print(f"{'kernel':36} {'warps':>5} {'stages':>6} {'shared B':>9} {'regs':>5} {'stack B':>7}  variant")
    for r in rows:
        print(f"{r['kernel']:36} {r['num_warps']:5d} {r['num_stages']:6d} {r['shared_bytes']:9d} "
              f"{r['registers']:5d} {r['stack_bytes']:7d}  {r['variant']}"
              f"{'' if r['fits'] else '  DOES NOT FIT' + ('' if r['launched'] else ' (refused, smaller tiles ran)')}")
    missing = [] if args.only else sorted(set(package_kernels()) - {r["kernel"] for r in rows})
    unfit = [r for r in rows if not r["fits"] and r["launched"]]
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"target": H100["name"], "arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
             "failed_cases": failures, "missing_kernels": missing, "variants": rows}, indent=1))
    for k in missing:
        print(f"NOT COMPILED: {k} (no case launches it)")
    spilling = [r for r in rows if r["stack_bytes"] > 0]
    print(f"max shared {max(r['shared_bytes'] for r in rows)} B of {H100['max_shared_mem']}, "
          f"max registers {max(r['registers'] for r in rows)}, {len(spilling)} variants with a stack frame "
          f"(register spills), the largest {max([r['stack_bytes'] for r in spilling], default=0)} B per thread")
    if not ASKED:
        print("NO GPU TILES: no launch path asked attenscribble_ops.triton._target.for_gpu")
    return 1 if failures or missing or unfit or not ASKED else 0


if __name__ == "__main__":
    sys.exit(main())
