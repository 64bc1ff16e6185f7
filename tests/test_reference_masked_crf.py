"""The reference masked CRF loss against the brute-force per-pair oracle (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from attenscribble_ops import CRFKernel, masked_crf_loss

from oracles import crf_pairs_loss

f64 = torch.float64


def _probs(B, C, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn((B, C) + tuple(shape), generator=g, dtype=f64)).softmax(1)


def _rand(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _check(probs, oracle_kwargs, loss_kwargs, image=None, oracle_image=None):
    p1 = probs.clone().requires_grad_()
    p2 = probs.clone().requires_grad_()
    ours = masked_crf_loss(p1, image, backend="reference", **loss_kwargs)
    expected = crf_pairs_loss(p2, image if oracle_image is None else oracle_image, **oracle_kwargs)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn((), dtype=f64)
    (ours * upstream).backward()
    (expected * upstream).backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-12)
    assert ours.dtype == f64


@pytest.mark.parametrize("padding", ["zeros", "valid"])
@pytest.mark.parametrize("shape,radius", [((5, 6), 2), ((3, 4), 3), ((1, 7), 1)])
def test_default_kernel_matches_pairs(shape, radius, padding):
    probs = _probs(2, 3, shape)
    image = _rand((2, 1) + shape)
    _check(probs, dict(radius=radius, descs=[(1.0, 6.0, (0.1,))], padding=padding),
           dict(radius=radius, padding=padding), image)


def test_border_term_is_the_original_constant():
    """With padding="zeros" and uniform probabilities, only the border term survives:
    sum over out-of-image neighbours of exp(-|f_i|^2/2), f_i = (x/6, y/6, I/0.1)."""
    B, C, H, W, r = 1, 2, 4, 5, 2
    probs = torch.full((B, C, H, W), 0.5, dtype=f64)
    image = _rand((B, 1, H, W))
    loss = masked_crf_loss(probs, image, radius=r, backend="reference")
    inside = masked_crf_loss(probs, image, radius=r, padding="valid", backend="reference")
    border = 0.0
    for y in range(H):
        for x in range(W):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    if not (0 <= y + dy < H and 0 <= x + dx < W):
                        border += torch.exp(-0.5 * ((x / 6) ** 2 + (y / 6) ** 2 + (image[0, 0, y, x] / 0.1) ** 2))
    torch.testing.assert_close((loss - inside) * (B * H * W), torch.as_tensor(border, dtype=f64))


def test_masks_several_kernels_and_channels():
    shape = (5, 6)
    probs = _probs(2, 4, shape, seed=3)
    image = _rand((2, 2) + shape, seed=4)
    mask_dst = (_rand((2, 1) + shape, seed=5) > 0.3).to(f64)
    mask_src = (_rand((2, 1) + shape, seed=6) > 0.4).to(f64)
    kernels = [CRFKernel(0.7, 3.0, (0.2, 0.5)), (0.3, 2.0, None), {"weight": 0.5, "image": 0.3}]
    descs = [(0.7, 3.0, (0.2, 0.5)), (0.3, 2.0, None), (0.5, None, (0.3, 0.3))]
    for dst, src in [(mask_dst, None), (None, mask_src), (mask_dst, mask_src)]:
        _check(probs, dict(radius=2, descs=descs, mask_dst=dst, mask_src=src),
               dict(radius=2, kernels=kernels, mask_dst=dst, mask_src=src), image)


def test_compatibility_matrix_intended_formula():
    shape = (4, 5)
    probs = _probs(2, 3, shape, seed=7)
    image = _rand((2, 1) + shape, seed=8)
    compat = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 2.0], [0.5, 0.5, 0.0]], dtype=f64)
    mu = 2 * compat / compat.abs().sum(1, keepdim=True)
    mask = (_rand((2, 1) + shape, seed=9) > 0.3).to(f64)
    _check(probs, dict(radius=2, descs=[(1.0, 6.0, (0.1,))], compat=mu, mask_dst=mask),
           dict(radius=2, compatibility=compat, mask_dst=mask), image)


def test_potts_is_the_compatibility_one_minus_identity():
    """mu = 1 - I gives sum_{c != c'} P_ic K_ij P_jc' = sum K - sum P K P on the simplex: the Potts
    loss exactly, when no out-of-image neighbour adds the border constant (padding="valid")."""
    shape = (4, 4)
    probs = _probs(1, 3, shape, seed=10)
    image = _rand((1, 1) + shape, seed=11)
    potts = masked_crf_loss(probs, image, radius=1, padding="valid", backend="reference")
    comp = masked_crf_loss(probs, image, radius=1, padding="valid", compatibility=1 - torch.eye(3),
                           backend="reference")
    torch.testing.assert_close(potts, comp, rtol=1e-10, atol=1e-12)


def test_3d_anisotropic_spacing_and_image_at_higher_resolution():
    shape = (3, 4, 4)
    probs = _probs(2, 2, shape, seed=12)
    image_full = _rand((2, 1, 6, 8, 8), seed=13)
    image = F.avg_pool3d(image_full, 2)
    spacing = (3.0, 1.2, 0.8)
    _check(probs, dict(radius=(1, 1, 2), descs=[(1.0, 4.0, (0.2,))], spacing=spacing),
           dict(radius=(1, 1, 2), sigma_xy=4.0, sigma_image=0.2, spacing=spacing), image_full, image)


def test_masks_at_higher_resolution_are_area_downsampled_and_cleaned():
    shape = (4, 6)
    probs = _probs(2, 3, shape, seed=14)
    image = _rand((2, 1) + shape, seed=15)
    full = _rand((2, 1, 8, 12), seed=16)
    full[full < 0.15] = float("nan")
    full = torch.where(full > 0.3, torch.ones_like(full), full)
    pooled = F.avg_pool2d(full, 2)  # a NaN anywhere in a block makes the block NaN, then 0
    expected_mask = torch.where(torch.isnan(pooled) | (pooled < 1), torch.zeros_like(pooled), pooled)
    _check(probs, dict(radius=1, descs=[(1.0, 6.0, (0.1,))], mask_dst=expected_mask),
           dict(radius=1, mask_dst=full), image)
    assert torch.isnan(full).any(), "the caller's mask must not be modified"


def test_bool_mask_without_channel_axis_and_empty_mask():
    shape = (4, 4)
    probs = _probs(2, 3, shape, seed=17)
    image = _rand((2, 1) + shape, seed=18)
    mask = _rand((2,) + shape, seed=19) > 0.5
    a = masked_crf_loss(probs, image, radius=1, mask_dst=mask, backend="reference")
    b = masked_crf_loss(probs, image, radius=1, mask_dst=mask.unsqueeze(1).to(f64), backend="reference")
    torch.testing.assert_close(a, b)
    empty = masked_crf_loss(probs, image, radius=1, mask_dst=torch.zeros_like(mask), backend="reference")
    assert empty.item() == 0.0  # denominator clamped to 1, numerator 0


def test_fp16_inputs_accumulate_in_fp32():
    d = _probs(1, 3, (6, 6), seed=20)
    image = _rand((1, 1, 6, 6), seed=21)
    half = masked_crf_loss(d.half(), image.half(), radius=2, backend="reference")
    full = masked_crf_loss(d, image, radius=2, backend="reference")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), full, rtol=5e-3, atol=1e-3)


def test_gradcheck_reference():
    probs = _probs(1, 3, (4, 5), seed=22).requires_grad_()
    image = _rand((1, 1, 4, 5), seed=23)
    mask = (_rand((1, 1, 4, 5), seed=24) > 0.3).to(f64)
    assert torch.autograd.gradcheck(
        lambda p: masked_crf_loss(p, image, radius=2, mask_dst=mask, backend="reference"), (probs,))
    assert torch.autograd.gradgradcheck(
        lambda p: masked_crf_loss(p, image, radius=1, compatibility=1 - torch.eye(3), backend="reference"),
        (probs,))
