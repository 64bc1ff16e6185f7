"""Fused masked CRF backends (cpu, triton, cuda) against the reference: values and gradients for
every option, 2-D and 3-D, odd shapes, every dtype; the module and drop-in classes on top.

Operator-level checks (gradcheck, opcheck, torch.compile, determinism, bad inputs) are in
test_masked_crf_ops.py; the CUDA kernels without a GPU in test_masked_crf_cuda.py.
"""
import pytest
import torch

import attenscribble_ops as ops
from attenscribble_ops import backends, compat, nn
from attenscribble_ops.testing import TOLERANCES
from crf_cases import Case, assert_matches_reference, loss_and_grad, make


TRIO = (1.0, 6.0, 0.1), (0.5, 2.0, None), (2.0, None, (0.3, None))

# Every option, for the compiled backends (fast): odd sizes, windows larger than the image,
# every mask role, compatibility, several descriptors, upsampled modalities, 3-D with spacing.
CASES = [
    Case(),
    Case(shape=(1, 1), batch=1, classes=1),
    Case(shape=(2, 3), classes=2, radius=8),
    Case(shape=(13, 37), classes=4, radius=5),
    Case(shape=(9, 11), classes=16, radius=(2, 3)),
    Case(shape=(17, 70), classes=4, radius=(3, 20)),
    Case(padding="valid", radius=2),
    Case(masks=()),
    Case(masks=("src",)),
    Case(masks=("dst", "src")),
    Case(masks=("dst", "src"), padding="valid"),
    Case(compat=True, masks=()),
    Case(compat=True, masks=("dst", "src"), classes=5, radius=2),
    Case(kernels=TRIO, channels=2, radius=2),
    Case(no_image=True, radius=3),
    Case(image_factor=2, masks=("dst", "src"), radius=2),
    Case(channels=3, sigma_image=(0.2, 0.5, 0.1)),
    Case(channels=10, shape=(6, 9), radius=2),
    Case(shape=(6, 9), spacing=(0.7, 1.3), sigma_xy=2.0, radius=2),
    Case(shape=(3, 4, 5), radius=1),
    Case(shape=(2, 9, 11), radius=(2, 1, 3), classes=4),
    Case(shape=(4, 6, 7), radius=(1, 2, 2), spacing=(2.5, 1.0, 1.2), sigma_xy=3.0, masks=("src",)),
    Case(shape=(3, 5, 4), compat=True, masks=("dst", "src"), radius=2),
    Case(shape=(3, 5, 4), padding="valid", kernels=TRIO, channels=2),
    Case(shape=(1, 1, 1), batch=1, classes=2, radius=3),
]
CLASSES = [Case(shape=(6, 5), classes=c, radius=2) for c in (1, 2, 3, 5, 8, 16)]
LOW_PRECISION = [
    Case(shape=(13, 37), classes=4, radius=5),
    Case(shape=(1, 1), batch=1, classes=1),
    Case(masks=("dst", "src"), compat=True, radius=2),
    Case(kernels=TRIO, channels=2, image_factor=2),
    Case(shape=(2, 9, 11), radius=(2, 1, 3), classes=4, masks=("dst", "src")),
]
RADII = [Case(shape=(10, 12), classes=3, radius=r) for r in range(1, 9)]

# The interpreter runs every program in Python: tiny shapes, small windows, few programs.
TRITON_CASES = [
    Case(),
    Case(shape=(1, 1), batch=1, classes=1),
    Case(shape=(4, 5), classes=16),
    Case(shape=(3, 4), radius=(1, 2), padding="valid", masks=("dst", "src")),
    Case(shape=(4, 5), compat=True, masks=("src",)),
    Case(shape=(4, 4), kernels=TRIO, channels=2),
    Case(shape=(4, 5), no_image=True, radius=2, masks=()),
    Case(shape=(3, 4), image_factor=2, spacing=(0.8, 1.5), sigma_xy=2.0),
    Case(shape=(2, 3, 4), radius=1, compat=True, masks=("dst", "src")),
    Case(shape=(2, 3, 3), radius=(1, 1, 2), batch=1, padding="valid", spacing=(2.0, 1.0, 1.0)),
    Case(shape=(4, 5), channels=4, sigma_image=(0.2, 0.5, 0.1, 0.3), radius=2),  # features past the 3 hoisted
]
# Image sizes whose tiles (16 x 32 pixels for 2 to 4 classes, 8 x 32 with compatibility and 5
# classes) include one whose whole window lies inside the image (the kernel's loop without masks).
INTERIOR = [
    Case(shape=(36, 68), batch=1, classes=4, radius=2, masks=("dst", "src")),
    Case(shape=(36, 68), batch=1, classes=5, radius=1, compat=True, masks=("dst",)),
    Case(shape=(3, 34, 66), batch=1, classes=2, radius=1, kernels=TRIO, channels=2, masks=("src",)),
    Case(shape=(36, 68), batch=1, classes=2, radius=1, channels=4, masks=()),
]
TRITON_CASES += INTERIOR


def _compiled(device="cpu"):
    reason = backends.why_not("masked_crf", device, backends.Meta(device, torch.float32, 4))
    if reason is None and device == "cuda" and not torch.cuda.is_available():
        reason = "CUDA kernels built, but no CUDA device"
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def _triton():
    reason = backends.why_not("masked_crf", "triton", backends.Meta("cpu" if not torch.cuda.is_available() else "cuda",
                                                                    torch.float32, 4))
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def _ids(cases):
    return [c.id() for c in cases]


@_compiled("cpu")
@pytest.mark.parametrize("case", CASES + CLASSES + RADII, ids=_ids(CASES + CLASSES + RADII))
def test_cpu_float64(case):
    assert_matches_reference("cpu", case)


@_compiled("cpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION, ids=_ids(LOW_PRECISION))
def test_cpu_low_precision(case, dtype):
    assert_matches_reference("cpu", case, dtype)


@_triton()
@pytest.mark.parametrize("case", TRITON_CASES, ids=_ids(TRITON_CASES))
def test_triton(case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert_matches_reference("triton", case, torch.float64, device)


@_triton()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [Case(shape=(4, 5), masks=("dst", "src")), INTERIOR[0]], ids=["small", "interior"])
def test_triton_low_precision(dtype, case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert_matches_reference("triton", case, dtype, device)


@_triton()
@pytest.mark.parametrize("case", [TRITON_CASES[0], INTERIOR[2]], ids=_ids([TRITON_CASES[0], INTERIOR[2]]))
def test_triton_int64_offsets_path(case, monkeypatch):
    """The kernel's int64 indexing (taken for samples of 2^31 elements or more) on small inputs."""
    from attenscribble_ops.triton import masked_crf as triton_crf

    monkeypatch.setattr(triton_crf, "_INT32_OFFSETS_BELOW", 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert_matches_reference("triton", case, torch.float64, device)


def test_triton_cases_include_interior_tiles():
    """The INTERIOR cases really have a tile whose window lies inside the image, with the tile
    sizes the Triton kernel launches with."""
    from attenscribble_ops.triton.masked_crf import _launch_geometry

    for case in INTERIOR:
        radius = (case.radius,) * len(case.shape)
        geo = _launch_geometry((case.batch, case.classes) + case.shape, radius, case.compat)
        bh, bw = geo["BLOCK_H"], geo["BLOCK_W"]
        rows = [y0 for y0 in range(0, geo["H"], bh) if y0 >= geo["EY"] and y0 + bh - 1 + geo["EY"] < geo["H"]]
        cols = [x0 for x0 in range(0, geo["W"], bw) if x0 >= geo["EX"] and x0 + bw - 1 + geo["EX"] < geo["W"]]
        planes = [z for z in range(geo["D"]) if z >= geo["EZ"] and z + geo["EZ"] < geo["D"]]
        assert rows and cols and planes, case


@_compiled("cuda")
@pytest.mark.parametrize("case", CASES + CLASSES + RADII, ids=_ids(CASES + CLASSES + RADII))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda(case, dtype):
    assert_matches_reference("cuda", case, dtype, "cuda")


@_compiled("cuda")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION, ids=_ids(LOW_PRECISION))
def test_cuda_low_precision(case, dtype):
    assert_matches_reference("cuda", case, dtype, "cuda")


@_compiled("cpu")
@pytest.mark.parametrize("which", ["probs", "image", "mask"])
def test_non_contiguous_inputs(which):
    tensors, options = make(Case(shape=(6, 9), masks=("dst", "src"), radius=2))
    contiguous = loss_and_grad("cpu", tensors, options, 1.3)
    strided = dict(tensors)
    if which == "probs":
        strided["probs"] = tensors["probs"].transpose(2, 3).contiguous().transpose(2, 3)
    elif which == "image":
        strided["image"] = torch.cat([tensors["image"]] * 2, dim=1)[:, ::2]
    else:
        strided["mask_dst"] = tensors["mask_dst"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided[{"mask": "mask_dst"}.get(which, which)].is_contiguous()
    loss, grad = loss_and_grad("cpu", strided, options, 1.3)
    assert torch.equal(loss, contiguous[0]) and torch.equal(grad, contiguous[1])


@_compiled("cpu")
def test_empty_masks_give_zero():
    tensors, options = make(Case(shape=(5, 6), masks=("dst", "src")))
    tensors["mask_dst"] = torch.zeros_like(tensors["mask_dst"])
    loss, grad = loss_and_grad("cpu", tensors, options, 1.0)
    ref_loss, ref_grad = loss_and_grad("reference", tensors, options, 1.0)
    assert loss == 0 and ref_loss == 0
    assert torch.equal(grad, ref_grad)


@_compiled("cpu")
def test_border_term_matches_the_original():
    """Zero padding adds weight*exp(-|f_i|^2/2) per out-of-image neighbour, with no gradient:
    the difference between "zeros" and "valid" is exactly that sum."""
    tensors, options = make(Case(shape=(7, 8), masks=("dst",), radius=3))
    zeros, grad_zeros = loss_and_grad("cpu", tensors, dict(options, padding="zeros"), 1.0)
    valid, grad_valid = loss_and_grad("cpu", tensors, dict(options, padding="valid"), 1.0)
    image, mask = tensors["image"][:, 0], tensors["mask_dst"][:, 0].double()
    ys, xs = torch.meshgrid(torch.arange(7.0, dtype=torch.float64), torch.arange(8.0, dtype=torch.float64),
                            indexing="ij")
    k0 = torch.exp(-0.5 * ((xs / 6) ** 2 + (ys / 6) ** 2 + (image / 0.1) ** 2))
    inside = ((torch.clamp(ys + 3, max=6) - torch.clamp(ys - 3, min=0) + 1)
              * (torch.clamp(xs + 3, max=7) - torch.clamp(xs - 3, min=0) + 1))
    expected = (mask * k0 * (49 - inside)).sum() / mask.sum()
    torch.testing.assert_close(zeros - valid, expected, atol=1e-12, rtol=1e-10)
    assert torch.equal(grad_zeros, grad_valid)


@_compiled("cpu")
def test_auto_uses_the_fused_kernel_on_cpu():
    assert backends.AUTO_ORDER["masked_crf"]["cpu"][0] == "cpu"
    assert backends.AUTO_ORDER["masked_crf"]["cuda"][:2] == ("triton", "cuda")  # measured on an H100
    name, _ = backends.select("masked_crf", "auto", backends.Meta("cpu", torch.float32, 4))
    assert name == "cpu"
    assert backends.select("masked_crf", "auto", backends.Meta("cpu", torch.float16, 5))[0] == "cpu"
    assert "auto -> cpu" in ops.explain("masked_crf", torch.rand(1, 2, 4, 4))


@_compiled("cpu")
def test_module_matches_functional():
    tensors, options = make(Case(shape=(6, 7), masks=("dst", "src"), radius=2))
    module = nn.MaskedCRFLoss(**options)
    assert module.options["backend"] == "auto"
    got = module(tensors["probs"], tensors["image"], mask_dst=tensors["mask_dst"], mask_src=tensors["mask_src"])
    want = ops.masked_crf_loss(**tensors, **options, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@_compiled("cpu")
@pytest.mark.parametrize("with_compat", [False, True])
def test_drop_in_class_uses_fused_kernel(with_compat):
    """ModelLossSemsegGatedCRF with its original arguments: fused ("auto") == reference, value and
    gradient, including a mask and the modality at twice the prediction resolution."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 12, 10, generator=g, dtype=torch.float64)
    image = torch.rand(2, 1, 24, 20, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 1, 24, 20, generator=g) < 0.9).double()
    desc = [{"weight": 1, "xy": 6, "rgb": 0.1}, {"weight": 0.5, "xy": 2}]
    matrix = torch.rand(4, 4, generator=g, dtype=torch.float64).fill_diagonal_(0) if with_compat else None
    results = []
    for backend in ("auto", "reference"):
        probs = logits.softmax(1).requires_grad_()
        out = compat.ModelLossSemsegGatedCRF(backend=backend)(probs, desc, 5, {"rgb": image}, 24, 20, mask_dst=mask,
                                                             compatibility=matrix)
        out["loss"].backward()
        results.append((out["loss"].detach(), probs.grad))
    (loss, grad), (ref_loss, ref_grad) = results
    atol, rtol = TOLERANCES[torch.float64]
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol)
