"""Numerical edge cases on every runnable backend (the reference is the oracle): one-hot and
uniform probabilities, a single pixel, a window larger than the image, fp16 value ranges, and the
NaN policy (propagated, never rejected, identically on every backend)."""
import pytest
import torch

import attenscribble_ops as ao
from attenscribble_ops.testing import TOLERANCES, make_similarity_inputs, runnable_backends

CRF = runnable_backends("masked_crf")
SIM = runnable_backends("attentive_similarity")


def _crf_case(kind, shape=(7, 9), classes=3, batch=2):
    g = torch.Generator().manual_seed(1)
    if kind == "one-hot":
        probs = torch.nn.functional.one_hot(torch.randint(0, classes, (batch,) + shape, generator=g), classes)
        probs = probs.movedim(-1, 1).double()
    elif kind == "uniform":
        probs = torch.full((batch, classes) + shape, 1.0 / classes, dtype=torch.float64)
    else:
        probs = torch.randn((batch, classes) + shape, generator=g, dtype=torch.float64).softmax(1)
    image = torch.rand((batch, 2) + shape, generator=g, dtype=torch.float64)
    return probs, image


def _crf_run(probs, image, backend, **kw):
    p = probs.clone().requires_grad_()
    loss = ao.masked_crf_loss(p, image, backend=backend, **kw)
    loss.backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize("backend", CRF)
@pytest.mark.parametrize("kind,shape,radius", [
    ("one-hot", (7, 9), 2), ("uniform", (7, 9), 2), ("random", (1, 1), 1), ("random", (1, 1), 5),
    ("random", (3, 4), 9), ("random", (2, 3, 2), (4, 4, 4)), ("one-hot", (1, 6), 3)])
def test_masked_crf_edge_cases(backend, kind, shape, radius):
    probs, image = _crf_case(kind, shape)
    dtype = torch.float32 if backend == "triton" else torch.float64
    atol, rtol = TOLERANCES[dtype]
    for padding in ("zeros", "valid"):
        want, want_grad = _crf_run(probs, image, "reference", radius=radius, padding=padding)
        got, got_grad = _crf_run(probs.to(dtype), image.to(dtype), backend, radius=radius, padding=padding)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
        torch.testing.assert_close(got_grad.double(), want_grad, atol=atol, rtol=rtol)
        assert torch.isfinite(got) and torch.isfinite(got_grad).all()


@pytest.mark.parametrize("backend", CRF)
@pytest.mark.parametrize("options", [dict(sigma_image=2e-19), dict(sigma_image=None, sigma_xy=3e-19, spacing=3e-19),
                                     dict(sigma_image=None, sigma_xy=4e18, spacing=(1e18, 2e18)),
                                     dict(sigma_xy=1e-2, sigma_image=2e18)],
                         ids=["tiny sigma_image", "tiny sigma_xy and spacing", "huge sigma_xy and spacing",
                              "huge sigma_image"])
def test_masked_crf_float32_range_edges_match_reference(backend, options):
    """Sigmas and spacings just inside what check_float_range accepts for float32 probabilities:
    finite and equal to the float64 reference (an image of 0s and 1s, so that a tiny image sigma
    makes Gaussians of exactly 0 or 1)."""
    probs, _ = _crf_case("random", (5, 6))
    image = torch.zeros(2, 1, 5, 6, dtype=torch.float64)
    image[..., 3:] = 1
    want, want_grad = _crf_run(probs, image, "reference", radius=2, **options)
    got, got_grad = _crf_run(probs.float(), image.float(), backend, radius=2, **options)
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", SIM)
@pytest.mark.parametrize("sigma", [1e-150, 1e150])
def test_attentive_similarity_sigma_range_edges_match_reference(backend, sigma):
    """The decay's limits at the ends of the accepted sigmas: 0 off the centre, and 1 in the window."""
    inputs = make_similarity_inputs(2, 1, (4, 5), 8, dtype=torch.float64)
    dtype = torch.float32 if backend == "triton" else torch.float64

    def run(b, dt):
        q, k = (inputs[n].detach().to(dt).requires_grad_() for n in ("q", "k"))
        loss = ao.attentive_similarity_loss(q, k, inputs["probs"].to(dt), inputs["head_weight"].to(dt),
                                            inputs["head_bias"].to(dt), grid=(4, 5), radius=2, sigma=sigma, backend=b)
        loss.backward()
        return loss.detach().double(), q.grad.double()

    want, want_grad = run("reference", torch.float64)
    got, got_grad = run(backend, dtype)
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)
    if sigma < 1:
        assert want == 0


def test_masked_crf_uniform_probabilities_value():
    """With uniform probabilities every pair costs 1 - 1/C: the loss is that times the kernel mass."""
    probs, image = _crf_case("uniform", (5, 6), classes=4)
    values = {b: ao.masked_crf_loss(probs.float() if b == "triton" else probs, image.float() if b == "triton"
                                    else image, radius=1, sigma_image=None, backend=b) for b in CRF}
    for value in values.values():
        torch.testing.assert_close(value.double(), values["reference"], atol=1e-6, rtol=1e-5)
        assert value > 0


def test_masked_crf_fp16_range():
    """fp16 probabilities and an image with large values (60000, near fp16's max) accumulate in fp32."""
    probs, image = _crf_case("random", (8, 8))
    image = image * 60000
    want = ao.masked_crf_loss(probs, image, radius=2, sigma_image=6000.0, backend="reference")
    for backend in (b for b in CRF if b != "reference"):
        got = ao.masked_crf_loss(probs.half(), image.half(), radius=2, sigma_image=6000.0, backend=backend)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", SIM)
@pytest.mark.parametrize("grid,radius", [((1, 1), 1), ((1, 1), 5), ((2, 3), 9), ((1, 7), 2)])
def test_attentive_similarity_tiny_grids_and_large_windows(backend, grid, radius):
    x = make_similarity_inputs(2, 2, grid, 16, seed=7)
    dtype = torch.float32 if backend == "triton" else torch.float64
    atol, rtol = TOLERANCES[dtype]
    names = ("q", "k", "probs", "head_weight", "head_bias")

    def run(name, dt):
        leaves = [x[n].to(torch.float64 if name == "reference" else dt).requires_grad_() for n in names]
        loss = ao.attentive_similarity_loss(*leaves, grid=grid, radius=radius, backend=name)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    for got, want in zip(run(backend, dtype), run("reference", dtype)):
        torch.testing.assert_close(got.double(), want.double(), atol=atol * max(1.0, want.abs().max().item()),
                                   rtol=rtol)


@pytest.mark.parametrize("backend", SIM)
def test_attentive_similarity_one_hot_probabilities(backend):
    x = make_similarity_inputs(2, 1, (6, 6), 16, seed=8)
    labels = torch.randint(0, 3, (2, 24, 24))
    probs = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()
    want = ao.attentive_similarity_loss(x["q"], x["k"], probs, x["head_weight"], x["head_bias"], grid=(6, 6),
                                        backend="reference")
    got = ao.attentive_similarity_loss(x["q"], x["k"], probs, x["head_weight"], x["head_bias"], grid=(6, 6),
                                       backend=backend)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_nan_propagates_identically_on_every_backend():
    probs, image = _crf_case("random", (6, 6))
    probs, image = probs.float(), image.float()
    probs[0, 1, 2, 2] = float("nan")
    for backend in CRF:
        assert torch.isnan(ao.masked_crf_loss(probs, image, radius=2, backend=backend)), backend
    x = make_similarity_inputs(1, 1, (5, 5), 16, seed=9)
    x["k"][0, 0, 3, 0] = float("nan")
    for backend in SIM:
        loss = ao.attentive_similarity_loss(x["q"], x["k"], x["probs"], x["head_weight"], x["head_bias"],
                                            grid=(5, 5), backend=backend)
        assert torch.isnan(loss), backend


ATTENTION = runnable_backends("spatial_attention")


@pytest.mark.parametrize("backend", ATTENTION)
@pytest.mark.parametrize("shape, at", [((2, 2, 24, 16), (1, 0, 7, 3)), ((1, 1, 6, 4), (0, 0, 2, 1))])
def test_nan_query_row_gives_nan_out_and_lse_rows_on_every_backend(backend, shape, at):
    """A NaN in one row of q: that row of out and of the LSE is NaN, the others are finite, on every
    backend and on the inference path without an LSE (torch's CPU flash kernel returns 0 there
    with 6 keys, which the aten backend and that path set back to NaN)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    q[at] = float("nan")
    out, lse = ao.spatial_attention(q, k, v, backend=backend)
    want = torch.zeros(shape[:3], dtype=torch.bool)
    want[at[:3]] = True
    assert torch.equal(torch.isnan(out).any(-1), want) and torch.equal(torch.isnan(lse), want)
    assert torch.isfinite(out[~want]).all() and torch.isfinite(lse[~want]).all()
    with torch.no_grad():
        out, none = ao.spatial_attention(q, k, v, return_lse=False, backend=backend)
    assert none is None and torch.equal(torch.isnan(out).any(-1), want)


def test_nan_query_row_on_the_sdpa_inference_path():
    """"auto" without an LSE where nothing is differentiated runs torch's SDPA: the NaN row stays."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, 6, 4, generator=g) for _ in range(3))
    q[0, 0, 4, 0] = float("nan")
    with torch.no_grad():
        out, _ = ao.spatial_attention(q, k, v, return_lse=False)
    assert torch.isnan(out[0, 0, 4]).all() and torch.isfinite(out[0, 0, torch.arange(6) != 4]).all()


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_probs_give_a_non_finite_crf_loss_on_every_backend(value):
    """NaN on the reference and the C++ kernels, the opposite infinity on Triton (README, "NaN")."""
    probs, image = _crf_case("random", (6, 6))
    probs, image = probs.float(), image.float()
    probs[0, 1, 2, 2] = value
    for backend in CRF:
        loss = ao.masked_crf_loss(probs, image, radius=2, backend=backend)
        assert not torch.isfinite(loss), backend
        if backend == "triton":
            assert loss == -value
        else:
            assert torch.isnan(loss), backend
