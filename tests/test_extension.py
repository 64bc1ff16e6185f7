"""The compiled extension: it loads in the test environment (a broken build fails CI here), its
helper op is right for every dtype and passes opcheck, and every CUDA source compiles with nvcc
against torch's headers even without a CUDA build of torch or a GPU."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from attenscribble_ops import _extension
from attenscribble_ops.functional import clean_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_loaded():
    assert _extension.loaded(), _extension.load_error()
    assert _extension.has_kernel("clean_mask", "CPU")


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.float16, torch.bfloat16,
                                   torch.float32, torch.float64])
@pytest.mark.parametrize("out", [torch.float32, torch.float64])
def test_clean_mask_values(dtype, out):
    values = torch.tensor([[0.0, 0.5, 1.0, 1.5], [2.0, float("nan"), -1.0, 3.0]])
    mask = values.nan_to_num(0.0).to(dtype) if not dtype.is_floating_point else values.to(dtype)
    mask = mask.t()  # non-contiguous
    got = torch.ops.attenscribble_ops.clean_mask(mask, out)
    ref = mask.to(out)
    ref = torch.where(torch.isnan(ref) | (ref < 1), torch.zeros_like(ref), ref)
    assert got.dtype == out and torch.equal(got, ref)
    assert torch.equal(clean_mask(mask, out), ref)


def test_clean_mask_opcheck():
    mask = torch.rand(2, 1, 5, 6) * 2
    mask[0, 0, 0, 0] = float("nan")
    torch.library.opcheck(torch.ops.attenscribble_ops.clean_mask.default, (mask, torch.float32))
    torch.library.opcheck(torch.ops.attenscribble_ops.clean_mask.default, (mask.bool(), torch.float64))


CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Every CUDA source compiled for sm_90 against torch's headers (no GPU or CUDA torch needed),
    two at a time: {source: (returncode, stderr, object size)}."""
    import concurrent.futures

    out_dir = tmp_path_factory.mktemp("nvcc")

    def compile_one(source):
        obj = out_dir / (os.path.basename(source) + ".o")
        cmd = ["nvcc", "-std=c++20", "-arch=sm_90", "-c", "--expt-relaxed-constexpr", source, "-o", str(obj),
               "-I", os.path.join(ROOT, "csrc"), "-I", sysconfig.get_paths()["include"]]
        for path in include_paths():
            cmd += ["-I", path]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        return result.returncode, result.stderr, obj.stat().st_size if obj.exists() else 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CUDA_SOURCES, pool.map(compile_one, CUDA_SOURCES)))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[os.path.basename(s) for s in CUDA_SOURCES])
def test_cuda_source_compiles_with_nvcc(source, nvcc_results):
    """The device code compiles with nvcc, without warnings from our files, so CI catches a broken
    kernel without a GPU."""
    returncode, stderr, size = nvcc_results[source]
    assert returncode == 0, stderr[-4000:]
    assert size > 0
    ours = [line for line in stderr.splitlines() if "warning" in line.lower() and "/csrc/" in line]
    assert not ours, "\n".join(ours)
