"""The Triton kernels as a GPU runs them, checked on a machine with no GPU.

* Every kernel compiles for an H100 (sm_90) in every dtype and variant the library launches, and
  each compiled variant fits the card (tests/triton_sm90.py, in a fresh process without the
  interpreter). The interpreter, which runs the other Triton tests here, never compiles: a kernel
  the GPU compiler rejects passes there.
* The GPU's tile sizes (64-token tiles; the interpreter takes 32) give the reference's values and
  gradients, run through the interpreter: partial tiles, the wide-head configuration and the
  accumulated backward included.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import attenscribble_ops as ao
from attenscribble_ops.testing import cuda_matmul_fp32, make_similarity_inputs, runnable_backends

triton = pytest.importorskip("triton", minversion="3.6")  # tests/triton_sm90.py reads Triton 3.6's caches
tl = triton.language
from attenscribble_ops.triton._tf32x3 import mm, mm_t, split  # noqa: E402  (needs Triton)

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = {"_masked_crf_kernel", "_masked_crf_sum_kernel", "_attentive_similarity_fwd_kernel",
           "_attentive_similarity_bwd_kernel", "_spatial_attention_fwd_kernel",
           "_spatial_attention_bwd_dq_kernel", "_spatial_attention_bwd_dkdv_kernel"}


def test_every_triton_kernel_compiles_for_sm90_and_fits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # nothing cached: every variant compiles
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # an in-place build
    report_path = tmp_path / "sm90.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm90.py"), "--json", str(report_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["failed_cases"] == [] and report["missing_kernels"] == []
    variants = report["variants"]
    assert {v["kernel"] for v in variants} == KERNELS
    assert all(v["fits"] for v in variants)
    # the GPU's tiles, not the interpreter's (BLOCK_M 32, BLOCK_T 32)
    assert all("BLOCK_T=16" in v["variant"] and v["num_warps"] == 1 for v in variants
               if v["kernel"].startswith("_attentive"))
    assert any("BLOCK_M=64" in v["variant"] for v in variants if v["kernel"] == "_spatial_attention_fwd_kernel")
    for dtype in ("fp32", "fp16", "bf16"):  # every dtype of every op compiled
        for kernel in KERNELS - {"_masked_crf_sum_kernel"}:
            assert any(v["kernel"] == kernel and f":*{dtype}" in v["variant"] for v in variants), (kernel, dtype)
    for idx64 in (True, False):  # the masked CRF indexing a sample in int32 and in int64
        assert any(v["kernel"] == "_masked_crf_kernel" and f"IDX64={idx64}" in v["variant"] for v in variants)
    for dot in ("tf32x3", "tf32", "ieee"):  # the fp32 attention in each dot precision
        assert any(v["kernel"] == "_spatial_attention_fwd_kernel" and ":*fp32" in v["variant"]
                   and f"PRECISION={dot} " in v["variant"] + " " for v in variants), dot


@pytest.mark.parametrize("arch, cases", [  # the cases with refused variants (the full sets: README)
    ("sm_89", r"^attention 2 head\(s\) D=64 Dv=64 16x16 fp32$"),
    ("sm_75", r"^attention 1 head\(s\) D=128 Dv=128 16x16 (fp32|fp16)$"),
])
def test_attention_on_cards_with_less_shared_memory(tmp_path, arch, cases):
    """On an L4 / L40S / RTX 40 (99 KiB of shared memory a block) and a T4 (64 KiB), the H100's
    attention tiles do not all fit: Triton refuses those before launching, and the attention
    launches smaller tiles (spatial_attention.launch_fitting). Every case runs, some variant was
    refused, and every launched variant fits the card."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    report_path = tmp_path / f"{arch}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm90.py"), "--arch", arch, "--only", cases,
                           "--json", str(report_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["arch"] == arch and report["failed_cases"] == []
    variants = report["variants"]
    refused = [v for v in variants if not v["launched"]]
    assert refused and all(not v["fits"] for v in refused)
    assert all(v["fits"] for v in variants if v["launched"])
    launched = {v["kernel"] for v in variants if v["launched"]}
    assert {"_spatial_attention_fwd_kernel", "_spatial_attention_bwd_dq_kernel",
            "_spatial_attention_bwd_dkdv_kernel"} <= launched


TRITON_ON_CPU = "triton" in runnable_backends("attentive_similarity")


def _tf32(x, truncate=False):
    """fp32 rounded to TF32 (10 mantissa bits): to nearest with ties away from zero, as the GPU's
    cvt.rna.tf32.f32 rounds (Triton's tf32x3 dots round the big parts so), or truncated, as a
    tensor core reads an fp32 operand as TF32 (the small parts)."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if not truncate:
        bits = bits + np.uint32(0x1000)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


def _emulate_dots(monkeypatch, precision: str, product) -> list:
    """Patch the interpreter's fp32 dots of one input precision ("TF32x3", "TF32") to compute
    ``product(a, b, acc)`` with numpy; returns the list of their operand shapes, one per dot.
    Patches stack: a dot of another precision goes to whatever create_dot was there before."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    wanted = getattr(ir.INPUT_PRECISION, precision)
    original = interpreter.InterpreterBuilder.create_dot
    calls = []

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision != wanted or a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        calls.append(a.data.shape)
        return interpreter.TensorHandle(product(a.data, b.data, d.data), d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return calls


@pytest.fixture
def emulated_tf32x3(monkeypatch):
    """The interpreter's dots (exact fp32 there, whatever the precision) computed as Triton lowers
    input_precision="tf32x3" on a GPU, up to the tensor cores' own summation order: each operand
    split into big = tf32(x) (rounded) and small = x - big (read as TF32 by the tensor core:
    truncated), then acc + small.big, + big.small, + big.big in fp32. Yields the count of such
    dots."""
    import numpy as np

    def product(a, b, acc):
        a_big, b_big = _tf32(a), _tf32(b)
        a_small, b_small = _tf32(a - a_big, truncate=True), _tf32(b - b_big, truncate=True)
        out = acc + np.matmul(a_small, b_big, dtype=np.float32)
        out = out + np.matmul(a_big, b_small, dtype=np.float32)
        return out + np.matmul(a_big, b_big, dtype=np.float32)

    yield _emulate_dots(monkeypatch, "TF32x3", product)


def _tensor_core_steps(a, b, acc, depth: int = 8):
    """acc + a @ b as the tensor cores of an H100 run a "tf32" dot, in a model: both fp32 operands
    read as TF32 (truncated), each depth step of 8 products (an mma's k) added to the accumulator
    at once and rounded to fp32, step after step. Unlike one whole-depth product, the order in
    which a kernel's dots accumulate into one tile then changes its rounding."""
    import numpy as np

    a64, b64 = (_tf32(x, truncate=True).astype(np.float64) for x in (a, b))
    for k in range(0, a64.shape[1], depth):
        acc = (acc.astype(np.float64) + a64[:, k:k + depth] @ b64[k:k + depth, :]).astype(np.float32)
    return acc


@triton.jit
def _split_products_kernel(X, Y, OUT, n, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           TRANSPOSED: tl.constexpr):
    """OUT = X Y^T (n x n) tile by tile, as tf32x3 from split tiles: _tf32x3.mm, or mm_t where
    TRANSPOSED."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, D)
    x_b, x_s = split(tl.load(X + rm[:, None] * D + rd[None, :]), True)
    y_b, y_s = split(tl.load(Y + rn[:, None] * D + rd[None, :]), True)
    if TRANSPOSED:
        out = mm_t(x_b, x_s, tl.trans(y_b), tl.trans(y_s), True, True, True, "tf32")
    else:
        out = mm(x_b, x_s, tl.trans(y_b), tl.trans(y_s), True, True, True, "tf32")
    tl.store(OUT + rm[:, None] * n + rn[None, :], out)


TF32_GPU = (not TRITON_ON_CPU and torch.cuda.is_available() and torch.version.hip is None
            and torch.cuda.get_device_capability() >= (8, 0))


@pytest.mark.skipif(not (TRITON_ON_CPU or TF32_GPU),
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest) or an NVIDIA GPU "
                           "with TF32 tensor cores")
def test_transposed_split_product_rounds_as_the_forward(monkeypatch, record_property):
    """The attention's dk/dv kernel recomputes the forward's logits q k^T as k q^T, and the
    similarity window kernel the LSE pass's q_u.k_t as k_t q_u^T. With tf32x3 (fp32 q, k) the
    two small terms are added in the order the other kernel adds them (_tf32x3.mm_t), so that
    every element comes out bit for bit as the other kernel's: here in a model of the tensor
    cores' step-by-step accumulation, on a GPU on its own tensor cores, with the tiles and warps
    of the kernels' launches at D = 64 (forward 128 x 32 over 8 warps, on an H100 wgmma; dk/dv 64
    x 32 over 4; the window kernel 16 x 16 over one warp, mma.sync). Added the other way round
    (mm), some elements round an ulp apart in that model: a backward's probability exp(s ulp) off
    the forward's, its softmax no longer summing to one."""
    device = "cuda" if TF32_GPU else "cpu"
    calls = [] if TF32_GPU else _emulate_dots(monkeypatch, "TF32", _tensor_core_steps)
    n, d = 128, 64
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(n, d, generator=g).to(device) for _ in range(2))

    def product(x, y, transposed, block_m, block_n, warps):
        out = torch.empty(n, n, device=device)
        _split_products_kernel[(n // block_m, n // block_n)](x, y, out, n, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                                                             TRANSPOSED=transposed, num_warps=warps)
        return out

    forward = product(a, b, False, 128, 32, 8)
    torch.testing.assert_close(forward.double(), a.double() @ b.double().T, rtol=0, atol=2e-5)  # 4.2e-6 here
    for block_m, block_n, warps in ((64, 32, 4), (16, 16, 1)):  # dk/dv's tiles, the window kernel's
        assert torch.equal(product(b, a, True, block_m, block_n, warps).T, forward), (block_m, block_n, warps)
    mismatches = int((product(b, a, False, 64, 32, 4).T != forward).sum())
    record_property("mm_order_mismatches", mismatches)  # on a GPU: whether its tensor cores see the order
    if not TF32_GPU:
        assert calls, "no tf32 products ran"
        assert mismatches > 0  # the model sees the order (5 of 16384 elements here)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The GPU's tiles in the interpreter."""
    from attenscribble_ops.triton import _target

    asked = []
    monkeypatch.setattr(_target, "for_gpu", lambda t: asked.append(t.shape) or True)
    yield
    assert asked, "no launch path asked _target.for_gpu: the GPU tiles were not used"


def test_tf32_rounding_emulation():
    import numpy as np

    x = np.array([1.0, 1 + 2.0 ** -10, 1 + 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -20, -(1 + 2.0 ** -11), 1 - 2.0 ** -12],
                 dtype=np.float32)
    want = np.array([1.0, 1 + 2.0 ** -10, 1 + 2.0 ** -10, 1 + 2.0 ** -10, -(1 + 2.0 ** -10), 1.0], dtype=np.float32)
    assert np.array_equal(_tf32(x), want)  # to nearest, ties away from zero
    down = np.array([1.0, 1 + 2.0 ** -10, 1.0, 1.0, -1.0, 1 - 2.0 ** -11], dtype=np.float32)
    assert np.array_equal(_tf32(x, truncate=True), down)  # towards zero


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest)")
@pytest.mark.parametrize("dot,dim,dim_v,grid", [("tf32", 64, 64, (9, 12)), ("tf32", 128, 24, (9, 12)),
                                               ("tf32x3", 64, 64, (9, 12)), ("tf32x3", 128, 24, (9, 12)),
                                               ("tf32x3", 64, 64, (16, 16))],
                         ids=["tf32-64", "tf32-128x24", "tf32x3-64", "tf32x3-128x24", "tf32x3-64-256tokens"])
def test_gpu_tiles_match_the_reference(request, gpu_tiles, emulated_tf32x3, dot, dim, dim_v, grid):
    """Attention (tie_qk, so the similarity loss's dq, dk accumulate into the attention's) and the
    loss with GPU tiles against the reference: n = 9 x 12 = 108 tokens, partial tiles (and full
    ones where a tile is shorter), or 16 x 16 = 256, which every tile divides (the kernels' path
    without row and key masks). Radius 2: the window's size is not what the tiles change, and the
    interpreter pays for every window offset.

    "tf32": torch's fp32 matmuls in TF32, the 16-bit tiles (the interpreter computes these dots in exact
    fp32). "tf32x3": the fp32 default, its own tiles; the kernels split their fp32 tiles and run
    three "tf32" products, whose operands are read here as a tensor core reads them (truncated to
    TF32): errors within twice the fp32 reference's own (plain tf32 products, tried in this
    emulation while writing the test, were 600-950 times it)."""
    emulated_tf32 = request.getfixturevalue("emulated_tf32") if dot == "tf32x3" else None
    with cuda_matmul_fp32("tf32" if dot == "tf32" else "ieee"):
        _gpu_tiles_match_the_reference(emulated_tf32, dot, dim, dim_v, grid)
    assert not emulated_tf32x3, "Triton's own tf32x3 dots: the kernels split their operands themselves"


def _gpu_tiles_match_the_reference(emulated_tf32, dot, dim, dim_v, grid):
    n = grid[0] * grid[1]
    b, h = (2, 2) if n < 128 else (1, 1)  # the interpreter's time grows with the programs
    x = make_similarity_inputs(b, h, grid, dim, seed=11)
    v0 = torch.randn(b, h, n, dim_v, generator=torch.Generator().manual_seed(12))
    weights = torch.linspace(-1, 1, b * h * n * dim_v).view(b, h, n, dim_v)
    gates = torch.tensor([1.0, 0.25])[:b]

    def run(backend, dtype=torch.float32):
        q, k, v = (t.clone().to(dtype).requires_grad_() for t in (x["q"], x["k"], v0))
        out, lse, qt, kt = ao.spatial_attention(q, k, v, backend=backend, tie_qk=True)
        probs, hw, hb = (x[name].to(dtype) for name in ("probs", "head_weight", "head_bias"))
        loss = ao.attentive_similarity_loss(qt, kt, probs, hw, hb, grid=x["grid"], radius=2, lse=lse,
                                            sample_weight=gates.to(dtype), backend=backend)
        fused = ao.attentive_similarity_loss(q, k, probs, hw, hb, grid=x["grid"], radius=2, backend=backend)
        total = loss + 0.5 * fused + (out * weights.to(dtype)).sum()
        return [out.detach(), lse.detach(), loss.detach(), fused.detach(), *torch.autograd.grad(total, [q, k, v])]

    got, want = run("triton"), run("reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-5)
    if dot == "tf32x3":  # as accurate as fp32: within twice the fp32 reference's own error (plain tf32: ~1000x)
        assert emulated_tf32, "no split tf32 products ran"
        exact = run("reference", torch.float64)
        for g, w, e in zip(got, want, exact):
            assert (g.double() - e).abs().max() <= 2 * (w.double() - e).abs().max() + 1e-7 * e.abs().max()


@pytest.fixture
def emulated_tf32(monkeypatch):
    """The interpreter's dots with input_precision="tf32" computed as a tensor core does: both fp32
    operands read as TF32 (their low 13 mantissa bits dropped), products accumulated in fp32.
    Yields the count of such dots."""
    import numpy as np

    yield _emulate_dots(monkeypatch, "TF32", lambda a, b, acc: acc + np.matmul(
        _tf32(a, truncate=True), _tf32(b, truncate=True), dtype=np.float32))


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest)")
@pytest.mark.parametrize("heads,dim,grid,dtype", [(1, 64, (9, 12), torch.float32), (2, 40, (6, 8), torch.float32),
                                                   (1, 64, (6, 8), torch.float16)], ids=["1x64", "2x40", "1x64-fp16"])
def test_similarity_window_split_products_as_accurate_as_fp32(gpu_tiles, emulated_tf32, emulated_tf32x3, heads, dim,
                                                              grid, dtype):
    """The similarity window kernels split their fp32 tiles for tf32x3 themselves (once per tile,
    then three "tf32" tensor-core products; fp16 q, k are exact in TF32, so their products skip
    the small parts). With GPU tiles, the tensor cores' TF32 reads emulated (truncation), loss and
    gradients from a given LSE and from the fused op stay within twice the reference's own error
    in that dtype against float64."""
    x = make_similarity_inputs(2, heads, grid, dim, seed=21)
    lse0 = torch.logsumexp(torch.einsum("bhid,bhjd->bhij", x["q"].double(), x["k"].double()), -1).float()

    def run(backend, dtype=torch.float32):
        q, k = (t.clone().to(dtype).requires_grad_() for t in (x["q"], x["k"]))
        lse = lse0  # the reference computes its own normaliser from q, k
        probs, hw, hb = (x[name].to(dtype).requires_grad_() for name in ("probs", "head_weight", "head_bias"))
        loss = ao.attentive_similarity_loss(q, k, probs, hw, hb, grid=x["grid"], radius=2, lse=lse,
                                            sample_weight=torch.tensor([1.0, 0.25], dtype=dtype), backend=backend)
        fused = ao.attentive_similarity_loss(q, k, probs, hw, hb, grid=x["grid"], radius=2, backend=backend)
        total = loss + 0.5 * fused
        return [loss.detach(), fused.detach(), *torch.autograd.grad(total, [q, k, probs, hw, hb])]

    with cuda_matmul_fp32("ieee"):  # fp32 dots: tf32x3, the default
        got = run("triton", dtype)
    assert emulated_tf32, "the window kernels ran no tf32 products"
    want, exact = run("reference", dtype), run("reference", torch.float64)
    for g, w, e in zip(got, want, exact):
        assert (g.double() - e).abs().max() <= 2 * (w.double() - e).abs().max() + 1e-7 * e.abs().max()
