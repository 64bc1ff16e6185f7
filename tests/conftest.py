"""Test configuration. Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET
must be set before any @triton.jit module is imported, i.e. before attenscribble_ops."""
import os
import shutil
import subprocess

import pytest


def _gpu_visible() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if not _gpu_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import attenscribble_ops  # noqa: E402,F401
import triton_memcheck  # noqa: E402
from attenscribble_ops.testing import cuda_matmul_fp32  # noqa: E402

if triton_memcheck.enabled():
    # every Triton launch of the run: in bounds, no race between programs (tests/triton_memcheck.py)
    triton_memcheck.install()

CUDA = torch.cuda.is_available()


def _warm_up_vector_math() -> None:
    """MKL's vector exp and log once per float dtype, on a size MKL splits over its threads (4096)
    and on one torch splits (65536), before any test. With torch 2.13.0+cpu on the development
    CPU (2 threads), the first float64 exp over a 63 x 63 tensor of a fresh process returned
    values off by up to 3.2e-9 relative in the second thread's half in 6 scripts of 80 (log: up to
    2e-13); later calls are exact to an ulp. After an exp over 4096 values, 80 of 80 were exact.
    Under pytest the first call went wrong in 1 process of 190, and in 0 of 160 after this
    warm-up. Without it, a float64 oracle (a reference) could differ from one run to the next in
    whichever test made that first call."""
    for dtype in (torch.float32, torch.float64):
        for size in (4096, 1 << 16):
            x = torch.full((size,), 0.5, dtype=dtype)
            torch.exp(x)
            torch.log(x)


_warm_up_vector_math()


def pytest_report_header(config):
    return attenscribble_ops.explain().splitlines()[:4]


def pytest_terminal_summary(terminalreporter):
    if triton_memcheck.enabled():
        terminalreporter.write_line(
            f"Triton memcheck (interpreter): {triton_memcheck.launches_checked} launches, "
            f"{triton_memcheck.accesses_checked} loads and stores checked, "
            f"{triton_memcheck.faults_found} faults found")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# AddressSanitizer and UndefinedBehaviorSanitizer, every report fatal (tests/test_sanitizers.py)
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer")


def build_cuda_emulation(tmp_path_factory, source: str, *flags: str):
    """tests/cuda_emulation/<source>: host code running a CUDA kernel's device functions, compiled
    with the system C++ compiler as a shared library (skips when there is none) and loaded by
    ctypes. With ATTENSCRIBBLE_EMULATION_SANITIZE=1, built with SANITIZE_FLAGS (the process must
    have the sanitizers' runtimes preloaded)."""
    import ctypes
    import pathlib

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("cuda_emulation") / (pathlib.Path(source).stem + ".so")
    if os.environ.get("ATTENSCRIBBLE_EMULATION_SANITIZE") == "1":
        flags = (*flags, *SANITIZE_FLAGS)  # tests/test_sanitizers.py
    cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", *flags, f"-I{root / 'csrc'}",
           str(root / "tests" / "cuda_emulation" / source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return ctypes.CDLL(str(out))


@pytest.fixture
def exact_fp32_matmul():
    """torch's default for CUDA fp32 matmuls (no TF32) for the test, whatever the process set."""
    with cuda_matmul_fp32("ieee"):
        yield
