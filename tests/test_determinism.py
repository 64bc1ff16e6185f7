"""Determinism: the fused CPU kernels give bit-identical values and gradients across repeated runs
and across CPU thread counts (1 and 2): every reduction runs in a fixed order that does not depend
on how the work is split between threads. On a GPU, the CUDA and Triton kernels give bit-identical
results across repeated runs of the same cases (no atomics: every reduction has a fixed order)."""
import pytest
import torch

import attenscribble_ops as ao
from attenscribble_ops.testing import make_crf_inputs, make_similarity_inputs, runnable_backends

CPU_FUSED = [b for b in ("cpu",) if b in runnable_backends("masked_crf")]
GPU_FUSED = [b for b in ("cuda", "triton")
             if torch.cuda.is_available() and b in runnable_backends("attentive_similarity", "cuda")
             and b in runnable_backends("masked_crf", "cuda")]


def _with_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _crf(backend, device, shape, radius):
    d = make_crf_inputs(2, 3, shape, seed=3, device=device)
    probs = d["probs"].requires_grad_()
    loss = ao.masked_crf_loss(probs, d["image"], radius=radius, mask_dst=d["mask_dst"], backend=backend)
    loss.backward()
    return [loss.detach(), probs.grad]


def _similarity(backend, device, heads, batch=2, grid=(13, 11), dtype=torch.float32):
    x = make_similarity_inputs(batch, heads, grid, 16, seed=4, device=device)
    leaves = [x[n].to(dtype).requires_grad_() for n in ("q", "k", "probs", "head_weight", "head_bias")]
    gate = torch.linspace(1.0, 0.5, batch, device=device, dtype=dtype)
    loss = ao.attentive_similarity_loss(*leaves, grid=x["grid"], sample_weight=gate, backend=backend)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def _attention(backend, device, batch=2, heads=2, grid=(9, 14), dtype=torch.float32):
    x = make_similarity_inputs(batch, heads, grid, 16, seed=5, device=device, dtype=dtype)
    q, k = x["q"].requires_grad_(), x["k"].requires_grad_()
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(6), dtype=dtype).to(device).requires_grad_()
    out, lse, qt, kt = ao.spatial_attention(q, k, v, backend=backend, tie_qk=True)
    loss = ao.attentive_similarity_loss(qt, kt, x["probs"], x["head_weight"], x["head_bias"], grid=x["grid"],
                                        lse=lse, backend=backend)
    total = loss + (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum()
    return [out.detach(), lse.detach(), loss.detach(), *torch.autograd.grad(total, [q, k, v])]


CASES = {
    "crf-2d": lambda b, d: _crf(b, d, (37, 29), 5),
    "crf-3d": lambda b, d: _crf(b, d, (6, 17, 15), (1, 3, 3)),
    "similarity-1-head": lambda b, d: _similarity(b, d, 1),
    "similarity-3-heads": lambda b, d: _similarity(b, d, 3),
    "attention-and-loss": _attention,
    # Long sequences: BLAS splits a long product between its threads (other bits with 1 and 2
    # threads unless the kernels keep each product on one thread); 832 tokens, one slice (whose
    # backward spreads its products over the threads itself), and 2250 (two key blocks).
    "attention-one-slice-long": lambda b, d: _attention(b, d, 1, 1, (13, 64)),
    "attention-one-slice-long-fp64": lambda b, d: _attention(b, d, 1, 1, (13, 64), torch.float64),
    "attention-long": lambda b, d: _attention(b, d, 2, 2, (45, 50)),
    "similarity-one-slice-long-fp64": lambda b, d: _similarity(b, d, 1, 1, (13, 64), torch.float64),
}


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_across_runs_and_thread_counts(case, backend):
    run = CASES[case]
    one = _with_threads(1, lambda: run(backend, "cpu"))
    two = _with_threads(2, lambda: run(backend, "cpu"))
    again = _with_threads(2, lambda: run(backend, "cpu"))
    for a, b, c in zip(one, two, again):
        assert torch.equal(b, c), "repeated runs differ"
        assert torch.equal(a, b), "1 and 2 threads differ"


@pytest.mark.parametrize("backend", GPU_FUSED)
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_bit_identical_across_runs(case, backend):
    run = CASES[case]
    first, second = run(backend, "cuda"), run(backend, "cuda")
    for a, b in zip(first, second):
        assert a.is_cuda and torch.equal(a, b), "repeated runs differ"
