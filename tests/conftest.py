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

CUDA = torch.cuda.is_available()


def pytest_report_header(config):
    return attenscribble_ops.explain().splitlines()[:4]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
