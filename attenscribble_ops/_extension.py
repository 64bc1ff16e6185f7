"""The one place that loads the compiled extension ``attenscribble_ops._C`` and remembers why it
could not (not built, built against another torch, a missing shared library...)."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    _LOAD_ERROR: str | None = None
except (ImportError, OSError) as exc:  # never fail the package import for lack of a build
    _C = None
    _LOAD_ERROR = (
        f"attenscribble_ops._C could not be imported ({type(exc).__name__}: {exc}); build it with "
        "`pip install --no-build-isolation -e .` against the installed torch"
    )

NAMESPACE = "attenscribble_ops"


def loaded() -> bool:
    return _C is not None


def load_error() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    return _LOAD_ERROR


def with_cuda() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    return bool(_C is not None and getattr(_C, "WITH_CUDA", 0))


def with_openmp() -> bool:
    return bool(_C is not None and getattr(_C, "WITH_OPENMP", 0))


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``attenscribble_ops::<op>`` has a compiled kernel for a dispatch key ("CPU", "CUDA")."""
    if _C is None:
        return False
    name = f"{NAMESPACE}::{op}"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key))
    except RuntimeError:  # the schema itself is unknown
        return False


def why_no_kernel(op: str, device_type: str) -> str | None:
    """None if ``op`` has a compiled kernel for ``device_type``, else the reason."""
    if _C is None:
        return _LOAD_ERROR
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return f"no compiled kernels exist for device type {device_type!r}"
    if key == "CUDA" and not with_cuda():
        why = "torch is a CPU build" if torch.version.cuda is None else "FORCE_ONLY_CPU or no CUDA toolkit at build time"
        return f"attenscribble_ops._C was built without its CUDA sources ({why})"
    if not has_kernel(op, key):
        return f"this build of attenscribble_ops._C has no {key} kernel for {op}"
    return None
