"""Public functions: validate the arguments, prepare what every backend shares (resampling,
masks, denominators), pick a backend, call it.

Every default reproduces the official AttenScribble run (spec §4-6).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _checks, _crf_params, _extension, backends
from ._crf_params import CRFKernel  # noqa: F401  (re-exported)

_SPATIAL_DOC = "(B, C, H, W) or (B, C, D, H, W)"
# clean_mask has a compiled kernel for these device types (looked up once: the dispatcher query
# is not something torch.compile should trace).
_NATIVE_CLEAN_MASK = {d: _extension.why_no_kernel("clean_mask", d) is None for d in ("cpu", "cuda")}


def _area_downsample(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Area (mean) downsampling by integer factors, as the original's adaptive_avg_pool2d."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    pool = F.adaptive_avg_pool2d if len(shape) == 2 else F.adaptive_avg_pool3d
    return pool(x, tuple(shape))


def clean_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NaN -> 0 and values < 1 -> 0 (the Gated CRF convention for interpolated mask edges)."""
    if _NATIVE_CLEAN_MASK.get(mask.device.type, False):
        return torch.ops.attenscribble_ops.clean_mask(mask, dtype)
    m = mask.to(dtype)
    return torch.where(torch.isnan(m) | (m < 1), torch.zeros_like(m), m)


def _prepare_mask(mask, name: str, probs: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, 1, *S') or (B, *S') with S' an integer multiple of S -> cleaned (B, 1, *S) in ``dtype``."""
    if mask is None:
        return None
    batch, shape = probs.shape[0], probs.shape[2:]
    nd = len(shape)
    mask = _checks.real_tensor(mask, name, f"(B, 1, *spatial) or (B, *spatial) with B={batch}")
    if mask.dim() == nd + 1:
        mask = mask.unsqueeze(1)
    if mask.dim() != nd + 2 or mask.shape[0] != batch or mask.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, *spatial) or (B, *spatial) with B={batch} and "
                         f"{nd} spatial axes, got {tuple(mask.shape)}")
    _checks.same_device(name, mask, "probs", probs)
    _checks.integer_ratio(mask.shape[2:], shape, name, "probs")
    mask = mask.detach()
    if tuple(mask.shape[2:]) != tuple(shape):
        mask = _area_downsample(mask.to(dtype), shape)
    return clean_mask(mask, dtype)


def _prepare_compat(compatibility, classes: int, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    """mu-hat = (C - 1) * row-L1-normalised compatibility (the original's intended formula).

    The matrix is checked on the CPU: pass a CPU tensor or nested list (a CUDA tensor is copied
    to the host once per call for the check)."""
    if compatibility is None:
        return None
    if isinstance(compatibility, torch.Tensor):
        if compatibility.is_complex() or compatibility.dtype == torch.bool:
            raise TypeError(f"compatibility must be a real (C, C) matrix, got {compatibility.dtype}")
        if compatibility.device.type == "meta":
            raise ValueError("compatibility is on meta but its values are read on the host: pass a CPU or "
                             f"{torch.device(device).type} tensor, or a nested list")
        mat = compatibility.detach().to("cpu", torch.float64)
    else:
        try:
            mat = torch.as_tensor(compatibility, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"compatibility must be a (C, C) matrix (tensor or nested list), got "
                            f"{type(compatibility).__name__}: {exc}") from None
    if mat.shape != (classes, classes):
        raise ValueError(f"compatibility must have shape (C, C) = ({classes}, {classes}), got {tuple(mat.shape)}")
    # Value checks read the matrix: done in eager mode; a compiled graph cannot branch on values.
    if not torch.compiler.is_compiling():
        if not torch.isfinite(mat).all():
            raise ValueError("compatibility must be finite")
        if (mat < 0).any():
            raise ValueError("compatibility must not have negative values")
        if (mat.diagonal() != 0).any():
            raise ValueError("compatibility must have a zero diagonal (a class is compatible with itself)")
    mu = (classes - 1) * F.normalize(mat, p=1, dim=1)
    return mu.to(device=device, dtype=dtype)


def masked_crf_loss(probs: torch.Tensor, image: Optional[torch.Tensor] = None, *, radius=5, sigma_xy=6.0,
                    sigma_image=0.1, weight=1.0, kernels=None, mask_dst=None, mask_src=None,
                    compatibility=None, padding: str = "zeros", spacing=None,
                    backend: str = "auto") -> torch.Tensor:
    r"""Masked CRF loss (the Gated CRF loss with a destination mask), 2-D or 3-D.

    .. math::
        L = \frac{1}{\max(1, \sum m)} \sum_b \sum_{i: m_{bi}=1} \sum_{j \in win(i), j \ne i}
            K_{bij} (1 - \langle P_{bi}, P_{bj} \rangle)

    with :math:`K_{ij} = \sum_k w_k \exp(-\tfrac12 \lVert f^k_i - f^k_j \rVert^2)`, features
    :math:`f = (\text{pos} / \sigma_{xy}, \text{image} / \sigma_{img})`.

    Args:
        probs: softmax probabilities, (B, C, H, W) or (B, C, D, H, W). Any float dtype; fp16/bf16
            accumulate in fp32.
        image: (B, F, H', W') (or 3-D) with H', W' integer multiples of H, W (area-downsampled as the
            original does); None only when no kernel uses the image. No gradient flows into it.
        radius: window half-size, an int or one per spatial axis (>= 1).
        sigma_xy, sigma_image, weight: the single default kernel (official: 6 px, 0.1, 1).
        kernels: several descriptors instead (:class:`CRFKernel`, ``(weight, sigma_xy, sigma_image)``
            or original-style dicts); ``sigma_image=None`` makes a pure-xy term.
        mask_dst: gates window centres (official: 1 on pixels without scribble). (B, 1, *S') or
            (B, *S'); area-downsampled, NaN -> 0, values < 1 -> 0.
        mask_src: gates neighbours, same format.
        compatibility: (C, C) class compatibility (non-negative, zero diagonal) instead of Potts.
        padding: "zeros" reproduces the original's border term (out-of-image neighbours have
            features 0 and probability 0); "valid" skips them.
        spacing: voxel spacing per axis; sigma_xy is then in physical units (default 1 per axis).
            The kernels compute the Gaussian's exponent factors in the accumulate dtype, so with
            16/32-bit probabilities every sigma must lie between about 1.1e-19 and 4.6e18 and every
            spacing between 2.2e-19 and 9.2e18 (float64: sigmas 1.5e-154 to 3.4e153); outside, a
            ValueError names the argument.
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        The loss, a 0-d tensor: fp32 (fp64 for fp64 ``probs``). The denominator is the sum of the
        (last given, destination first) mask clamped to >= 1, else B * prod(S).

    Example:
        >>> probs = torch.softmax(logits, 1)
        >>> loss = masked_crf_loss(probs, image, mask_dst=(scribble == ignore_index).unsqueeze(1))
    """
    probs = _checks.floating_tensor(probs, "probs", (4, 5), _SPATIAL_DOC)
    batch, classes = probs.shape[:2]
    shape = tuple(probs.shape[2:])
    nd = len(shape)
    dtype = _checks.accumulate_dtype(probs.dtype)
    channels = None
    if image is not None:
        image = _checks.floating_tensor(image, "image", (nd + 2,), "(B, F, *spatial) like probs")
        if image.shape[0] != batch:
            raise ValueError(f"image has batch size {image.shape[0]} but probs has {batch}")
        _checks.same_device("image", image, "probs", probs)
        _checks.integer_ratio(image.shape[2:], shape, "image", "probs")
        channels = image.shape[1]
    params = _crf_params.canonical(nd=nd, radius=radius, spacing=spacing, padding=padding, kernels=kernels,
                                   weight=weight, sigma_xy=sigma_xy, sigma_image=sigma_image, channels=channels)
    _crf_params.check_float_range(params, dtype, shape, kernels is not None)
    if params.uses_image:
        # fp32/fp64 images are pooled before conversion (no full-resolution copy); fp16/bf16 after.
        image = image.detach()
        low = image.dtype not in (torch.float32, torch.float64)
        image = _area_downsample(image.to(dtype) if low else image, shape).to(dtype)
    else:
        image = None
    mask_src = _prepare_mask(mask_src, "mask_src", probs, dtype)
    mask_dst = _prepare_mask(mask_dst, "mask_dst", probs, dtype)
    compat = _prepare_compat(compatibility, classes, dtype, probs.device)
    backend = _checks.choice(backend, "backend", backends.CHOICES)
    last_mask = mask_dst if mask_dst is not None else mask_src
    # sym_float: a float in eager mode, symbolic in an exported program with dynamic sizes
    denom = (last_mask.sum().clamp(min=1) if last_mask is not None
             else torch.sym_float(batch * math.prod(shape)))
    meta = backends.Meta.of(probs, "compatibility" if compat is not None else "",
                            *_checks.reference_only_options(probs, compat))
    _, impl = backends.select("masked_crf", backend, meta)
    return impl(probs, image, mask_dst, mask_src, compat, params) / denom


def _resize_to_grid(probs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=False, no antialias: the official resize of P to the attention grid."""
    if tuple(probs.shape[2:]) == tuple(grid):
        return probs
    return F.interpolate(probs, size=grid, mode="bilinear", align_corners=False)


def _check_attention_qk(q, k) -> None:
    q = _checks.floating_tensor(q, "q", (4,), "(B, heads, n, D)")
    k = _checks.floating_tensor(k, "k", (4,), "(B, heads, n, D)")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    _checks.same_device("k", k, "q", q)


def _check_grid(grid, n: int) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be a (h, w) pair of ints, got {grid!r}")
    h = _checks.integer(grid[0], "grid[0]", minimum=1)
    w = _checks.integer(grid[1], "grid[1]", minimum=1)
    if h * w != n:
        raise ValueError(f"grid {(h, w)} has {h * w} tokens but q has n={n} tokens (dimension 2)")
    return h, w


def _head_dim_option(x: torch.Tensor) -> str:
    """Backend-selection option for head dims above what the GPU kernels keep in registers."""
    return "head_dim>128" if x.shape[-1] > 128 else ""


def _slice_option(n: int, *widths: int) -> str:
    """Backend-selection option for a (batch, head) slice of n tokens x width elements (with a
    tile's margin of rows) past int32 offsets, which the Triton kernels use inside a slice."""
    return "slice>=2**31" if (n + 256) * max(widths) >= 2 ** 31 else ""


def attentive_similarity_loss(q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor, head_weight: torch.Tensor,
                              head_bias: torch.Tensor, *, grid, radius: int = 5, sigma: float = 6.0,
                              logit_scale: float = 1.0, sample_weight: Optional[torch.Tensor] = None,
                              grad_probs: bool = True, grad_kernel: bool = True,
                              lse: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    r"""Attentive similarity loss (AttenScribble, spec §3-4).

    .. math::
        L = \frac{1}{B n} \sum_b g_b \sum_i \sum_{j \ne i} M_{ij} \mathcal{W}_{bij}
            (1 - \langle \tilde p_{bi}, \tilde p_{bj} \rangle),\quad
        \mathcal{W} = \sigma\big(\sum_m \alpha_m (A^m + A^{m\top}) + \beta\big)

    with :math:`A^m = \mathrm{softmax}_j(\text{logit\_scale}\, q_i \cdot k_j)` per head and M the
    Gaussian distance decay inside the (2r+1)^2 window of the grid.

    Args:
        q, k: (B, heads, n, D) queries and keys of the attention block (heads of every layer
            stacked), n = h * w tokens, token t = w * row + col.
        probs: (B, C, H, W) probabilities at any resolution; resized to the grid by bilinear
            interpolation (align_corners=False), as the official code does.
        head_weight: (heads,) mixing weights (the official 1x1 conv weight; (1, heads, 1, 1) accepted).
        head_bias: scalar tensor, the mixing bias.
        grid: (h, w) of the attention feature map.
        radius, sigma: window half-size (at most 32768) and decay bandwidth on the grid (official 5
            and 6; sigma between 1e-150 and 1e150).
        logit_scale: multiplies the logits of the similarity softmax (official 1).
        sample_weight: (B,) per-sample gate g_b (official: 0 for single-class slices); not learnable.
        grad_probs, grad_kernel: let gradients flow into the probabilities / into the kernel
            (q, k, head_weight, head_bias); both False is an error.
        lse: optional (B, heads, n) row log-sum-exps of the similarity logits, as returned by
            :func:`spatial_attention` (fused backends then skip their own sweep, and the LSE gradient
            flows back through the attention's backward, completing dq, dk). An LSE without autograd
            history (detached, or a leaf tensor, even one that requires grad) while q or k require
            grad is ignored (recomputed), since the gradient through it is part of dq, dk.
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        0-d loss (denominator B * n), fp32 (fp64 for fp64 q).
    """
    _check_attention_qk(q, k)
    batch, heads, n, _ = q.shape
    h, w = _check_grid(grid, n)
    probs = _checks.floating_tensor(probs, "probs", (4,), "(B, C, H, W)")
    if probs.shape[0] != batch:
        raise ValueError(f"probs has batch size {probs.shape[0]} but q has {batch}")
    _checks.same_device("probs", probs, "q", q)
    head_weight = _checks.floating_tensor(head_weight, "head_weight", (1, 4), f"({heads},) (one per head)")
    if head_weight.numel() != heads or (head_weight.dim() == 4 and head_weight.shape[1] != heads):
        raise ValueError(f"head_weight must have one entry per head of q: shape ({heads},), got "
                         f"{tuple(head_weight.shape)}")
    _checks.same_device("head_weight", head_weight, "q", q)
    if not isinstance(head_bias, torch.Tensor) or head_bias.dtype not in _checks.FLOATING or head_bias.numel() != 1:
        raise TypeError(f"head_bias must be a floating-point scalar tensor (shape () or (1,)), got "
                        f"{_checks._describe(head_bias)}")
    _checks.same_device("head_bias", head_bias, "q", q)
    radius = _checks.window_radius(radius, "radius")
    sigma = _checks.bandwidth(sigma, "sigma")
    logit_scale = _checks.number(logit_scale, "logit_scale")
    grad_probs = _checks.flag(grad_probs, "grad_probs")
    grad_kernel = _checks.flag(grad_kernel, "grad_kernel")
    if not (grad_probs or grad_kernel):
        raise ValueError("grad_probs and grad_kernel are both False: the loss would have no gradient")
    if sample_weight is not None:
        sample_weight = _checks.real_tensor(sample_weight, "sample_weight", f"({batch},)")
        if tuple(sample_weight.shape) != (batch,):
            raise ValueError(f"sample_weight must have shape (B,) = ({batch},), got {tuple(sample_weight.shape)}")
        _checks.same_device("sample_weight", sample_weight, "q", q)
        sample_weight = sample_weight.detach().to(_checks.accumulate_dtype(q.dtype))
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (batch, heads, n):
            raise ValueError(f"lse must be a (B, heads, n) = ({batch}, {heads}, {n}) tensor, got "
                             f"{_checks._describe(lse)}")
        if lse.dtype not in _checks.FLOATING:
            raise TypeError(f"lse must be a float16, bfloat16, float32 or float64 tensor (row log-sum-exps), "
                            f"got {lse.dtype}")
        _checks.same_device("lse", lse, "q", q)
    backend = _checks.choice(backend, "backend", backends.CHOICES)
    probs_grid = _resize_to_grid(probs, (h, w))
    head_weight = head_weight.reshape(heads)
    head_bias = head_bias.reshape(())
    if not grad_probs:
        probs_grid = probs_grid.detach()
    if not grad_kernel:
        q, k, head_weight, head_bias = q.detach(), k.detach(), head_weight.detach(), head_bias.detach()
        lse = None if lse is None else lse.detach()
    elif lse is not None and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) \
            and lse.is_leaf:
        # An LSE without autograd history (detached, or a leaf even if it requires grad) would drop
        # the dense part of dq, dk (through d lse / d q, d k): recompute it.
        lse = None
    _, impl = backends.select("attentive_similarity", backend, backends.Meta.of(
        q, _head_dim_option(q), _slice_option(n, q.shape[3], probs_grid.shape[1]),
        *_checks.reference_only_options(q, k, probs_grid, head_weight, head_bias, lse)))
    raw = impl(q, k, probs_grid, head_weight, head_bias, lse, sample_weight, (h, w), radius, sigma, logit_scale)
    # sym_float: a float in eager mode (the same quotient), symbolic under dynamic shapes, where a
    # tensor under torch.func's transforms cannot be divided by a SymInt, and float() would
    # specialise an exported program's sizes
    return raw / torch.sym_float(batch * n)


def spatial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, logit_scale: float = 1.0,
                      backend: str = "auto", tie_qk: bool = False, return_lse: bool = True) -> tuple:
    """Attention of the spatial self-attention block, with the similarity normaliser.

    Args:
        q, k, v: (B, heads, n, D).
        logit_scale: scale of the similarity logits whose row log-sum-exp is returned.
        tie_qk: also return q and k as views owned by the attention's autograd node, to hand to
            :func:`attentive_similarity_loss` with the LSE: the fused backends then add the
            attention's dq, dk to (a copy of) the loss's window terms in their backward sweep.
            Values and gradients are the same either way.
        return_lse: False when no similarity loss will read the LSE (inference): ``lse_sim`` is
            then None, and "auto" computes ``out`` with torch's own fused attention
            (``F.scaled_dot_product_attention``) where nothing is differentiated, which is faster
            than the fused kernels' sweep (that computes the LSE too); otherwise the chosen
            backend runs as usual. Not with ``tie_qk``.

    Returns:
        ``(out, lse_sim)``, or ``(out, lse_sim, q, k)`` with ``tie_qk``: out = softmax(q k^T /
        sqrt(D)) v, (B, heads, n, D) in the dtype of q; lse_sim = logsumexp_j(logit_scale *
        q_i . k_j), (B, heads, n) in fp32 (fp64 for fp64), or None without ``return_lse``.
    """
    _check_attention_qk(q, k)
    v = _checks.floating_tensor(v, "v", (4,), "(B, heads, n, D)")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (B, heads, n, Dv) with (B, heads, n) = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if v.dtype != q.dtype:
        raise TypeError(f"v must have the dtype of q ({q.dtype}), got {v.dtype}")
    _checks.same_device("v", v, "q", q)
    logit_scale = _checks.number(logit_scale, "logit_scale")
    backend = _checks.choice(backend, "backend", backends.CHOICES)
    tie_qk = _checks.flag(tie_qk, "tie_qk")
    return_lse = _checks.flag(return_lse, "return_lse")
    if tie_qk and not return_lse:
        raise ValueError("tie_qk=True hands q, k to the similarity loss with the LSE; it needs return_lse=True")
    meta = backends.Meta.of(q, _head_dim_option(q), _head_dim_option(v),
                            _slice_option(q.shape[2], q.shape[3], v.shape[3]), *_checks.reference_only_options(q, k, v))
    if not return_lse and backend == "auto" and _sdpa_output_only(q, k, v, meta):
        from .aten_attention import nan_rows_kept

        # not in place: under a TorchScript trace the output may be saved for SDPA's backward
        return nan_rows_kept(F.scaled_dot_product_attention(q, k, v), q), None
    _, impl = backends.select("spatial_attention", backend, meta)
    if not return_lse:
        return impl(q, k, v, logit_scale)[0], None
    return impl(q, k, v, logit_scale, tie_qk=tie_qk)


def _sdpa_output_only(q, k, v, meta: backends.Meta) -> bool:
    """Whether "auto" computes an attention output without its LSE with torch's SDPA: nothing to
    differentiate (no backward, whose kernel may not be deterministic), and neither forward-mode
    AD nor an ONNX export, which take the reference. Under a TorchScript trace whatever the grad
    mode, so that the traced graph (aten's SDPA operator) does not depend on it, unless
    deterministic algorithms are asked for (the reference then)."""
    if meta.options & {_checks.FORWARD_AD, _checks.ONNX_EXPORT} or meta.device_type not in ("cpu", "cuda"):
        return False
    if _checks.TORCHSCRIPT_TRACE in meta.options:
        return not torch.are_deterministic_algorithms_enabled()
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
