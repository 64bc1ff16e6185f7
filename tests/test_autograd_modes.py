"""The autograd features training and inference code combines with the ops, on every backend that
runs here: torch.inference_mode, activation checkpointing (reentrant and not), saved-tensor hooks
(save_on_cpu) and anomaly detection. Each gives the values and gradients of the plain call.

Found with it: under torch.inference_mode the C++ attention raised "Inplace update to inference
tensor outside InferenceMode" for more than one (batch, head) slice (at::parallel_for's worker
threads did not take the caller's inference mode), and the aten attention failed non-reentrant
checkpointing (its backward unpacked its saved tensors twice)."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import attenscribble_ops as ao
from attenscribble_ops.testing import loss_backend_for, runnable_backends

CUDA = torch.cuda.is_available()
CASES = [(b, d) for d in ["cpu"] + (["cuda"] if CUDA else []) for b in runnable_backends("spatial_attention", d)]
IDS = [f"{b}-{d}" for b, d in CASES]


def _model(backend, device):
    """The block and both losses on one backend ("aten": the losses on auto's), and their inputs."""
    torch.manual_seed(0)
    loss_backend = loss_backend_for(backend)
    block = ao.nn.SpatialSelfAttention(16, heads=2, backend=backend).to(device)
    similarity = ao.nn.AttentiveSimilarityLoss(heads=2, radius=1, backend=loss_backend).to(device)
    crf = ao.nn.MaskedCRFLoss(radius=1, backend=loss_backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 5, generator=g).to(device)
    logits = torch.randn(2, 3, 8, 10, generator=g).to(device)
    image = torch.rand(2, 1, 8, 10, generator=g).to(device)

    def objective(x, logits):
        features, sim = block(x)
        probs = torch.softmax(logits, 1)
        return similarity(sim, probs) + crf(probs, image) + features.square().mean()

    return block, objective, x, logits


def _gradients(block, objective, x, logits, run):
    """(loss, parameter gradients, logits gradient) of ``run(objective, x, logits)``."""
    block.zero_grad(set_to_none=True)
    logits = logits.clone().requires_grad_()
    loss = run(objective, x, logits)
    loss.backward()
    return [loss.detach()] + [p.grad for p in block.parameters()] + [logits.grad]


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_inference_mode_equals_no_grad(backend, device):
    block, objective, x, logits = _model(backend, device)
    with torch.no_grad():
        expected = objective(x, logits)
        features, _ = block(x)
    with torch.inference_mode():
        got = objective(x, logits)
        features_inf, _ = block(x)
    assert got.is_inference()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(features_inf, features, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_activation_checkpointing(backend, device, reentrant):
    block, objective, x, logits = _model(backend, device)
    expected = _gradients(block, objective, x, logits, lambda f, *a: f(*a))
    got = _gradients(block, objective, x, logits, lambda f, *a: checkpoint(f, *a, use_reentrant=reentrant))
    _assert_same(got, expected)


@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_saved_tensor_hooks_and_anomaly_detection(backend, device):
    block, objective, x, logits = _model(backend, device)
    expected = _gradients(block, objective, x, logits, lambda f, *a: f(*a))
    with torch.autograd.graph.save_on_cpu():
        _assert_same(_gradients(block, objective, x, logits, lambda f, *a: f(*a)), expected)
    with torch.autograd.detect_anomaly(check_nan=True):
        _assert_same(_gradients(block, objective, x, logits, lambda f, *a: f(*a)), expected)


@pytest.mark.parametrize("slices", [1, 2, 12])
def test_cpu_attention_ops_under_inference_mode(slices):
    """The C++ attention's own ops (forward, backward, LSE) on inference tensors, one slice (the
    products spread over the threads) and several (one region over the slices)."""
    if "cpu" not in runnable_backends("spatial_attention", "cpu"):
        pytest.skip("no compiled CPU kernels")
    ops = torch.ops.attenscribble_ops
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(slices, 1, 300, 16, generator=g) for _ in range(4))
    dlse = torch.randn(slices, 1, 300, generator=g)
    expected = ops.spatial_attention_forward(q, k, v, 0.7)
    expected_grads = ops.spatial_attention_backward(dout, None, dlse, q, k, v, *expected, 0.7)
    with torch.inference_mode():
        got = ops.spatial_attention_forward(q, k, v, 0.7)
        got_grads = ops.spatial_attention_backward(dout, None, dlse, q, k, v, *got, 0.7)
        lse = ops.spatial_attention_lse(q, k, 0.7)
    for a, b in zip(got + got_grads + (lse,), expected + expected_grads + (expected[2],)):
        assert torch.equal(a, b)


DEVICES = sorted({d for _, d in CASES})


@pytest.mark.parametrize("backend,device", [("auto", d) for d in DEVICES] + CASES,
                         ids=[f"auto-{d}" for d in DEVICES] + IDS)
def test_attention_without_lse(backend, device):
    """return_lse=False (what the block asks for where nothing is differentiated): no LSE, the same
    output; "auto" then runs torch's SDPA, a backend named explicitly its own kernels."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 37, 8, generator=g).to(device) for _ in range(3))
    with torch.no_grad():
        out, lse = ao.spatial_attention(q, k, v, logit_scale=0.7, return_lse=False, backend=backend)
        with_lse = ao.spatial_attention(q, k, v, logit_scale=0.7, backend=backend)[0]
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert lse is None
    if backend == "auto":
        assert torch.equal(out, expected)
    else:
        assert torch.equal(out, with_lse)
    torch.testing.assert_close(out, with_lse, rtol=1e-5, atol=1e-6)
    # with something to differentiate, "auto" keeps its backend (and its deterministic backward)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_grad, none = ao.spatial_attention(*leaves, logit_scale=0.7, return_lse=False, backend=backend)
    assert none is None and out_grad.requires_grad
    torch.testing.assert_close(out_grad, with_lse, rtol=0, atol=0)
    out_grad.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().max() > 0 for t in leaves)


@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_block_without_gradients_skips_the_lse(backend, device):
    """Under no_grad the block hands no LSE: its features are the recorded forward's (to rounding)
    and a similarity loss computed from it computes its own LSE, giving the same loss."""
    block, objective, x, logits = _model(backend, device)
    with torch.no_grad():
        features, sim = block(x)
    recorded, sim_recorded = block(x)
    assert sim.lse is None and sim_recorded.lse is not None
    torch.testing.assert_close(features, recorded.detach(), rtol=1e-5, atol=1e-6)
    loss = ao.nn.AttentiveSimilarityLoss(heads=2, radius=1, backend=loss_backend_for(backend)).to(device)
    probs = torch.softmax(logits, 1)
    with torch.no_grad():
        torch.testing.assert_close(loss(sim, probs), loss(sim_recorded, probs), rtol=1e-5, atol=1e-7)
