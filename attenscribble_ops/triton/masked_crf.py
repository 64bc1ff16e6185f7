"""Masked CRF loss in Triton: the loss and its gradient in one fused pass (the "triton" backend).

Same maths as csrc/cpu/masked_crf.cpp. For a centre i and its in-image neighbours j != i:

    G_ij = sum_k w_k exp(-1/2 (|dpos_ij|^2 / sxy_k^2 + sum_f (I_if - I_jf)^2 / simg_kf^2))
    S_i = sum_j G_ij msrc_j,  A_ic = sum_j G_ij msrc_j P_jc,  B_ic = sum_j G_ij m_j P_jc
    loss      Potts: raw = sum_i m_i (S_i + border_i - P_i . A_i);  compat: sum_i m_i P_i . (mu A_i)
    gradient  Potts: dP_k = -(m_k A_k + msrc_k B_k);   compat: m_k mu A_k + msrc_k mu^T B_k
(one pass gives both; autograd scales the gradient, attenscribble_ops/_crf_ops.py).

Layout: contiguous (B, C, D, H, W) probabilities (2-D inputs get D = 1), image (B, F, ...), masks
(B, 1, ...); a small parameter vector [sd, sh, sw, window, then per descriptor: weight, a, b_f]
in the accumulate dtype (a, b_f: the exponent factors -log2(e)/2 / sigma^2, computed in float64,
so that float64 runs never round spacings or sigmas to float32).
Parallel: one program per tile of BLOCK_H x BLOCK_W pixels of one (b, z) plane, with all classes
of a pixel in one thread's (BLOCK, CB) accumulators; the window is a loop over offsets (the GPU
caches serve the reuse between neighbouring pixels), without masks on tiles whose whole window
lies inside the image, with masked loads on the others. The gradient is a gather (each program
writes only its own pixels), so nothing is atomic; each program writes one loss partial and a
single program sums them in a fixed order.
"""
from __future__ import annotations

import functools
import math
import types
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _crf_ops, backends
from . import _target
from .._checks import accumulate_dtype
from .._crf_params import CRFParams

_PARAMS = tl.constexpr(4)  # sd, sh, sw, window size; the (K, 2 + F) exponent table follows
_HALF_LOG2E = 0.5 * math.log2(math.e)
_INT32_OFFSETS_BELOW = 2 ** 31  # elements per sample from which the kernel indexes in int64


@triton.jit
def _tile(pid, D, H, W, TILES_W, TILES_PLANE, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The program's plane (b, z) and tile origin (y0, x0) as scalars, its tile's pixel rows and
    columns (int32 vectors) and which of them are inside the image."""
    plane_id = pid // TILES_PLANE
    tile = pid % TILES_PLANE
    y0 = (tile // TILES_W) * BLOCK_H
    x0 = (tile % TILES_W) * BLOCK_W
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    y = y0 + offs // BLOCK_W
    x = x0 + offs % BLOCK_W
    return plane_id // D, plane_id % D, y0, x0, y, x, (y < H) & (x < W)


@triton.jit
def _feature(img, f: tl.constexpr, c0, c1, c2, centre, inside, VOLUME):
    """Feature f of the tile's own pixels: the first three were loaded before the window loop."""
    if f == 0:
        return c0
    elif f == 1:
        return c1
    elif f == 2:
        return c2
    else:
        return tl.load(img + f * VOLUME + centre, mask=inside, other=0.0)


@triton.jit
def _centre_feature(img, f: tl.constexpr, F: tl.constexpr, centre, inside, VOLUME, BLOCK: tl.constexpr,
                    ACC: tl.constexpr):
    if f < F:
        return tl.load(img + f * VOLUME + centre, mask=inside, other=0.0)
    return tl.zeros([BLOCK], dtype=ACC)


@triton.jit
def _window(probs, img, mdst, msrc, table, sd, sh, sw, c0, c1, c2, centre, inside, z, y, x, cls, cmask,
            D, H, W, PLANE, VOLUME, EZ, EY, EX, F: tl.constexpr, K: tl.constexpr, HAS_MDST: tl.constexpr,
            HAS_MSRC: tl.constexpr, SECOND: tl.constexpr, CLASS_MASK: tl.constexpr, MASKED: tl.constexpr,
            IDX64: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr):
    """S, A and (if SECOND) B of the tile's pixels: see the module docstring. MASKED: some window
    cells may lie outside the image (or some pixels outside the tile's image part), so loads are
    masked and out-of-image neighbours get G = 0; without it every load is in bounds."""
    ksum = tl.zeros([BLOCK], dtype=ACC)
    acc_a = tl.zeros([BLOCK, CB], dtype=ACC)
    acc_b = tl.zeros([BLOCK, CB], dtype=ACC)
    for dz in range(-EZ, EZ + 1):
        zz = z + dz
        z_in = (zz >= 0) & (zz < D)
        for dy in range(-EY, EY + 1):
            yy = y + dy
            row_in = inside & z_in & (yy >= 0) & (yy < H)
            if IDX64:
                row = centre + (tl.cast(dz, tl.int64) * PLANE + tl.cast(dy, tl.int64) * W)
            else:
                row = centre + (dz * PLANE + dy * W)
            dzy2 = (dz * sd) * (dz * sd) + (dy * sh) * (dy * sh)
            for dx in range(-EX, EX + 1):
                if (dz != 0) | (dy != 0) | (dx != 0):  # uniform: the centre is not its own neighbour
                    nidx = row + dx
                    nb = row_in
                    if MASKED:
                        xx = x + dx
                        nb = row_in & (xx >= 0) & (xx < W)
                    d2 = dzy2 + (dx * sw) * (dx * sw)
                    g = tl.zeros([BLOCK], dtype=ACC)
                    for k in tl.static_range(K):
                        desc = table + k * (2 + F)
                        t = tl.zeros([BLOCK], dtype=ACC) + tl.load(desc + 1) * d2
                        for f in tl.static_range(F):
                            if MASKED:
                                nf = tl.load(img + f * VOLUME + nidx, mask=nb, other=0.0)
                            else:
                                nf = tl.load(img + f * VOLUME + nidx)
                            diff = _feature(img, f, c0, c1, c2, centre, inside, VOLUME) - nf
                            t += tl.load(desc + 2 + f) * diff * diff
                        g += tl.load(desc) * tl.exp2(t)
                    if MASKED:
                        g = tl.where(nb, g, 0.0)
                    ga = g
                    if HAS_MSRC:
                        ga = g * _load_row(msrc, nidx, nb, MASKED)
                    if CLASS_MASK:
                        pj = tl.load(probs + cls[None, :] * VOLUME + nidx[:, None], mask=nb[:, None] & cmask[None, :],
                                     other=0.0).to(ACC)
                    elif MASKED:
                        pj = tl.load(probs + cls[None, :] * VOLUME + nidx[:, None], mask=nb[:, None],
                                     other=0.0).to(ACC)
                    else:
                        pj = tl.load(probs + cls[None, :] * VOLUME + nidx[:, None]).to(ACC)
                    ksum += ga
                    acc_a += ga[:, None] * pj
                    if SECOND:
                        gb = g
                        if HAS_MDST:
                            gb = g * _load_row(mdst, nidx, nb, MASKED)
                        acc_b += gb[:, None] * pj
    return ksum, acc_a, acc_b


@triton.jit
def _load_row(ptr, idx, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + idx, mask=mask, other=0.0)
    return tl.load(ptr + idx)


@triton.jit
def _masked_crf_kernel(probs_ptr, image_ptr, mdst_ptr, msrc_ptr, mu_ptr, params_ptr, partial_ptr, grad_ptr,
                       C, D, H, W, PLANE, VOLUME, EZ, EY, EX, TILES_W, TILES_PLANE,
                       F: tl.constexpr, K: tl.constexpr, HAS_MDST: tl.constexpr, HAS_MSRC: tl.constexpr,
                       COMPAT: tl.constexpr, ZERO_PAD: tl.constexpr, WITH_GRAD: tl.constexpr, CB: tl.constexpr,
                       CLASS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, IDX64: tl.constexpr,
                       ACC: tl.constexpr):
    """One tile of one (b, z) plane: S, A (and B) over the window, then the loss partial and the
    gradient of the tile's pixels. Pointers are moved to the program's sample once (int64
    scalars); pixel offsets inside a sample are int32 unless a sample's probabilities or image
    reach 2^31 elements (IDX64); CLASS_MASK: C is not a power of two. Tiles whose whole window
    lies inside the image (most of a large image) take a loop without masks."""
    pid = tl.program_id(0)
    BLOCK: tl.constexpr = BLOCK_H * BLOCK_W
    SECOND: tl.constexpr = WITH_GRAD and (HAS_MDST or HAS_MSRC)
    b, z, y0, x0, y, x, inside = _tile(pid, D, H, W, TILES_W, TILES_PLANE, BLOCK_H, BLOCK_W)
    interior = ((z >= EZ) & (z + EZ < D) & (y0 >= EY) & (y0 + (BLOCK_H - 1) + EY < H)
                & (x0 >= EX) & (x0 + (BLOCK_W - 1) + EX < W))
    if IDX64:  # every offset in int64, class and channel strides (c * VOLUME) included
        y = y.to(tl.int64)
        x = x.to(tl.int64)
        z = z.to(tl.int64)
        VOLUME = tl.cast(VOLUME, tl.int64)
        PLANE = tl.cast(PLANE, tl.int64)
        W = tl.cast(W, tl.int64)
    b64 = b.to(tl.int64)
    probs = probs_ptr + b64 * C * VOLUME
    grads = grad_ptr + b64 * C * VOLUME
    img = image_ptr + b64 * F * VOLUME
    mdst = mdst_ptr + b64 * VOLUME
    msrc = msrc_ptr + b64 * VOLUME
    sd = tl.load(params_ptr)
    sh = tl.load(params_ptr + 1)
    sw = tl.load(params_ptr + 2)
    table = params_ptr + _PARAMS
    cls = tl.arange(0, CB)
    cmask = cls < C
    centre = z * PLANE + y * W + x
    c0 = _centre_feature(img, 0, F, centre, inside, VOLUME, BLOCK, ACC)
    c1 = _centre_feature(img, 1, F, centre, inside, VOLUME, BLOCK, ACC)
    c2 = _centre_feature(img, 2, F, centre, inside, VOLUME, BLOCK, ACC)
    if interior:
        ksum, acc_a, acc_b = _window(probs, img, mdst, msrc, table, sd, sh, sw, c0, c1, c2, centre, inside, z, y, x,
                                     cls, cmask, D, H, W, PLANE, VOLUME, EZ, EY, EX, F, K, HAS_MDST, HAS_MSRC, SECOND,
                                     CLASS_MASK, False, IDX64, BLOCK, CB, ACC)
    else:
        ksum, acc_a, acc_b = _window(probs, img, mdst, msrc, table, sd, sh, sw, c0, c1, c2, centre, inside, z, y, x,
                                     cls, cmask, D, H, W, PLANE, VOLUME, EZ, EY, EX, F, K, HAS_MDST, HAS_MSRC, SECOND,
                                     CLASS_MASK, True, IDX64, BLOCK, CB, ACC)
    at = cls[None, :] * VOLUME + centre[:, None]
    lanes = inside[:, None] & cmask[None, :]
    pc = tl.load(probs + at, mask=lanes, other=0.0).to(ACC)
    md = tl.full([BLOCK], 1.0, ACC)
    if HAS_MDST:
        md = tl.load(mdst + centre, mask=inside, other=0.0)
    if COMPAT:
        mixed = _mix(mu_ptr, C, acc_a, cls, cmask, False)
        loss = tl.sum(pc * mixed, axis=1)
    else:
        loss = ksum - tl.sum(pc * acc_a, axis=1)
        if ZERO_PAD and not HAS_MSRC:
            loss += _border(table, sd, sh, sw, c0, c1, c2, img, centre, inside, z, y, x, params_ptr, F, K, D, H, W,
                            VOLUME, EZ, EY, EX, BLOCK, ACC)
    loss = tl.where(inside, loss * md, 0.0)
    tl.store(partial_ptr + pid, tl.sum(loss, axis=0))
    if WITH_GRAD:
        ms = tl.full([BLOCK], 1.0, ACC)
        if HAS_MSRC:
            ms = tl.load(msrc + centre, mask=inside, other=0.0)
        if not SECOND:
            acc_b = acc_a
        if COMPAT:
            grad = md[:, None] * mixed + ms[:, None] * _mix(mu_ptr, C, acc_b, cls, cmask, True)
        else:
            grad = -(md[:, None] * acc_a + ms[:, None] * acc_b)
        tl.store(grads + at, grad, mask=lanes)


@triton.jit
def _mix(mu_ptr, C, acc, cls, cmask, TRANSPOSE: tl.constexpr):
    """(mu acc)_c = sum_c' mu_cc' acc_c', or (mu^T acc)_c with TRANSPOSE, per pixel (acc: (BLOCK, CB))."""
    mu = tl.load(mu_ptr + cls[:, None] * C + cls[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
    if TRANSPOSE:
        return tl.sum(mu[None, :, :] * acc[:, :, None], axis=1)
    return tl.sum(mu[None, :, :] * acc[:, None, :], axis=2)


@triton.jit
def _border(table, sd, sh, sw, c0, c1, c2, img, centre, inside, z, y, x, params_ptr, F: tl.constexpr,
            K: tl.constexpr, D, H, W, VOLUME, EZ, EY, EX, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The original's zero padding: every out-of-image window cell is a neighbour with features 0
    and probability 0; their number is the window minus the in-image cells."""
    n_in = ((tl.minimum(z + EZ, D - 1) - tl.maximum(z - EZ, 0) + 1)
            * (tl.minimum(y + EY, H - 1) - tl.maximum(y - EY, 0) + 1)
            * (tl.minimum(x + EX, W - 1) - tl.maximum(x - EX, 0) + 1))
    zf = z.to(ACC) * sd
    yf = y.to(ACC) * sh
    xf = x.to(ACC) * sw
    pos2 = zf * zf + yf * yf + xf * xf
    k0 = tl.zeros([BLOCK], dtype=ACC)
    for k in tl.static_range(K):
        desc = table + k * (2 + F)
        t = tl.load(desc + 1) * pos2
        for f in tl.static_range(F):
            v = _feature(img, f, c0, c1, c2, centre, inside, VOLUME)
            t += tl.load(desc + 2 + f) * v * v
        k0 += tl.load(desc) * tl.exp2(t)
    return (tl.load(params_ptr + 3) - n_in.to(ACC)) * k0


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
def _params(table: tuple, channels: int, radius: tuple, spacing: tuple, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """[sd, sh, sw, window size, then per descriptor: weight, a, b_0 .. b_F-1] on the device, built
    once per option set (no host to device copy per call). a and b_f turn the table's inverse
    sigmas into base-2 exponent factors, -log2(e)/2 / sigma^2, so the kernel's exponent is
    a |dpos|^2 + sum_f b_f dI_f^2 and its Gaussian one exp2 (computed here in float64)."""
    sd, sh, sw = (1.0,) * (3 - len(spacing)) + tuple(spacing)
    window = float(math.prod(2 * r + 1 for r in radius))
    rows = list(table)
    for i, v in enumerate(rows):
        if i % (2 + channels) != 0:
            rows[i] = -_HALF_LOG2E * v * v
    return torch.tensor((sd, sh, sw, window, *rows), dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def _launch_geometry(shape: tuple, radius: tuple, compat: bool) -> dict:
    """Tiles, grid and loop bounds for probabilities of ``shape`` (B, C, *spatial) (remembered:
    a training loop asks for the same few shapes every step; read-only)."""
    batch, classes = shape[:2]
    depth, height, width = (1,) * (5 - len(shape)) + tuple(shape[2:])
    rd, rh, rw = (0,) * (5 - len(shape)) + tuple(radius)
    # loops run over the window clipped to the image; the border term counts the rest
    cb = triton.next_power_of_2(classes)
    # (BLOCK, CB) accumulators, and (BLOCK, CB, CB) for the compatibility mixing: fewer pixels
    # per program as the classes grow
    block = max(16, min(512, 4096 // cb, 16384 // (cb * cb) if compat else 512))
    block_w = min(32, triton.next_power_of_2(width), block)
    block_h = min(block // block_w, triton.next_power_of_2(height))
    tiles_w = triton.cdiv(width, block_w)
    tiles_plane = tiles_w * triton.cdiv(height, block_h)
    return types.MappingProxyType(dict(
        grid=(tiles_plane * batch * depth,), C=classes, D=depth, H=height, W=width, PLANE=height * width,
        VOLUME=depth * height * width, EZ=min(rd, depth - 1), EY=min(rh, height - 1), EX=min(rw, width - 1),
        TILES_W=tiles_w, TILES_PLANE=tiles_plane, CB=cb, BLOCK_H=block_h, BLOCK_W=block_w))


def _common(probs, image, mask_dst, mask_src, compat, table, radius, spacing):
    acc = accumulate_dtype(probs.dtype)
    probs = probs.contiguous()
    placeholder = probs  # never read: the matching HAS_* flag is off
    geo = _launch_geometry(tuple(probs.shape), tuple(radius), compat is not None)
    channels = 0 if image is None else image.shape[1]
    args = [probs, placeholder if image is None else image.contiguous(),
            placeholder if mask_dst is None else mask_dst.contiguous(),
            placeholder if mask_src is None else mask_src.contiguous(),
            placeholder if compat is None else compat.contiguous(),
            _params(tuple(table), channels, tuple(radius), tuple(spacing), probs.device, acc)]
    # offsets inside one sample (the kernel moves its pointers to the sample first) fit int32
    # unless the sample's probabilities or image reach 2^31 elements
    idx64 = max(geo["C"], channels) * geo["VOLUME"] >= _INT32_OFFSETS_BELOW
    scalars = dict(C=geo["C"], F=channels, K=len(table) // (2 + channels), D=geo["D"], H=geo["H"], W=geo["W"],
                   PLANE=geo["PLANE"], VOLUME=geo["VOLUME"], EZ=geo["EZ"], EY=geo["EY"], EX=geo["EX"],
                   TILES_W=geo["TILES_W"], TILES_PLANE=geo["TILES_PLANE"], HAS_MDST=mask_dst is not None,
                   HAS_MSRC=mask_src is not None, COMPAT=compat is not None, CB=geo["CB"],
                   CLASS_MASK=geo["CB"] != geo["C"],
                   BLOCK_H=geo["BLOCK_H"], BLOCK_W=geo["BLOCK_W"], IDX64=idx64, ACC=_TL_ACC[acc])
    return probs, args, scalars, geo["grid"], acc


@torch.library.custom_op("attenscribble_ops::masked_crf_forward_triton", mutates_args=())
@_target.on_tensor_device
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
    return _crf_ops.loss(masked_crf_forward_triton, probs, image, mask_dst, mask_src, compat, params)
