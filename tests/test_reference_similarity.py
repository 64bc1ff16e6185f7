"""The reference attentive similarity loss and attention against the brute-force oracles."""
import math

import pytest
import torch

from attenscribble_ops import attentive_similarity_loss, spatial_attention
from attenscribble_ops.reference import window_decay, window_decay_numpy
from attenscribble_ops.testing import make_similarity_inputs

from oracles import bilinear_to_grid, decay_mask_loop, similarity_pairs_loss

f64 = torch.float64


def _inputs(**kw):
    d = make_similarity_inputs(dtype=f64, **kw)
    for name in ("q", "k", "probs", "head_weight", "head_bias"):
        d[name] = d[name].clone().requires_grad_()
    return d


def _grads(loss, d, names):
    return torch.autograd.grad(loss, [d[n] for n in names], allow_unused=True)


@pytest.mark.parametrize("grid,heads,radius", [((4, 5), 1, 2), ((3, 7), 2, 1), ((4, 4), 3, 9)])
def test_loss_and_all_gradients_match_pairs(grid, heads, radius):
    d = _inputs(batch=2, heads=heads, grid=grid, dim=8, classes=3, probs_factor=2, logit_std=3.0)
    gate = torch.tensor([1.0, 0.0], dtype=f64)
    ours = attentive_similarity_loss(d["q"], d["k"], d["probs"], d["head_weight"], d["head_bias"], grid=grid,
                                     radius=radius, sigma=2.5, logit_scale=0.7, sample_weight=gate,
                                     backend="reference")
    p_grid = bilinear_to_grid(d["probs"], grid)
    expected = similarity_pairs_loss(d["q"], d["k"], p_grid, d["head_weight"], d["head_bias"], radius=radius,
                                     sigma=2.5, logit_scale=0.7, sample_weight=gate)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    names = ["q", "k", "probs", "head_weight", "head_bias"]
    upstream = torch.randn((), dtype=f64)
    for a, b in zip(_grads(ours * upstream, d, names), _grads(expected * upstream, d, names)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bilinear_resize_of_an_exact_x4_is_the_central_2x2_mean():
    probs = torch.rand(1, 2, 8, 12, dtype=f64)
    grid = (2, 3)
    central = probs.unfold(2, 4, 4).unfold(3, 4, 4)[..., 1:3, 1:3].mean((-1, -2))
    torch.testing.assert_close(bilinear_to_grid(probs, grid), central)
    d = _inputs(batch=1, heads=1, grid=grid, dim=4, classes=2, probs_factor=4)
    loss_a = attentive_similarity_loss(d["q"], d["k"], d["probs"], d["head_weight"], d["head_bias"], grid=grid,
                                       backend="reference")
    p_grid = d["probs"].detach().unfold(2, 4, 4).unfold(3, 4, 4)[..., 1:3, 1:3].mean((-1, -2))
    loss_b = attentive_similarity_loss(d["q"], d["k"], p_grid, d["head_weight"], d["head_bias"], grid=grid,
                                       backend="reference")
    torch.testing.assert_close(loss_a, loss_b)


def test_gradient_switches():
    d = _inputs(batch=2, grid=(3, 4), dim=4)
    args = (d["q"], d["k"], d["probs"], d["head_weight"], d["head_bias"])
    no_kernel = attentive_similarity_loss(*args, grid=(3, 4), grad_kernel=False, backend="reference")
    g = _grads(no_kernel, d, ["q", "k", "probs", "head_weight", "head_bias"])
    assert g[0] is None and g[1] is None and g[3] is None and g[4] is None and g[2].abs().sum() > 0
    no_probs = attentive_similarity_loss(*args, grid=(3, 4), grad_probs=False, backend="reference")
    g = _grads(no_probs, d, ["q", "k", "probs", "head_weight", "head_bias"])
    assert g[2] is None and all(x.abs().sum() > 0 for x in (g[0], g[1], g[3], g[4]))
    torch.testing.assert_close(no_kernel, no_probs)
    with pytest.raises(ValueError, match="grad_probs and grad_kernel"):
        attentive_similarity_loss(*args, grid=(3, 4), grad_probs=False, grad_kernel=False)


def test_zero_gate_removes_a_sample_and_keeps_the_denominator():
    d = _inputs(batch=2, grid=(3, 3), dim=4)
    args = (d["q"], d["k"], d["probs"], d["head_weight"], d["head_bias"])
    both = attentive_similarity_loss(*args, grid=(3, 3), backend="reference")
    first = attentive_similarity_loss(*args, grid=(3, 3), sample_weight=torch.tensor([1.0, 0.0], dtype=f64),
                                      backend="reference")
    second = attentive_similarity_loss(*args, grid=(3, 3), sample_weight=torch.tensor([False, True]),
                                       backend="reference")
    torch.testing.assert_close(first + second, both)


def test_extreme_logits_do_not_overflow():
    d = make_similarity_inputs(batch=1, heads=1, grid=(3, 3), dim=4, dtype=torch.float32)
    q = d["q"] * 1e3
    k = d["k"] * 1e3
    loss = attentive_similarity_loss(q, k, d["probs"], d["head_weight"], d["head_bias"], grid=(3, 3),
                                     backend="reference")
    assert torch.isfinite(loss)
    out, lse = spatial_attention(q[:, :, :, :], k, k, backend="reference")
    assert torch.isfinite(lse).all() and lse.abs().max() > 1e3


def test_decay_masks_match_the_loop():
    for h, w, r, s in [(4, 5, 2, 6.0), (3, 3, 5, 1.5), (6, 2, 1, 6)]:
        loop = decay_mask_loop(h, w, r, s)
        assert torch.equal(torch.from_numpy(window_decay_numpy(h, w, r, s)), loop)
        torch.testing.assert_close(window_decay(h, w, r, s, f64, "cpu"), loop, rtol=1e-15, atol=0)


def test_spatial_attention_reference():
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=f64) for _ in range(3))
    out, lse = spatial_attention(q, k, v, logit_scale=0.5, backend="reference")
    logits = torch.einsum("bhid,bhjd->bhij", q, k)
    torch.testing.assert_close(out, torch.softmax(logits / math.sqrt(8), -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(0.5 * logits, -1))
    assert lse.dtype == f64 and out.dtype == f64


def test_gradcheck_reference():
    d = _inputs(batch=1, heads=2, grid=(2, 3), dim=3, classes=2, probs_factor=1)
    gate = torch.tensor([1.0], dtype=f64)
    assert torch.autograd.gradcheck(
        lambda q, k, p, w, b: attentive_similarity_loss(q, k, p, w, b, grid=(2, 3), radius=1, sigma=1.0,
                                                        sample_weight=gate, backend="reference"),
        (d["q"], d["k"], d["probs"], d["head_weight"], d["head_bias"]))
