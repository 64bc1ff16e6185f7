"""The attention and similarity kernels on q and k past 2**31 elements (int64 offsets).

Each slice of these kernels is computed on its own, so the slices past element 2**31 of a big
tensor must give what the same kernel gives on a copy of those slices alone, where every offset is
small: bitwise on the CPU (fixed-order sums), to rounding on the GPU. An offset that wrapped in 32
bits would read or write another slice. The masked CRF's counterpart is in test_masked_crf_ops.py.

On the CPU, q and k (8 GiB each) live in files mapped into memory, so the page cache can evict them
while the 16 GiB of dq and dk are written: the tests need about 19 GiB of free memory and 17 GiB
of free disk (ATTENSCRIBBLE_BIG_TESTS=1 runs them regardless), and are marked slow (`make
test-extended`). On a GPU they need about 40 GiB of device memory (56 GiB for the CUDA similarity
kernels, which take dim-major copies of q and k) and run in the default suite.
"""
import math
import os
import shutil
import tempfile

import pytest
import torch

from attenscribble_ops.reference.spatial_attention import spatial_attention_reference
from attenscribble_ops.testing import available_memory_gib, runnable_backends

OPS = torch.ops.attenscribble_ops
FORCE = bool(os.environ.get("ATTENSCRIBBLE_BIG_TESTS"))


def _cpu_room() -> bool:
    return FORCE or (available_memory_gib() >= 19 and shutil.disk_usage(tempfile.gettempdir()).free >= 17 * 2 ** 30)


def _gpu_room(gib: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= gib * 2 ** 30


def _params(op: str):
    """(op-name suffix, device) of every backend with a kernel for ``op``: the compiled CPU kernel
    (slow, needs the room above) and, with a big enough GPU, the CUDA and Triton kernels. The CUDA
    similarity backward holds dim-major copies of q, k and of dq, dk besides the caller's 16 GiB of
    q and k: 48 GiB at its peak."""
    cpu = "cpu" in runnable_backends(op, "cpu")
    gpu = {b: torch.cuda.is_available() and b in runnable_backends(op, "cuda") for b in ("cuda", "triton")}
    cuda_gib = 56 if op == "attentive_similarity" else 40
    return [
        pytest.param("", "cpu", id="cpu", marks=[pytest.mark.slow, pytest.mark.skipif(
            not cpu or not _cpu_room(), reason="needs the CPU kernel, ~19 GiB of free memory and 17 GiB of disk")]),
        pytest.param("", "cuda", id="cuda", marks=pytest.mark.skipif(
            not gpu["cuda"] or not _gpu_room(cuda_gib), reason=f"needs the CUDA kernel and a GPU with {cuda_gib} GiB")),
        pytest.param("_triton", "cuda", id="triton", marks=pytest.mark.skipif(
            not gpu["triton"] or not _gpu_room(40), reason="needs Triton and a GPU with 40 GiB")),
    ]


def _big_normal(shape, std, device, seed, folder):
    """A float32 tensor of normal values; on the CPU backed by a mapped file in ``folder`` (unlinked
    at once: the mapping keeps it until the tensor is freed)."""
    numel = math.prod(shape)
    if device == "cpu":
        path = os.path.join(folder, f"big-{seed}.bin")
        x = torch.from_file(path, shared=True, size=numel, dtype=torch.float32).view(shape)
        os.unlink(path)
    else:
        x = torch.empty(shape, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    step = max(1, 2 ** 26 // (numel // shape[0]))
    for i in range(0, shape[0], step):
        x[i:i + step].normal_(0.0, std, generator=g)
    return x


def _assert_same(big, crop, device):
    """The big run's slices equal the crop's: bitwise on the CPU, to rounding on the GPU."""
    assert torch.isfinite(crop).all()
    if device == "cpu":
        assert torch.equal(big, crop)
    else:
        torch.testing.assert_close(big, crop, rtol=1e-5, atol=1e-6)


@pytest.fixture
def folder():
    with tempfile.TemporaryDirectory(prefix="attenscribble-big-") as d:
        yield d


@pytest.mark.parametrize("suffix,device", _params("spatial_attention"))
def test_attention_past_2_31_elements(suffix, device, folder):
    """Forward and backward (value and similarity-LSE gradients) of the attention, q and k of
    (2**17 + 2, 1, 256, 64): the last two slices start at element 2**31 and after."""
    n, d, dv, scale = 256, 64, 4, 0.7
    slices = 2 ** 31 // (n * d) + 2
    q = _big_normal((slices, 1, n, d), 0.35, device, 1, folder)
    k = _big_normal((slices, 1, n, d), 0.35, device, 2, folder)
    assert q.numel() > 2 ** 31
    v = torch.randn(slices, 1, n, dv, device=device)
    forward = getattr(OPS, "spatial_attention_forward" + suffix)
    backward = getattr(OPS, "spatial_attention_backward" + suffix)
    out, lse_attn, lse_sim = forward(q, k, v, scale)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse_sim)
    dq, dk, dv_ = backward(dout, None, dlse, q, k, v, out, lse_attn, lse_sim, scale)

    picked = torch.tensor([0, slices - 2, slices - 1], device=device)
    assert (slices - 2) * n * d >= 2 ** 31
    qc, kc, vc, doutc, dlsec = (t[picked] for t in (q, k, v, dout, dlse))
    results = [t[picked] for t in (out, lse_attn, lse_sim, dq, dk, dv_)]
    del q, k, v, out, lse_attn, lse_sim, dout, dlse, dq, dk, dv_  # before any assertion holds them
    crop = forward(qc, kc, vc, scale)
    crop_grads = backward(doutc, None, dlsec, qc, kc, vc, *crop, scale)
    for big, small in zip(results, crop + crop_grads):
        _assert_same(big, small, device)

    # and the crop against the reference, in fp64
    q64, k64, v64 = (t.double().requires_grad_() for t in (qc, kc, vc))
    ref_out, ref_lse = spatial_attention_reference(q64, k64, v64, scale)
    torch.autograd.backward((ref_out, ref_lse), (doutc.double(), dlsec.double()))
    for got, want in zip((crop[0], crop[2]) + tuple(crop_grads), (ref_out, ref_lse, q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix,device", _params("attentive_similarity"))
def test_similarity_past_2_31_elements(suffix, device, folder):
    """The similarity LSE sweep, and the window loss's forward and backward, on q and k of
    (2**16 + 2, 2, 16 * 16, 64): the last two batch elements start at element 2**31 and after."""
    batch, heads, (h, w), d, classes = 2 ** 16 + 2, 2, (16, 16), 64, 3
    radius, sigma, scale = 2, 1.5, 0.9
    n = h * w
    q = _big_normal((batch, heads, n, d), 0.35, device, 3, folder)
    k = _big_normal((batch, heads, n, d), 0.35, device, 4, folder)
    assert q.numel() > 2 ** 31
    probs = torch.randn(batch, classes, h, w, device=device).softmax(1)
    head_weight = torch.tensor([0.6, -0.4], device=device)
    head_bias = torch.tensor(0.1, device=device)
    sample_weight = torch.rand(batch, device=device)
    lse_op = getattr(OPS, "spatial_attention_lse" + suffix)
    forward = getattr(OPS, "attentive_similarity_forward" + suffix)
    backward = getattr(OPS, "attentive_similarity_backward" + suffix)
    options = (radius, sigma, scale)
    lse = lse_op(q, k, scale)
    rows = forward(q, k, lse, probs, head_weight, head_bias, sample_weight, *options)
    grad_rows = torch.rand_like(rows)
    # dq, dk, dlse, dprobs (per token; dalpha and dbeta are sums over the batch)
    grads = backward(grad_rows, q, k, lse, probs, head_weight, head_bias, sample_weight, *options)[:4]

    picked = torch.tensor([0, batch - 2, batch - 1], device=device)
    assert (batch - 2) * heads * n * d >= 2 ** 31
    qc, kc, probsc, swc, grc = (t[picked] for t in (q, k, probs, sample_weight, grad_rows))
    results = [t[picked] for t in (lse, rows) + grads]
    del q, k, lse, rows, grads  # before any assertion holds them
    lsec = lse_op(qc, kc, scale)
    rowsc = forward(qc, kc, lsec, probsc, head_weight, head_bias, swc, *options)
    crop_grads = backward(grc, qc, kc, lsec, probsc, head_weight, head_bias, swc, *options)[:4]
    for big, small in zip(results, (lsec, rowsc) + crop_grads):
        _assert_same(big, small, device)
