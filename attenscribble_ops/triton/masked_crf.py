"""Masked CRF loss in Triton: the loss and its gradient in one fused pass (the "triton" backend).

Same maths as csrc/cpu/masked_crf.cpp. For a centre i and its in-image neighbours j != i:

    G_ij = sum_k w_k exp(-1/2 (|dpos_ij|^2 / sxy_k^2 + sum_f (I_if - I_jf)^2 / simg_kf^2))
    S_i = sum_j G_ij msrc_j,  A_ic = sum_j G_ij msrc_j P_jc,  B_ic = sum_j G_ij m_j P_jc
    loss      Potts: raw = sum_i m_i (S_i + border_i - P_i . A_i);  compat: sum_i m_i P_i . (mu A_i)
    gradient  Potts: dP_k = -(m_k A_k + msrc_k B_k);   compat: m_k mu A_k + msrc_k mu^T B_k
(one pass gives both; autograd scales the gradient, attenscribble_ops/_crf_ops.py).

Layout: contiguous (B, C, D, H, W) probabilities (2-D inputs get D = 1), image (B, F, ...), masks
(B, 1, ...); a small parameter vector [sd, sh, sw, window, table...] in the accumulate dtype, so
that float64 runs never round spacings or sigmas to float32.
Parallel: one program per tile of BLOCK_H x BLOCK_W pixels of one (b, z) plane, all classes in
a (CB, BLOCK) accumulator; the window is a loop over offsets with masked loads (the GPU caches
serve the reuse between neighbouring pixels). The gradient is a gather (each program writes only
its own pixels), so nothing is atomic; each program writes one loss partial and a single
program sums them in a fixed order.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _crf_ops, backends
from .._checks import accumulate_dtype
from .._crf_params import CRFParams

_PARAMS = tl.constexpr(4)  # sd, sh, sw, window size; the (K, 2 + F) descriptor table follows


@triton.jit
def _window_sums(probs_ptr, image_ptr, mdst_ptr, msrc_ptr, params_ptr, b, z, y, x, inside, cls, cmask,
                 C, F, K, D, H, W, PLANE, VOLUME, EZ, EY, EX,
                 HAS_MDST: tl.constexpr, HAS_MSRC: tl.constexpr, SECOND: tl.constexpr,
                 CB: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """S, A and (if SECOND) B of the pixels (b, z, y, x): see the module docstring. Indices are
    int64 because b, z, y, x are."""
    plane = PLANE
    volume = VOLUME
    sd = tl.load(params_ptr)
    sh = tl.load(params_ptr + 1)
    sw = tl.load(params_ptr + 2)
    table = params_ptr + _PARAMS
    centre = z * plane + y * W + x
    ksum = tl.zeros([BLOCK], dtype=ACC)
    acc_a = tl.zeros([CB, BLOCK], dtype=ACC)
    acc_b = tl.zeros([CB, BLOCK], dtype=ACC)
    for dz in range(-EZ, EZ + 1):
        zz = z + dz
        for dy in range(-EY, EY + 1):
            yy = y + dy
            for dx in range(-EX, EX + 1):
                xx = x + dx
                nb = inside & (zz >= 0) & (zz < D) & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                nb = nb & ((dz != 0) | (dy != 0) | (dx != 0))
                nidx = zz * plane + yy * W + xx
                d2 = (dz * sd) * (dz * sd) + (dy * sh) * (dy * sh) + (dx * sw) * (dx * sw)
                g = tl.zeros([BLOCK], dtype=ACC)
                for k in range(K):
                    row = table + k * (2 + F)
                    inv_xy = tl.load(row + 1)
                    q = tl.zeros([BLOCK], dtype=ACC) + inv_xy * inv_xy * d2
                    for f in range(F):
                        s = tl.load(row + 2 + f)
                        channel = image_ptr + (b * F + f) * volume
                        diff = tl.load(channel + centre, mask=inside, other=0.0) - tl.load(channel + nidx, mask=nb,
                                                                                           other=0.0)
                        q += s * s * diff * diff
                    g += tl.load(row) * tl.exp(-0.5 * q)
                g = tl.where(nb, g, 0.0)
                ga = g
                if HAS_MSRC:
                    ga = g * tl.load(msrc_ptr + b * volume + nidx, mask=nb, other=0.0)
                pj = tl.load(probs_ptr + (b * C + cls[:, None]) * volume + nidx[None, :],
                             mask=cmask[:, None] & nb[None, :], other=0.0).to(ACC)
                ksum += ga
                acc_a += ga[None, :] * pj
                if SECOND:
                    gb = g
                    if HAS_MDST:
                        gb = g * tl.load(mdst_ptr + b * volume + nidx, mask=nb, other=0.0)
                    acc_b += gb[None, :] * pj
    return ksum, acc_a, acc_b


@triton.jit
def _tile(pid, D, H, W, TILES_W, TILES_PLANE, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Coordinates (int64) of the pixels of the program's tile, and which are inside the image."""
    plane_id = pid // TILES_PLANE
    tile = pid % TILES_PLANE
    b = (plane_id // D).to(tl.int64)
    z = (plane_id % D).to(tl.int64)
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    y = ((tile // TILES_W) * BLOCK_H + offs // BLOCK_W).to(tl.int64)
    x = ((tile % TILES_W) * BLOCK_W + offs % BLOCK_W).to(tl.int64)
    return b, z, y, x, (y < H) & (x < W)


@triton.jit
def _mix(mu_ptr, C, acc, cls, cmask, TRANSPOSE: tl.constexpr):
    """(mu acc)_c = sum_c' mu_cc' acc_c', or (mu^T acc)_c with TRANSPOSE, per pixel."""
    mu = tl.load(mu_ptr + cls[:, None] * C + cls[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
    if TRANSPOSE:
        return tl.sum(mu[:, :, None] * acc[:, None, :], axis=0)
    return tl.sum(mu[:, :, None] * acc[None, :, :], axis=1)


@triton.jit
def _border(image_ptr, params_ptr, b, z, y, x, inside, F, K, D, H, W, VOLUME, EZ, EY, EX,
            BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The original's zero padding: every out-of-image window cell is a neighbour with features 0
    and probability 0; their number is the window minus the in-image cells."""
    n_in = ((tl.minimum(z + EZ, D - 1) - tl.maximum(z - EZ, 0) + 1)
            * (tl.minimum(y + EY, H - 1) - tl.maximum(y - EY, 0) + 1)
            * (tl.minimum(x + EX, W - 1) - tl.maximum(x - EX, 0) + 1))
    sd = tl.load(params_ptr)
    sh = tl.load(params_ptr + 1)
    sw = tl.load(params_ptr + 2)
    pos2 = (z * sd) * (z * sd) + (y * sh) * (y * sh) + (x * sw) * (x * sw)
    centre = (z * H + y) * W + x
    k0 = tl.zeros([BLOCK], dtype=ACC)
    for k in range(K):
        row = params_ptr + _PARAMS + k * (2 + F)
        inv_xy = tl.load(row + 1)
        e = inv_xy * inv_xy * pos2
        for f in range(F):
            s = tl.load(row + 2 + f)
            v = tl.load(image_ptr + (b * F + f) * VOLUME + centre, mask=inside, other=0.0)
            e += s * s * v * v
        k0 += tl.load(row) * tl.exp(-0.5 * e)
    return (tl.load(params_ptr + 3) - n_in.to(ACC)) * k0


@triton.jit
def _masked_crf_kernel(probs_ptr, image_ptr, mdst_ptr, msrc_ptr, mu_ptr, params_ptr, partial_ptr, grad_ptr,
                       C, F, K, D, H, W, PLANE, VOLUME, EZ, EY, EX, TILES_W, TILES_PLANE,
                       HAS_MDST: tl.constexpr, HAS_MSRC: tl.constexpr, COMPAT: tl.constexpr,
                       ZERO_PAD: tl.constexpr, WITH_GRAD: tl.constexpr, CB: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_W: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    BLOCK: tl.constexpr = BLOCK_H * BLOCK_W
    SECOND: tl.constexpr = WITH_GRAD and (HAS_MDST or HAS_MSRC)
    b, z, y, x, inside = _tile(pid, D, H, W, TILES_W, TILES_PLANE, BLOCK_H, BLOCK_W)
    cls = tl.arange(0, CB)
    cmask = cls < C
    ksum, acc_a, acc_b = _window_sums(probs_ptr, image_ptr, mdst_ptr, msrc_ptr, params_ptr, b, z, y, x, inside, cls,
                                      cmask, C, F, K, D, H, W, PLANE, VOLUME, EZ, EY, EX, HAS_MDST, HAS_MSRC, SECOND,
                                      CB, BLOCK, ACC)
    centre = z * PLANE + y * W + x
    at = (b * C + cls[:, None]) * VOLUME + centre[None, :]
    lanes = cmask[:, None] & inside[None, :]
    pc = tl.load(probs_ptr + at, mask=lanes, other=0.0).to(ACC)
    md = tl.full([BLOCK], 1.0, ACC)
    if HAS_MDST:
        md = tl.load(mdst_ptr + b * VOLUME + centre, mask=inside, other=0.0)
    if COMPAT:
        mixed = _mix(mu_ptr, C, acc_a, cls, cmask, False)
        loss = tl.sum(pc * mixed, axis=0)
    else:
        loss = ksum - tl.sum(pc * acc_a, axis=0)
        if ZERO_PAD and not HAS_MSRC:
            loss += _border(image_ptr, params_ptr, b, z, y, x, inside, F, K, D, H, W, VOLUME, EZ, EY, EX, BLOCK, ACC)
    loss = tl.where(inside, loss * md, 0.0)
    tl.store(partial_ptr + pid, tl.sum(loss, axis=0))
    if WITH_GRAD:
        ms = tl.full([BLOCK], 1.0, ACC)
        if HAS_MSRC:
            ms = tl.load(msrc_ptr + b * VOLUME + centre, mask=inside, other=0.0)
        if not SECOND:
            acc_b = acc_a
        if COMPAT:
            grad = md[None, :] * mixed + ms[None, :] * _mix(mu_ptr, C, acc_b, cls, cmask, True)
        else:
            grad = -(md[None, :] * acc_a + ms[None, :] * acc_b)
        tl.store(grad_ptr + at, grad, mask=lanes)


@triton.jit
def _masked_crf_sum_kernel(partial_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """One program: the partials in a fixed order, accumulated in float64."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + idx, mask=idx < N, other=0.0).to(tl.float64)
    tl.store(out_ptr, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@functools.lru_cache(maxsize=64)
def _params(table: tuple, radius: tuple, spacing: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[sd, sh, sw, window size, table...] on the device, built once per option set (no host to
    device copy per call)."""
    sd, sh, sw = (1.0,) * (3 - len(spacing)) + tuple(spacing)
    window = float(math.prod(2 * r + 1 for r in radius))
    return torch.tensor((sd, sh, sw, window) + table, dtype=dtype, device=device)


def _launch_geometry(probs: torch.Tensor, radius, compat: bool) -> dict:
    batch, classes = probs.shape[:2]
    depth, height, width = (1,) * (5 - probs.dim()) + tuple(probs.shape[2:])
    rd, rh, rw = (0,) * (5 - probs.dim()) + tuple(radius)
    # loops run over the window clipped to the image; the border term counts the rest
    cb = triton.next_power_of_2(classes)
    # (CB, BLOCK) accumulators, and (CB, CB, BLOCK) for the compatibility mixing: fewer pixels
    # per program as the classes grow
    block = max(16, min(256, 4096 // cb, 16384 // (cb * cb) if compat else 256))
    block_w = min(32, triton.next_power_of_2(width), block)
    block_h = min(block // block_w, triton.next_power_of_2(height))
    tiles_w = triton.cdiv(width, block_w)
    tiles_plane = tiles_w * triton.cdiv(height, block_h)
    return dict(grid=(tiles_plane * batch * depth,), C=classes, D=depth, H=height, W=width, PLANE=height * width,
                VOLUME=depth * height * width, EZ=min(rd, depth - 1), EY=min(rh, height - 1),
                EX=min(rw, width - 1), TILES_W=tiles_w, TILES_PLANE=tiles_plane,
                CB=cb, BLOCK_H=block_h, BLOCK_W=block_w)


def _common(probs, image, mask_dst, mask_src, compat, table, radius, spacing):
    acc = accumulate_dtype(probs.dtype)
    probs = probs.contiguous()
    placeholder = probs  # never read: the matching HAS_* flag is off
    geo = _launch_geometry(probs, radius, compat is not None)
    channels = 0 if image is None else image.shape[1]
    args = [probs, placeholder if image is None else image.contiguous(),
            placeholder if mask_dst is None else mask_dst.contiguous(),
            placeholder if mask_src is None else mask_src.contiguous(),
            placeholder if compat is None else compat.contiguous(),
            _params(tuple(table), tuple(radius), tuple(spacing), probs.device, acc)]
    scalars = dict(C=geo["C"], F=channels, K=len(table) // (2 + channels), D=geo["D"], H=geo["H"], W=geo["W"],
                   PLANE=geo["PLANE"], VOLUME=geo["VOLUME"], EZ=geo["EZ"], EY=geo["EY"], EX=geo["EX"],
                   TILES_W=geo["TILES_W"], TILES_PLANE=geo["TILES_PLANE"], HAS_MDST=mask_dst is not None,
                   HAS_MSRC=mask_src is not None, COMPAT=compat is not None, CB=geo["CB"],
                   BLOCK_H=geo["BLOCK_H"], BLOCK_W=geo["BLOCK_W"], ACC=_TL_ACC[acc])
    return probs, args, scalars, geo["grid"], acc


@torch.library.custom_op("attenscribble_ops::masked_crf_forward_triton", mutates_args=())
def masked_crf_forward_triton(probs: torch.Tensor, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
                              mask_src: Optional[torch.Tensor], compat: Optional[torch.Tensor], table: list[float],
                              radius: list[int], spacing: list[float], zero_padding: bool,
                              with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and, with ``with_grad``, its gradient (schema in attenscribble_ops/_crf_ops.py)."""
    probs, args, scalars, grid, acc = _common(probs, image, mask_dst, mask_src, compat, table, radius, spacing)
    partial = torch.empty(grid[0], dtype=acc, device=probs.device)
    grad = torch.empty(probs.shape if with_grad else (0,), dtype=acc, device=probs.device)
    _masked_crf_kernel[grid](*args, partial, grad if with_grad else partial, ZERO_PAD=zero_padding,
                             WITH_GRAD=with_grad, **scalars)
    raw = torch.empty((), dtype=acc, device=probs.device)
    _masked_crf_sum_kernel[(1,)](partial, raw, partial.numel(), BLOCK=1024)
    return raw, grad


_crf_ops.register_fake_and_autograd("attenscribble_ops::masked_crf_forward_triton")


def _check(meta: backends.Meta) -> Optional[str]:
    if meta.dtype == torch.bfloat16 and meta.device_type == "cpu":
        return "the Triton interpreter has no bfloat16 (numpy lacks it); use float16, float32 or float64"
    return None


@backends.register("masked_crf", "triton", check=_check)
def masked_crf_triton(probs: torch.Tensor, image: Optional[torch.Tensor], mask_dst: Optional[torch.Tensor],
                      mask_src: Optional[torch.Tensor], compat: Optional[torch.Tensor],
                      params: CRFParams) -> torch.Tensor:
    """Un-normalised loss from the Triton kernels (the interpreter on CPU tensors)."""
    raw, _ = masked_crf_forward_triton(*_crf_ops.op_arguments(probs, image, mask_dst, mask_src, compat, params))
    return raw
