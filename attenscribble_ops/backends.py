"""Backend registry: (op, backend) -> implementation, the "auto" order, and explanations.

Every op has the same backend names: "reference" (plain PyTorch, any device), "cpu" (C++),
"cuda" (CUDA C++), "triton". An implementation registers itself with :func:`register` from its
own module (reference/, native/, triton/); this module only holds the order in which "auto" tries
them and the rules that say why one cannot run.

* A backend named explicitly that cannot run raises :class:`BackendUnavailableError` with the
  exact reason; it never falls back silently.
* "auto" walks ``AUTO_ORDER[op][device_type]`` and takes the first backend that can run; it reads
  only metadata (device, dtype, ndim, options), never tensor values, so it is free under
  ``torch.compile``. Under ``torch.use_deterministic_algorithms(True)`` it skips implementations
  registered as non-deterministic. Inputs that carry forward-mode tangents (the option
  ``_checks.FORWARD_AD``: torch.func.jvp, jacfwd) run on "reference" only, the one backend with
  forward-mode derivatives, and so does a call that ``torch.onnx.export`` traces
  (``_checks.ONNX_EXPORT``): ONNX has operators for the reference's torch ops only; and one that
  ``torch.jit.trace`` traces (``_checks.TORCHSCRIPT_TRACE``): the trace would record the fused
  backends' Python autograd functions, which TorchScript cannot save; and one that torch.compile
  traces under a torch.func transform (``_checks.COMPILED_TRANSFORM``): compiled, the fused
  backends' autograd functions have no batching rule and their operators no form grad takes.
* :func:`explain` says what is compiled and why each faster backend was skipped.

The order is data: change ``AUTO_ORDER`` (from benchmark results), not the code.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Optional

import torch

from . import _checks, _extension
from ._version import __version__

BACKENDS = ("reference", "cpu", "cuda", "triton", "aten")
CHOICES = ("auto",) + BACKENDS

OPS = ("masked_crf", "attentive_similarity", "spatial_attention")

# Tried in this order by backend="auto", per device type. Fastest measured first (forward + backward,
# fp32; benchmarks/results): on the development CPU, and on an H100 (2026-11-27), where the Triton
# masked CRF won 5 of 6 shapes, the Triton similarity loss 2 of 3 (the official 64 x 64 grid among
# them), the CUDA attention all 3. The dense reference, faster than both at 64 x 64 on the H100,
# stays last: its memory grows with the square of the tokens.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "masked_crf": {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")},
    "attentive_similarity": {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")},
    "spatial_attention": {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
}
_DEFAULT_ORDER = ("reference",)

TRITON_FP32_DOTS = ("ieee", "tf32x3", "tf32")
# How the Triton kernels multiply fp32 operands on a GPU (``tl.dot``'s input_precision). None (the
# default) follows torch: "tf32" where torch's fp32 matmuls may use TF32
# (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``allow_tf32 = True`` or
# ``torch.set_float32_matmul_precision("high")``), else
# "tf32x3": each fp32 operand split into two TF32 parts and three tensor-core products summed in
# fp32, the arithmetic torch's own memory-efficient SDPA kernel uses for fp32 on compute capability
# 8.0 and later (CUTLASS's OpMultiplyAddFastF32), about 2^-21 relative per product. "ieee" forces
# exact fp32 products on the FMA units (slower). GPUs without TF32 tensor cores (NVIDIA before
# compute capability 8.0, ROCm) always take "ieee"; fp16/bf16 operands and the Triton interpreter
# are not affected. Read at every launch, so it may be changed at any time.
triton_fp32_dot: Optional[str] = None


def _torch_allows_tf32() -> bool:
    """Whether torch lets its CUDA fp32 matmuls use TF32. The newer setting (fp32_precision) reflects
    the legacy ones as well; reading the legacy allow_tf32 raises once a program has set the two
    differently."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def triton_fp32_dot_precision() -> str:
    """The ``tl.dot`` input precision of fp32 operands on a GPU (see ``triton_fp32_dot``)."""
    chosen = triton_fp32_dot
    if chosen is None:
        return "tf32" if _torch_allows_tf32() else "tf32x3"
    if not isinstance(chosen, str) or chosen not in TRITON_FP32_DOTS:
        raise ValueError(f"attenscribble_ops.backends.triton_fp32_dot must be None or one of {TRITON_FP32_DOTS}, "
                         f"got {chosen!r}")
    return chosen


class BackendUnavailableError(RuntimeError):
    """Raised when a backend named explicitly cannot run the given inputs; the message says why."""


@dataclasses.dataclass(frozen=True)
class Meta:
    """What backend selection may look at: metadata only, never values."""

    device_type: str
    dtype: torch.dtype
    ndim: int
    options: frozenset = frozenset()

    @classmethod
    def of(cls, tensor: torch.Tensor, *options: str) -> "Meta":
        return cls(tensor.device.type, tensor.dtype, tensor.dim(), frozenset(o for o in options if o))

    def describe(self) -> str:
        text = f"{self.device_type}/{str(self.dtype).replace('torch.', '')}/{self.ndim}-D"
        return text + (f" [{', '.join(sorted(self.options))}]" if self.options else "")


Check = Callable[[Meta], Optional[str]]


@dataclasses.dataclass(frozen=True)
class _Entry:
    fn: Callable
    check: Optional[Check]
    deterministic: bool


_REGISTRY: dict[tuple[str, str], _Entry] = {}
_MODULE_ERRORS: dict[str, str] = {}  # backend -> why its modules could not be imported


def register(op: str, backend: str, *, check: Optional[Check] = None, deterministic: bool = True):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    ``check(meta)`` returns None when the implementation supports those inputs, else a reason.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorator(fn):
        _REGISTRY[(op, backend)] = _Entry(fn, check, deterministic)
        return fn

    return decorator


def triton_interpreting() -> bool:
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_rule(backend: str, meta: Meta) -> Optional[str]:
    if backend == "cpu" and meta.device_type != "cpu":
        return f"the 'cpu' backend runs on CPU tensors; these are on {meta.device_type}"
    if backend == "cuda" and meta.device_type != "cuda":
        return f"the 'cuda' backend runs on CUDA tensors; these are on {meta.device_type}"
    if backend == "aten" and meta.device_type not in ("cpu", "cuda"):
        return f"the 'aten' backend runs on CPU and CUDA tensors; these are on {meta.device_type}"
    if backend == "triton":
        if meta.device_type == "cpu" and not triton_interpreting():
            return ("the 'triton' backend needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                    "importing attenscribble_ops, to run the Triton interpreter on the CPU)")
        if meta.device_type not in ("cpu", "cuda"):
            return f"the 'triton' backend does not run on {meta.device_type} tensors"
    return None


def why_not(op: str, backend: str, meta: Meta) -> Optional[str]:
    """None if ``backend`` can run ``op`` on inputs described by ``meta``, else the reason."""
    if backend in _MODULE_ERRORS:
        return _MODULE_ERRORS[backend]
    entry = _REGISTRY.get((op, backend))
    if entry is None:
        return f"no {backend!r} implementation of {op} exists in attenscribble_ops {__version__}"
    reason = _device_rule(backend, meta)
    if reason is None and backend != "reference" and _checks.FORWARD_AD in meta.options:
        reason = ("forward-mode AD (torch.func.jvp or jacfwd, torch.autograd.forward_ad) needs backend='reference': "
                  "the fused kernels have reverse-mode derivatives only (grad, vjp, jacrev and vmap work)")
    if reason is None and backend != "reference" and _checks.ONNX_EXPORT in meta.options:
        reason = ("ONNX export (torch.onnx.export) needs backend='reference': ONNX has no operator for the fused "
                  "kernels")
    if reason is None and backend != "reference" and _checks.TORCHSCRIPT_TRACE in meta.options:
        reason = ("a TorchScript trace (torch.jit.trace) needs backend='reference': it would record the fused "
                  "kernels' Python autograd functions, which torch.jit.save cannot store (torch.export and "
                  "torch.compile take the fused kernels)")
    if reason is None and backend != "reference" and _checks.COMPILED_TRANSFORM in meta.options:
        reason = ("torch.compile over torch.func transforms (grad, vmap, ...) needs backend='reference': compiled, "
                  "the fused kernels' autograd functions have no batching rule and the registered operators no "
                  "form grad takes (the transforms in eager mode, and torch.compile alone, take the fused kernels)")
    if reason is None and entry.check is not None:
        reason = entry.check(meta)
    return reason


def select(op: str, backend: str, meta: Meta) -> tuple[str, Callable]:
    """The (name, implementation) that runs ``op``: the named backend, or the first of "auto"."""
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    if backend != "auto":
        reason = why_not(op, backend, meta)
        if reason is not None:
            raise BackendUnavailableError(f"backend={backend!r} cannot run {op} on {meta.describe()} inputs: {reason}")
        return backend, _REGISTRY[(op, backend)].fn
    deterministic = torch.are_deterministic_algorithms_enabled()
    for name in AUTO_ORDER[op].get(meta.device_type, _DEFAULT_ORDER):
        if why_not(op, name, meta) is None and (_REGISTRY[(op, name)].deterministic or not deterministic):
            return name, _REGISTRY[(op, name)].fn
    raise BackendUnavailableError(f"no backend can run {op} on {meta.describe()} inputs:\n" + explain(op, meta=meta))


def resolve(op: str, example: torch.Tensor, backend: str = "auto", *options: str) -> str:
    """The name of the backend that runs ``op`` on inputs like ``example`` (its device, dtype and
    ndim; ``options`` such as "compatibility"), as ``backend=`` would pick it. Raises
    :class:`BackendUnavailableError` where nothing can run.

    Example:
        >>> attenscribble_ops.resolve("masked_crf", probs)
        'cpu'
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a tensor like the op's first input, got {type(example).__name__}")
    return select(op, backend, Meta.of(example, *options, _checks.forward_ad_option(example)))[0]


def available_backends() -> dict[str, list[str]]:
    """Per op, the backends implemented and loadable in this installation (on some device)."""
    return {
        op: [b for b in BACKENDS if (op, b) in _REGISTRY and b not in _MODULE_ERRORS]
        for op in OPS
    }


def _environment_lines() -> list[str]:
    lines = [f"attenscribble_ops {__version__}, torch {torch.__version__}"
             + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)")]
    if _extension.loaded():
        lines.append(f"  extension: loaded (OpenMP {'on' if _extension.with_openmp() else 'off'}, "
                     f"CUDA sources {'built' if _extension.with_cuda() else 'not built'})")
    else:
        lines.append(f"  extension: not loaded: {_extension.load_error()}")
    if "triton" in _MODULE_ERRORS:
        lines.append(f"  triton: unavailable: {_MODULE_ERRORS['triton']}")
    else:
        import triton

        lines.append(f"  triton: {triton.__version__} (interpreter {'on' if triton_interpreting() else 'off'})")
    lines.append(f"  CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    return lines


def explain(op: Optional[str] = None, example: Optional[torch.Tensor] = None, *,
            meta: Optional[Meta] = None) -> str:
    """A report of what is compiled, and for each op which backend "auto" picks and why the
    others were skipped.

    Args:
        op: one of ``OPS``; None reports every op.
        example: a tensor like the op's first input (its device, dtype and ndim are used, and
            whether it carries a forward-mode tangent).
            Without it, the report covers float32 on the CPU and, if visible, on CUDA.
        meta: an explicit :class:`Meta` instead of ``example``.

    Example:
        >>> print(attenscribble_ops.explain("masked_crf", torch.rand(2, 4, 64, 64)))
    """
    ops = OPS if op is None else (op,)
    for o in ops:
        if o not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {o!r}")
    if meta is not None:
        if not isinstance(meta, Meta):
            raise TypeError(f"meta must be an attenscribble_ops.backends.Meta, got {type(meta).__name__}")
        metas = [meta]
    elif example is not None:
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"example must be a tensor like the op's first input, got {type(example).__name__}")
        metas = [Meta.of(example, _checks.forward_ad_option(example))]
    else:
        metas = [Meta("cpu", torch.float32, 4)]
        if torch.cuda.is_available():
            metas.append(Meta("cuda", torch.float32, 4))
    lines = _environment_lines()
    deterministic = torch.are_deterministic_algorithms_enabled()
    for o in ops:
        for m in metas:
            order = AUTO_ORDER[o].get(m.device_type, _DEFAULT_ORDER)
            chosen = None
            details = []
            for name in order:
                reason = why_not(o, name, m)
                if reason is None and deterministic and not _REGISTRY[(o, name)].deterministic:
                    reason = "not deterministic, and torch.use_deterministic_algorithms(True) is set"
                if reason is None and chosen is None:
                    chosen = name
                    details.append(f"    {name}: selected")
                elif reason is None:
                    details.append(f"    {name}: available")
                else:
                    details.append(f"    {name}: skipped: {reason}")
            for name in BACKENDS:
                if name not in order:
                    reason = why_not(o, name, m)
                    details.append(f"    {name}: not in the auto order for {m.device_type}"
                                   + (f" (and cannot run: {reason})" if reason else " (runs when named)"))
            lines.append(f"{o} on {m.describe()}: auto -> {chosen or 'nothing can run'}")
            lines.extend(details)
    return "\n".join(lines)


def _load_implementations() -> None:
    """Import every implementation module once; remember why a backend's modules failed."""
    importlib.import_module("attenscribble_ops.reference")
    importlib.import_module("attenscribble_ops.aten_attention")
    if _extension.loaded():
        importlib.import_module("attenscribble_ops.native")
    else:
        _MODULE_ERRORS["cpu"] = _MODULE_ERRORS["cuda"] = _extension.load_error()
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        _MODULE_ERRORS["triton"] = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    else:
        importlib.import_module("attenscribble_ops.triton")
