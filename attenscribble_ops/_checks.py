"""Argument checks shared by the public functions. Each failure is a ValueError or TypeError that
names the argument and says what was expected. Only metadata and Python values are inspected (no
host synchronisation), so the checks are free under torch.compile."""
from __future__ import annotations

import functools
import inspect
import numbers
import sys
from typing import Optional, Sequence

import torch
from torch.autograd import forward_ad

FORWARD_AD = "forward-mode AD"
ONNX_EXPORT = "ONNX export"
TORCHSCRIPT_TRACE = "TorchScript trace"
COMPILED_TRANSFORM = "torch.compile over torch.func transforms"


def _jvp_transform_active() -> bool:
    """Whether a torch.func forward-mode transform (jvp, jacfwd, hessian's outer jacfwd) is active
    at any level, below or above other transforms (vmap, grad). Eager mode only."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def forward_ad_option(*tensors) -> str:
    """:data:`FORWARD_AD` under a torch.func forward-mode transform (``jvp``, ``jacfwd``,
    ``hessian``, whatever other transforms wrap or are wrapped by it), or when one of ``tensors``
    (None allowed) carries a tangent of ``torch.autograd.forward_ad``, else "": a backend option
    (:mod:`attenscribble_ops.backends`), since only the reference has forward-mode derivatives.
    Not inspected under torch.compile."""
    if torch.compiler.is_compiling():
        return ""
    if _jvp_transform_active():
        return FORWARD_AD
    for t in tensors:
        # a transform's wrapper (vmap, grad) hides the tangents of the levels below it, and
        # unpack_dual has no batching rule: the transforms' levels were checked above
        if t is not None and not torch._C._functorch.is_functorch_wrapped_tensor(t) \
                and forward_ad.unpack_dual(t).tangent is not None:
            return FORWARD_AD
    return ""


def export_option() -> str:
    """A backend option while the model is being exported, else "": :data:`ONNX_EXPORT` while
    ``torch.onnx.export`` traces it (only the reference is made of operators ONNX has),
    :data:`TORCHSCRIPT_TRACE` while ``torch.jit.trace`` does (a trace records the fused backends'
    Python autograd functions as Python calls, which ``torch.jit.save`` cannot store).
    torch.onnx not imported yet: no ONNX export is running (and importing it would take ~20 ms)."""
    onnx = sys.modules.get("torch.onnx")
    if onnx is not None and onnx.is_in_onnx_export():
        return ONNX_EXPORT
    if not torch.compiler.is_compiling() and torch.jit.is_tracing():
        return TORCHSCRIPT_TRACE
    return ""


def compiled_transform_option() -> str:
    """:data:`COMPILED_TRANSFORM` while torch.compile traces a call under a torch.func transform
    (``torch.compile(torch.func.grad(f))``, ``vmap``, ...), else "". The fused backends call their
    operators through autograd functions that the eager transforms take; compiled, torch turns
    them into an operator with no batching rule ("You tried to vmap over ApplyTemplate"), and the
    registered operator itself has no form grad takes. Which transforms are active is not
    traceable by the compiler, so any of them sends the call to the reference."""
    return COMPILED_TRANSFORM if torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active() \
        else ""


def reference_only_options(*tensors) -> tuple[str, str, str]:
    """The backend options of a call that only the reference can run: forward-mode tangents on
    ``tensors``, an ONNX export or a TorchScript trace in progress, torch.compile over torch.func
    transforms."""
    return forward_ad_option(*tensors), export_option(), compiled_transform_option()


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


# the floating-point dtypes the ops compute in (float8 types, which PyTorch counts as floating
# point, have no arithmetic there)
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def floating_tensor(x, name: str, ndims: Sequence[int], shape_doc: str) -> torch.Tensor:
    """A real floating-point tensor with one of ``ndims`` dimensions and no empty dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {_describe(x)}")
    if x.dtype not in FLOATING:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape_doc} ({' or '.join(map(str, ndims))} dimensions), "
                         f"got {x.dim()} dimensions, shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
                         "move them to the same device")


def real_tensor(x, name: str, shape_doc: str) -> torch.Tensor:
    """A real (bool, integer or floating) tensor, e.g. a mask or a gate."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {_describe(x)}")
    if x.is_complex() or (x.is_floating_point() and x.dtype not in FLOATING):
        raise TypeError(f"{name} must be a bool, integer, float16, bfloat16, float32 or float64 tensor, "
                        f"got {x.dtype}")
    return x


def number(x, name: str, *, positive: bool = False, invertible: bool = False) -> float:
    """A finite Python/NumPy real number (not a tensor: reading one would synchronise).
    ``invertible``: 1/x must be finite too (a bandwidth the kernels divide by)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(x)}")
    try:
        value = float(x)
    except OverflowError:  # an int past float64's range
        raise ValueError(f"{name} must be finite, got an integer of {int(x).bit_length()} bits, past "
                         f"float64's range") from None
    # finite: x - x == 0 is False for inf and nan (arithmetic rather than math.isfinite, which
    # torch.compile cannot trace on a float it keeps symbolic, as with dynamic=True)
    if not value - value == 0:
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if invertible and not (value != 0 and 1.0 / value - 1.0 / value == 0):
        raise ValueError(f"{name} is too small: 1/{name} overflows, got {value}")
    return value


SIGMA_RANGE = (1e-150, 1e150)


def bandwidth(x, name: str) -> float:
    """A Gaussian bandwidth sigma in SIGMA_RANGE: its square and inverse square are finite,
    non-zero float64 numbers (the kernels divide by 2 sigma^2)."""
    value = number(x, name, positive=True)
    if not SIGMA_RANGE[0] <= value <= SIGMA_RANGE[1]:
        raise ValueError(f"{name} must be between {SIGMA_RANGE[0]:.0e} and {SIGMA_RANGE[1]:.0e} "
                         f"({name}**2 and its inverse finite), got {value}")
    return value


def integer(x, name: str, *, minimum: int) -> int:
    """An int >= ``minimum``; a ``torch.SymInt`` (a size traced with dynamic shapes, e.g. an
    attention grid under torch.export) is kept symbolic, its bound checked as a guard."""
    if isinstance(x, torch.SymInt):
        if x < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {x}")
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(x)}")
    if int(x) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(x)}")
    return int(x)


def per_axis(x, name: str, nd: int, convert) -> tuple:
    """An int/float for every spatial axis, or one value broadcast to all ``nd`` axes."""
    if isinstance(x, (list, tuple)):
        if len(x) != nd:
            raise ValueError(f"{name} must give one value per spatial axis ({nd} for this input), got {len(x)}: {x!r}")
        return tuple(convert(v, f"{name}[{i}]") for i, v in enumerate(x))
    return (convert(x, name),) * nd


MAX_RADIUS = 1 << 15


def window_radius(x, name: str) -> int:
    """A window half-size >= 1 (larger than the image is allowed, the window is clipped), at most
    MAX_RADIUS so that window arithmetic stays far from integer overflow."""
    v = integer(x, name, minimum=1)
    if v > MAX_RADIUS:
        raise ValueError(f"{name} must be <= {MAX_RADIUS}, got {v}")
    return v


def radius(x, nd: int, name: str = "radius") -> tuple[int, ...]:
    """window_radius for every spatial axis (one value, or one per axis)."""
    return per_axis(x, name, nd, window_radius)


def flag(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(x)}")
    return x


def choice(x, name: str, options: Sequence[str]) -> str:
    if not isinstance(x, str) or x not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {x!r}")
    return x


def integer_ratio(big: Sequence[int], small: Sequence[int], name: str, ref_name: str) -> Optional[tuple[int, ...]]:
    """Per-axis integer factors big/small; raises unless every axis is an exact multiple."""
    if tuple(big) == tuple(small):
        return None
    if any(b < s or b % s for b, s in zip(big, small)):
        raise ValueError(f"{name} has spatial size {tuple(big)}, which must equal or be an integer multiple "
                         f"of {ref_name}'s {tuple(small)} on every axis")
    return tuple(b // s for b, s in zip(big, small))


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation (and result) for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def same_device_fake(fake):
    """A fake kernel that first checks, as the real kernels do, that its tensor arguments share
    one device. A direct call of an operator that mixes a meta tensor with real ones is dispatched
    to the fake kernel (the Meta key wins), which would otherwise return uninitialised tensors on
    the first argument's device."""
    names = list(inspect.signature(fake).parameters)

    @functools.wraps(fake)
    def checked(*args, **kwargs):
        first = None
        for name, value in [*zip(names, args), *kwargs.items()]:
            for item in (value if isinstance(value, (list, tuple)) else (value,)):
                if not isinstance(item, torch.Tensor):
                    continue
                if first is None:
                    first = (name, item.device)
                elif item.device != first[1]:
                    raise ValueError(f"{name} is on {item.device} but {first[0]} is on {first[1]}; the "
                                     f"operator's tensors must be on one device")
        return fake(*args, **kwargs)

    return checked
