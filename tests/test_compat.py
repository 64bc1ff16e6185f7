"""Drop-in classes against the spec's formulas: the Gated CRF class (dict and tensor samples, masks,
several kernel descriptors, the border term, compatibility) and AttnGatedCRF (every flag)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attenscribble_ops.compat import AttnGatedCRF, ModelLossSemsegGatedCRF, pre_compute_xy_mask

from oracles import bilinear_to_grid, crf_pairs_loss, decay_mask_loop

f64 = torch.float64


def _probs(B, C, H, W, seed=0):
    return (2 * torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=f64)).softmax(1)


def _rand(*shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _compare(ours, expected, p1, p2):
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-12)


def test_dict_sample_two_modalities_two_kernels_masks():
    B, C, H, W = 2, 3, 4, 5
    probs = _probs(B, C, H, W)
    rgb = _rand(B, 3, 2 * H, 2 * W, seed=2)
    depth = _rand(B, 1, 2 * H, 2 * W, seed=3)
    mask_src = (_rand(B, 1, H, W, seed=4) > 0.3).to(f64)
    mask_dst = (_rand(B, 1, H, W, seed=5) > 0.2).to(f64)
    descs = [{"weight": 0.9, "xy": 6, "rgb": 0.1, "depth": 0.5}, {"weight": 0.1, "xy": 3}]
    p1, p2 = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    out = ModelLossSemsegGatedCRF(backend="reference")(p1, descs, 2, {"rgb": rgb, "depth": depth}, 2 * H, 2 * W,
                                                        mask_src=mask_src, mask_dst=mask_dst)
    assert set(out) == {"loss"}
    image = torch.cat([F.avg_pool2d(rgb, 2), F.avg_pool2d(depth, 2)], 1)
    expected = crf_pairs_loss(p2, image, radius=2, mask_src=mask_src, mask_dst=mask_dst,
                              descs=[(0.9, 6.0, (0.1, 0.1, 0.1, 0.5)), (0.1, 3.0, None)])
    _compare(out["loss"], expected, p1, p2)


def test_tensor_sample_official_call_with_border_term():
    """The AttenScribble call: one kernel {"weight": 1, "xy": 6, "rgb": 0.1}, radius 5, the image
    tensor itself as sample, mask_dst = unannotated pixels; the border term is included."""
    B, C, H, W = 2, 4, 6, 7
    probs = _probs(B, C, H, W, seed=6)
    image = _rand(B, 1, H, W, seed=7)
    mask_dst = (_rand(B, 1, H, W, seed=8) > 0.1).to(f64)
    p1, p2 = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    out = ModelLossSemsegGatedCRF(backend="reference")(p1, [{"weight": 1, "xy": 6, "rgb": 0.1}], 5, image, H, W,
                                                        mask_src=None, mask_dst=mask_dst)
    expected = crf_pairs_loss(p2, image, radius=5, descs=[(1.0, 6.0, (0.1,))], mask_dst=mask_dst)
    _compare(out["loss"], expected, p1, p2)


def test_compatibility_branch_works_as_intended():
    B, C, H, W = 1, 3, 4, 4
    probs = _probs(B, C, H, W, seed=9)
    image = _rand(B, 1, H, W, seed=10)
    compat = torch.tensor([[0, 1, 2], [1, 0, 1], [4, 1, 0]], dtype=torch.float32)
    mu = (C - 1) * F.normalize(compat.double(), p=1, dim=1)
    p1, p2 = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    out = ModelLossSemsegGatedCRF(backend="reference")(p1, [{"weight": 1, "xy": 6, "rgb": 0.1}], 1, image, H, W,
                                                        compatibility=compat)
    expected = crf_pairs_loss(p2, image, radius=1, descs=[(1.0, 6.0, (0.1,))], compat=mu)
    _compare(out["loss"], expected, p1, p2)
    with pytest.raises(ValueError, match="diagonal"):
        ModelLossSemsegGatedCRF()(probs, [{"weight": 1, "xy": 6}], 1, image, H, W, compatibility=torch.ones(3, 3))
    with pytest.raises(ValueError, match="negative"):
        ModelLossSemsegGatedCRF()(probs, [{"weight": 1, "xy": 6}], 1, image, H, W, compatibility=-compat)


def test_callers_tensors_are_never_mutated_and_custom_downsamplers_are_used():
    B, C, H, W = 1, 2, 4, 4
    probs = _probs(B, C, H, W, seed=11)
    image = _rand(B, 1, 2 * H, 2 * W, seed=12)
    mask = _rand(B, 1, H, W, seed=13).float()
    mask[0, 0, 0, 0] = float("nan")
    mask[0, 0, 1, 1] = 0.5
    image_copy, mask_copy = image.clone(), mask.clone()
    calls = []

    def nearest(x, size):
        calls.append(tuple(x.shape))
        return F.interpolate(x, size=size, mode="nearest")

    out = ModelLossSemsegGatedCRF(backend="reference")(
        probs, [{"weight": 1, "xy": 6, "rgb": 0.1}], 1, {"rgb": image}, 2 * H, 2 * W, mask_dst=mask,
        custom_modality_downsamplers={"rgb": nearest})
    assert calls == [tuple(image.shape)]
    assert torch.equal(image, image_copy) and torch.equal(mask.nan_to_num(7), mask_copy.nan_to_num(7))
    cleaned = torch.where(torch.isnan(mask) | (mask < 1), 0.0, mask).double()
    expected = crf_pairs_loss(probs, F.interpolate(image, size=(H, W), mode="nearest"), radius=1,
                              descs=[(1.0, 6.0, (0.1,))], mask_dst=cleaned)
    torch.testing.assert_close(out["loss"], expected)


def test_kernels_visualisation_tiles_the_dense_kernels():
    B, C, H, W, r = 1, 2, 6, 6, 1
    probs = _probs(B, C, H, W, seed=14)
    image = _rand(B, 1, H, W, seed=15)
    out = ModelLossSemsegGatedCRF(backend="reference")(probs, [{"weight": 1, "xy": 2, "rgb": 0.5}], r, image,
                                                        2 * H, 2 * W, out_kernels_vis=True)
    vis = out["kernels_vis"]
    assert vis.shape == (B, 1, 2 * H, 2 * W)
    # tile (0, 0) shows the window of centre (1, 1): entry (dy, dx) = K((1, 1), (1 + dy - 1, 1 + dx - 1))
    for dy in range(3):
        for dx in range(3):
            y, x = dy, dx
            if (y, x) == (1, 1):
                expected = 0.0
            else:
                d2 = ((x - 1) / 2) ** 2 + ((y - 1) / 2) ** 2 + ((image[0, 0, y, x] - image[0, 0, 1, 1]) / 0.5) ** 2
                expected = float(torch.exp(-0.5 * d2))
            assert vis[0, 0, 2 * dy, 2 * dx].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_kernels_visualisation_with_a_radius_per_axis():
    """(rh, rw) = (1, 2): 3 x 5 tiles, tile (0, 0) the window of centre (1, 2)."""
    B, C, H, W = 2, 3, 4, 6
    probs = _probs(B, C, H, W, seed=16)
    image = _rand(B, 1, 2 * H, 2 * W, seed=17)
    out = ModelLossSemsegGatedCRF(backend="reference")(probs, [{"weight": 1, "xy": 6, "rgb": 0.1}], (1, 2), image,
                                                        2 * H, 2 * W, out_kernels_vis=True)
    vis = out["kernels_vis"]
    assert vis.shape == (B, 1, 2 * H, 2 * W)
    small = F.adaptive_avg_pool2d(image, (H, W))
    for b in range(B):
        for dy in range(3):
            for dx in range(5):
                if (dy, dx) == (1, 2):
                    expected = 0.0
                else:
                    d2 = ((dx - 2) / 6) ** 2 + ((dy - 1) / 6) ** 2 + ((small[b, 0, dy, dx] - small[b, 0, 1, 2]) / 0.1) ** 2
                    expected = float(torch.exp(-0.5 * d2))
                assert vis[b, 0, 2 * dy, 2 * dx].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_custom_downsampler_runs_at_the_prediction_size_too():
    """The original passes every image modality through its downsampler, whatever its size."""
    probs = _probs(1, 2, 4, 4, seed=18)
    image = _rand(1, 1, 4, 4, seed=19)
    desc = [{"weight": 1, "xy": 3, "rgb": 0.1}]
    halved = ModelLossSemsegGatedCRF(backend="reference")(
        probs, desc, 1, {"rgb": image}, 4, 4, custom_modality_downsamplers={"rgb": lambda x, size: 0.5 * x})
    expected = crf_pairs_loss(probs, 0.5 * image, radius=1, descs=[(1.0, 3.0, (0.1,))])
    torch.testing.assert_close(halved["loss"], expected)


def test_bad_inputs_of_the_gated_crf_class():
    probs = _probs(1, 2, 4, 4)
    image = _rand(1, 1, 4, 4)
    loss = ModelLossSemsegGatedCRF()
    with pytest.raises(ValueError, match="height_input"):
        loss(probs, [{"weight": 1, "xy": 6}], 1, image, 6, 4)
    with pytest.raises(ValueError, match="'rgb'"):
        loss(probs, [{"weight": 1, "xy": 6, "rgb": 0.1}], 1, {"depth": image}, 4, 4)
    with pytest.raises(TypeError, match="kernels_desc"):
        loss(probs, {"weight": 1, "xy": 6}, 1, image, 4, 4)
    with pytest.raises(ValueError, match="mask_dst"):
        loss(probs, [{"weight": 1, "xy": 6}], 1, image, 4, 4, mask_dst=torch.ones(1, 2, 4, 4))
    rgb = [{"weight": 1, "xy": 6, "rgb": 0.1}]
    with pytest.raises(ValueError, match="'depth'.*keys: 'rgb', 1"):
        loss(probs, [{"weight": 1, "xy": 6, "depth": 0.1}], 1, {"rgb": image, 1: image}, 4, 4)
    with pytest.raises(ValueError, match=r"sample\['rgb'\] has batch size 2"):
        loss(probs, rgb, 1, {"rgb": _rand(2, 1, 4, 4)}, 4, 4)
    with pytest.raises(TypeError, match="custom_modality_downsamplers must be a dict"):
        loss(probs, rgb, 1, image, 4, 4, custom_modality_downsamplers=[1])
    with pytest.raises(ValueError, match=r"custom_modality_downsamplers\['rgb'\] must return"):
        loss(probs, rgb, 1, {"rgb": image}, 4, 4, custom_modality_downsamplers={"rgb": lambda x, size: None})


def _attn_expected(probs, kernel, h, w, radius, sigma, gate=None):
    p = bilinear_to_grid(probs, (h, w)).flatten(2).transpose(1, 2)
    mask = decay_mask_loop(h, w, radius, sigma)
    b, n = kernel.shape[0], h * w
    total = 0
    for i in range(b):
        g = 1.0 if gate is None else gate[i]
        total = total + g * (mask * kernel[i] * (1 - p[i] @ p[i].T)).sum()
    return total / (b * n)


@pytest.mark.parametrize("desc, error, message", [
    ([{"weight": 1, "xy": -1, "rgb": 0.1}], ValueError, r"^kernels_desc\[0\]\['xy'\] must be > 0, got -1"),
    ([{"weight": 1, "xy": 6}, {"weight": float("nan"), "xy": 6}], ValueError,
     r"^kernels_desc\[1\]\['weight'\] must be finite"),
    ([{"weight": 1, "xy": "6"}], TypeError, r"^kernels_desc\[0\]\['xy'\] must be a real number"),
    ([{"weight": 1, "xy": 6, "rgb": 0.1, "depth": -2}], ValueError, r"^kernels_desc\[0\]\['depth'\] must be > 0"),
    ([{"weight": 1, "xy": 6, "rgb": 1e-30}], ValueError,
     r"^kernels_desc\[0\]\['rgb'\] = 1e-30 is out of range .*\(kernels_desc\[0\]\['rgb'\] between"),
    ([{"weight": 1, "xy": 1e30}], ValueError, r"^kernels_desc\[0\]\['xy'\] = 1e\+30 is out of range"),
    ([{"weight": 1, "xy": 6, "depth": 1e-30}], ValueError,  # a one-channel image: no channel index
     r"^kernels_desc\[0\]\['depth'\] = 1e-30 is out of range"),
    ([{"weight": 1, "xy": 6}, {"weight": 2}], ValueError, r"^kernels_desc\[1\] has neither sigma_xy nor"),
    ([{"xy": 6}], TypeError, r"^kernels_desc\[0\]\['weight'\] must be a real number, got None")])
@pytest.mark.parametrize("vis", [False, True])
def test_gated_crf_class_errors_name_the_kernels_desc_entries(desc, error, message, vis):
    """Not kernels[i].sigma_xy, the functional API's names: kernels_desc[i]['xy'], the modality's key
    (float32 probabilities: the range check is the accumulate dtype's)."""
    probs = _probs(1, 2, 4, 4).float()
    sample = {"rgb": _rand(1, 3, 8, 8).float(), "depth": _rand(1, 1, 8, 8).float()}
    with pytest.raises(error, match=message):
        ModelLossSemsegGatedCRF()(probs, desc, 1, sample, 8, 8, out_kernels_vis=vis)


@pytest.mark.parametrize("is_y_grad,is_k_grad", [(True, True), (True, False), (False, True)])
def test_attn_gated_crf_flags(is_y_grad, is_k_grad):
    h, w = 3, 4
    probs = _probs(2, 3, 6, 8, seed=16).requires_grad_()
    kernel = torch.sigmoid(torch.randn(2, h * w, h * w, dtype=f64)).requires_grad_()
    mask = pre_compute_xy_mask(h, w, 2, 6)
    out = AttnGatedCRF()(probs, kernel, mask, h, w, is_y_grad=is_y_grad, is_k_grad=is_k_grad,
                         is_exclude_sc=True, batch_is_sc=[False, True])
    gate = [1.0, 0.0] if is_k_grad else None
    expected = _attn_expected(probs, kernel, h, w, 2, 6, gate)
    torch.testing.assert_close(out["loss"], expected.detach())
    out["loss"].backward()
    assert (probs.grad is not None) == is_y_grad
    assert (kernel.grad is not None) == is_k_grad
    if is_k_grad:
        assert kernel.grad[1].abs().sum() == 0 and kernel.grad[0].abs().sum() > 0
    p2, k2 = probs.detach().clone().requires_grad_(), kernel.detach().clone().requires_grad_()
    _attn_expected(p2, k2, h, w, 2, 6, gate).backward()
    if is_y_grad:
        torch.testing.assert_close(probs.grad, p2.grad)
    if is_k_grad:
        torch.testing.assert_close(kernel.grad, k2.grad)


def test_attn_gated_crf_mask_cache_and_errors():
    h, w = 3, 3
    probs = _probs(1, 2, 3, 3)
    kernel = torch.rand(1, 9, 9, dtype=f64)
    loss = AttnGatedCRF()
    a = pre_compute_xy_mask(h, w, 1, 6)
    b = pre_compute_xy_mask(h, w, 2, 6)
    la, lb, la2 = (loss(probs, kernel, m, h, w)["loss"] for m in (a, b, a))
    assert la.item() != lb.item() and la.item() == la2.item()
    with pytest.raises(ValueError, match="is_y_grad and is_k_grad"):
        loss(probs, kernel, a, h, w, is_y_grad=False, is_k_grad=False)
    with pytest.raises(ValueError, match="kernel must have shape"):
        loss(probs, kernel, a, 3, 4)
    with pytest.raises(ValueError, match="kernel_xy_mask"):
        loss(probs, kernel, np.zeros((4, 4)), h, w)
    with pytest.raises(TypeError, match="kernel_xy_mask must be a real"):
        loss(probs, kernel, np.full((9, 9), None), h, w)
    for bad in ("abc", [None], {"x": 1}):
        with pytest.raises(TypeError, match="batch_is_sc must be one flag per sample"):
            loss(probs, kernel, a, h, w, is_exclude_sc=True, batch_is_sc=bad)


def test_attn_gated_crf_takes_every_mask_layout_the_original_does():
    """Bool masks (the original converts them to float), flipped (negative-stride) and big-endian
    arrays give the float mask's loss."""
    h, w = 4, 5
    probs = _probs(2, 3, h, w, seed=20)
    kernel = torch.rand(2, h * w, h * w, dtype=f64)
    mask = pre_compute_xy_mask(h, w, 1, 6)
    loss = AttnGatedCRF()
    want = loss(probs, kernel, mask, h, w)["loss"]
    flipped = np.ascontiguousarray(mask[::-1, ::-1])[::-1, ::-1]
    assert flipped.strides[0] < 0
    for variant in (flipped, mask.astype(">f8")):
        torch.testing.assert_close(loss(probs, kernel, variant, h, w)["loss"], want, rtol=0, atol=0)
    binary = mask > 0
    torch.testing.assert_close(loss(probs, kernel, binary, h, w)["loss"],
                               loss(probs, kernel, binary.astype(np.float64), h, w)["loss"], rtol=0, atol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_attn_gated_crf_non_finite_kernel_outside_the_window_is_nan(value):
    """As the original (kernel * mask over the whole n x n kernel): NaN, on the lean path too."""
    h, w = 6, 6
    probs = _probs(2, 3, h, w, seed=21)
    kernel = torch.rand(2, h * w, h * w, dtype=f64)
    kernel[0, 0, h * w - 1] = value  # far outside the radius-1 window
    mask = pre_compute_xy_mask(h, w, 1, 6)
    probs.requires_grad_()
    loss = AttnGatedCRF()(probs, kernel, mask, h, w)["loss"]
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(probs.grad).all()  # a gradient scaler skips the step, as with the original
    assert torch.isnan(_attn_expected(probs, kernel, h, w, 1, 6))


def test_attn_gated_crf_fp16_kernel_with_a_large_total_is_finite():
    """The finiteness check sums in fp32: an fp16 kernel whose total passes 65504 is not NaN."""
    h, w = 16, 16
    probs = _probs(4, 3, h, w, seed=22).float()
    kernel = torch.softmax(torch.randn(4, h * w, h * w), -1).mul(64).half()  # total 4 * 256 * 64
    assert not torch.isfinite(kernel.sum())
    mask = pre_compute_xy_mask(h, w, 1, 6)
    loss = AttnGatedCRF()(probs, kernel, mask, h, w)["loss"]
    want = AttnGatedCRF()(probs, kernel.float(), mask, h, w)["loss"]
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-6)


def test_pre_compute_xy_mask_is_the_loop_bitwise():
    for args in [(4, 6, 2, 6), (5, 5, 5, 6.0), (2, 9, 1, 0.7)]:
        got = pre_compute_xy_mask(*args)
        assert got.dtype == np.float64
        assert np.array_equal(got, decay_mask_loop(*args).numpy())
