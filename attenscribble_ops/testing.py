"""Helpers for tests, benchmarks and examples: input makers, a tolerance table, the backends that
can run here, and time / peak-memory measurement (CUDA allocator statistics on the GPU, the
process's peak resident set on Linux CPUs)."""
from __future__ import annotations

import contextlib
import ctypes
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

from . import backends

# (atol, rtol) for comparing a backend with the float64 reference, by input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def runnable_backends(op: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      ndim: int = 4) -> list[str]:
    """Backends that can run ``op`` on such inputs in this installation."""
    meta = backends.Meta(torch.device(device).type, dtype, ndim)
    return [b for b in backends.BACKENDS if backends.why_not(op, b, meta) is None]


def loss_backend_for(attention_backend: str) -> str:
    """The similarity loss's backend beside an attention backend: the same one where it implements
    the loss, else "auto" ("aten" computes the attention only)."""
    return attention_backend if attention_backend in backends.available_backends()["attentive_similarity"] else "auto"


def make_crf_inputs(batch: int = 2, classes: int = 4, shape: Sequence[int] = (32, 32), *, channels: int = 1,
                    image_factor: int = 1, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                    mask_fraction: Optional[float] = 0.9) -> dict:
    """probs (softmax of random logits), an image in [0, 1] at ``image_factor`` x the prediction
    resolution, and a random destination mask with ``mask_fraction`` of ones (None: no mask)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    logits = 2.0 * torch.randn((batch, classes) + shape, generator=g, dtype=torch.float64)
    image_shape = tuple(s * image_factor for s in shape)
    out = {
        "probs": logits.softmax(1).to(device=device, dtype=dtype),
        "image": torch.rand((batch, channels) + image_shape, generator=g, dtype=torch.float64).to(device=device,
                                                                                                dtype=dtype),
    }
    if mask_fraction is not None:
        mask = (torch.rand((batch, 1) + shape, generator=g) < mask_fraction).to(dtype)
        out["mask_dst"] = mask.to(device)
    return out


def make_similarity_inputs(batch: int = 2, heads: int = 1, grid: Sequence[int] = (8, 8), dim: int = 16,
                           classes: int = 4, probs_factor: int = 4, *, dtype: torch.dtype = torch.float32,
                           device="cpu", seed: int = 0, logit_std: float = 1.0) -> dict:
    """q, k (B, heads, n, D) scaled so the logits have about ``logit_std`` spread; probs at
    ``probs_factor`` x the grid; head weights and bias as the official init."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    n = h * w
    scale = (logit_std / dim ** 0.5) ** 0.5
    q = torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64) * scale
    k = torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64) * scale
    logits = 2.0 * torch.randn(batch, classes, h * probs_factor, w * probs_factor, generator=g, dtype=torch.float64)
    bound = 1.0 / heads ** 0.5
    return {
        "q": q.to(device=device, dtype=dtype),
        "k": k.to(device=device, dtype=dtype),
        "probs": logits.softmax(1).to(device=device, dtype=dtype),
        "head_weight": ((torch.rand(heads, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(device=device,
                                                                                               dtype=dtype),
        "head_bias": ((torch.rand((), generator=g, dtype=torch.float64) * 2 - 1) * bound).to(device=device,
                                                                                          dtype=dtype),
        "grid": (h, w),
    }


@contextlib.contextmanager
def cuda_matmul_fp32(precision: str):
    """torch's CUDA fp32 matmul precision ("ieee" or "tf32") for the block, then restored. Through
    torch's newer setting only: reading the legacy allow_tf32 raises once the two disagree, and
    neither is a plain attribute that pytest's monkeypatch could undo."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


def device_name(device="cpu") -> str:
    """The card's name, or the CPU model from /proc/cpuinfo with the torch thread count: what every
    benchmark figure is labelled with."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], device="cpu", *, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` calls (device synchronised)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def available_memory_gib() -> float:
    """The memory the kernel can still hand out (MemAvailable of /proc/meminfo), in GiB; 0 where it
    cannot be read. Tests on tensors past 2**31 elements check it before they run."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2 ** 20
    except (OSError, KeyError, ValueError):
        return 0.0


_M_MMAP_THRESHOLD = -3


def _release_freed_cpu_memory() -> None:
    """Make glibc return freed memory to the OS, so that the resident set tracks live tensors:
    fix the mmap threshold (by default it grows after each large free, after which big tensors
    come from the heap and stay resident when freed) and trim the heap."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 17)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def peak_memory(fn: Callable[[], object], device="cpu") -> Optional[int]:
    """Extra bytes at the peak of ``fn()`` over what was allocated before it.

    CUDA: the caching allocator's peak. CPU (Linux, glibc): the process's peak resident set (VmHWM,
    reset through /proc/self/clear_refs) minus the resident set before the call, after making
    glibc hand freed memory back; None where that is unavailable. CPU figures are page-granular
    and include allocator slack: coarser than CUDA's."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _release_freed_cpu_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _read_status_kib("VmRSS")
    fn()
    peak = _read_status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024
