"""The CUDA masked CRF kernels without a GPU: their block program (csrc/cuda/masked_crf_tile.cuh)
run on the CPU by a threaded emulation of the blocks (tests/cuda_emulation), against the
reference (tests/test_extension.py compiles csrc/cuda/masked_crf.cu itself with nvcc). With a
GPU, test_masked_crf.py and test_masked_crf_ops.py run the real kernels."""
import ctypes

import pytest
import torch

from conftest import build_cuda_emulation
from crf_cases import Case, op_arguments

TRIO = (1.0, 6.0, 0.1), (0.5, 2.0, None), (2.0, None, (0.3, None))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    lib = build_cuda_emulation(tmp_path_factory, "masked_crf_emulate.cpp", "-pthread")
    lib.crf_emulate.restype = ctypes.c_int
    return lib


def _chunk_for(classes):
    """The class chunk launch_chunked() picks in masked_crf.cu."""
    return 2 if classes <= 2 else 4 if classes <= 4 else 8


def emulate(lib, with_grad, probs, image, mask_dst, mask_src, compat, params, chunk, budget=40 * 1024):
    """The raw loss and (with_grad) its gradient from the emulated blocks, and the band plan
    (band_y, band_x, tiles) they used."""
    dtype = probs.dtype
    batch, classes = probs.shape[:2]
    pad = 5 - probs.dim()
    channels = 0 if image is None else image.shape[1]
    table = torch.tensor(params.table(channels), dtype=dtype)
    ints = (ctypes.c_int64 * 13)(batch, classes, channels, table.numel() // (2 + channels),
                                 *((1,) * pad + tuple(probs.shape[2:])), *((0,) * pad + tuple(params.radius)),
                                 mask_dst is not None, mask_src is not None, params.zero_padding)
    reals = (ctypes.c_double * 3)(*((1.0,) * pad + tuple(params.spacing)))
    grad = torch.full_like(probs, float("nan"))
    keep = [probs.contiguous(), image, mask_dst, mask_src, compat, table, grad if with_grad else None,
            torch.zeros((), dtype=dtype)]
    ptrs = (ctypes.c_void_p * 8)(*[None if t is None else t.data_ptr() for t in keep])
    plan = (ctypes.c_int64 * 3)()
    assert lib.crf_emulate(int(with_grad), int(dtype == torch.float64), chunk, ints, reals, ptrs,
                           ctypes.c_int64(budget), plan) == 0
    return keep[7], (grad if with_grad else None), tuple(plan)


CASES = [
    Case(shape=(13, 37), classes=3, radius=3),
    Case(shape=(1, 1), batch=1, classes=1),
    Case(shape=(2, 3), classes=2, radius=8, masks=("dst", "src")),
    Case(shape=(9, 40), classes=5, radius=(2, 4), padding="valid", masks=("src",)),
    Case(shape=(10, 12), classes=4, compat=True, masks=("dst", "src"), radius=2),
    Case(shape=(8, 33), classes=3, compat=True, masks=(), radius=2),
    Case(shape=(6, 9), kernels=TRIO, channels=2, radius=2),
    Case(shape=(5, 9), channels=10, radius=1),
    Case(shape=(5, 9), no_image=True, radius=3, masks=()),
    Case(shape=(3, 5, 9), radius=(1, 2, 2), spacing=(2.0, 1.0, 0.8), sigma_xy=3.0, masks=("dst", "src")),
    Case(shape=(2, 4, 35), classes=9, compat=True, radius=1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_emulated_cuda_kernels_match_reference(emulator, case, dtype):
    from attenscribble_ops.reference.masked_crf import masked_crf_reference
    from attenscribble_ops.testing import TOLERANCES

    probs, image, mask_dst, mask_src, compat, params = op_arguments(case, dtype)
    p = probs.detach().double().requires_grad_()
    up = lambda t: None if t is None else t.double()  # noqa: E731
    ref = masked_crf_reference(p, up(image), up(mask_dst), up(mask_src), up(compat), params)
    ref.backward()
    atol, rtol = TOLERANCES[dtype]
    scale = ref.detach().abs() + 1  # the raw sum grows with the number of pixels
    for chunk in sorted({_chunk_for(case.classes), 2}):
        loss_only, _, _ = emulate(emulator, False, probs, image, mask_dst, mask_src, compat, params, chunk)
        loss, grad, _ = emulate(emulator, True, probs, image, mask_dst, mask_src, compat, params, chunk)
        torch.testing.assert_close(loss_only.double(), ref.detach(), atol=atol * scale, rtol=rtol)
        torch.testing.assert_close(loss, loss_only, atol=atol * scale, rtol=rtol)
        torch.testing.assert_close(grad.double(), p.grad, atol=atol, rtol=rtol)


def test_emulated_bands_split_the_halo(emulator):
    """A small shared-memory budget splits the halo in bands along y and x: same results."""
    case = Case(shape=(12, 90), classes=3, radius=(2, 20), masks=("dst", "src"), compat=True)
    args = op_arguments(case, torch.float64)
    full_loss, full_grad, full_plan = emulate(emulator, True, *args, chunk=4, budget=1 << 20)
    loss, grad, plan = emulate(emulator, True, *args, chunk=4, budget=3000)
    assert full_plan[:2] == (12, 72) and plan[0] < 12 and plan[1] == 64
    torch.testing.assert_close(loss, full_loss, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(grad, full_grad, atol=1e-12, rtol=1e-12)
