"""Mixed precision: the block and both losses inside ``torch.autocast``, as a training step runs them.

A small segmentation net (conv stem, SpatialSelfAttention, conv head, softmax) with the masked CRF
and attentive similarity losses: under autocast the block's q, k, v come out of the projections in
the low-precision dtype and reach the kernels as such. Every backend that runs here must give fp32
losses close to the same step in fp32, finite gradients close in direction, and, in fp16 with a
GradScaler, finite kernel gradients and no more skipped steps than the reference. On the CPU autocast runs in bf16 (the CPU's autocast
dtype); on a GPU in fp16 and bf16.
"""
import functools

import pytest
import torch
from torch import nn

from attenscribble_ops.nn import AttentiveSimilarityLoss, MaskedCRFLoss, SpatialSelfAttention
from attenscribble_ops.testing import runnable_backends

from conftest import requires_cuda

# Against the fp32 step: the largest relative error of each loss, the least cosine between the
# gradients (on this CPU in bf16: at most 1.2e-4 and 0.99995; fp16 carries three more mantissa bits).
REL, COSINE = 5e-3, 0.999


def _runs_every_op(device, dtype):
    """The backends that run the block and both losses on such inputs."""
    return set(runnable_backends("spatial_attention", device, dtype)) & \
        set(runnable_backends("attentive_similarity", device, dtype)) & \
        set(runnable_backends("masked_crf", device, dtype))


def _cases():
    out = []
    for device, dtypes in (("cpu", (torch.bfloat16,)), ("cuda", (torch.float16, torch.bfloat16))):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        for dtype in dtypes:
            for backend in sorted(_runs_every_op(device, dtype)):
                out.append(pytest.param(device, dtype, backend, id=f"{device}-{str(dtype)[6:]}-{backend}"))
    return out


class _Net(nn.Module):
    def __init__(self, backend, classes=3, dim=16, heads=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, stride=2, padding=1))
        self.block = SpatialSelfAttention(dim, heads=heads, backend=backend)
        self.head = nn.Conv2d(dim, classes, 1)
        self.crf = MaskedCRFLoss(radius=2, sigma_xy=2.0, sigma_image=0.2, backend=backend)
        self.asl = AttentiveSimilarityLoss(self.block.similarity_heads, radius=2, sigma=2.0, backend=backend)

    def forward(self, image, scribble):
        features, similarity = self.block(self.stem(image))
        logits = nn.functional.interpolate(self.head(features), size=image.shape[2:], mode="bilinear",
                                           align_corners=False)
        probs = logits.softmax(1)
        pce = nn.functional.cross_entropy(logits, scribble, ignore_index=255)
        crf = self.crf(probs, image, mask_dst=(scribble == 255).unsqueeze(1))
        asl = self.asl(similarity, probs)
        return pce + crf + asl, (crf, asl), similarity


def _inputs(device):
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 1, 24, 20, generator=g)
    scribble = torch.full((2, 24, 20), 255, dtype=torch.long)
    scribble[:, 4:6, 3:15] = 0
    scribble[:, 12:14, 5:12] = 1
    scribble[:, 18:20, 8:18] = 2
    return image.to(device), scribble.to(device)


def _step(net, image, scribble, device, dtype):
    net.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, terms, similarity = net(image, scribble)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    return loss.detach(), terms, similarity, grads


@pytest.mark.parametrize("device,dtype,backend", _cases())
def test_training_step_under_autocast(device, dtype, backend):
    torch.manual_seed(0)
    net = _Net(backend).to(device)
    image, scribble = _inputs(device)
    loss32, terms32, _, grads32 = _step(net, image, scribble, device, None)
    loss, terms, similarity, grads = _step(net, image, scribble, device, dtype)
    crf, asl = terms

    assert similarity.q.dtype == dtype, "autocast did not reach the block's projections"
    assert crf.dtype == asl.dtype == loss.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    assert torch.isfinite(grads).all()
    for got, want in zip((loss,) + terms, (loss32,) + terms32):
        assert abs(got.item() - want.item()) <= REL * abs(want.item())
    assert torch.nn.functional.cosine_similarity(grads.double(), grads32.double(), dim=0) >= COSINE


def _scaler_cases():
    out = []
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        runnable = _runs_every_op(device, torch.float16)
        if device == "cpu":
            runnable.discard("triton")  # the interpreter: minutes for four steps
        out += [pytest.param(device, b, id=f"{device}-{b}") for b in sorted(runnable - {"reference"})]
    return out


@functools.lru_cache(maxsize=None)  # the reference's run, once per device
def _scaled_steps(backend, device, steps=4):
    """``steps`` fp16 steps with GradScaler (its default initial scale, 2**16): the scale after each,
    whether the gradients the kernels returned (the block's q and k) were finite, and whether any
    parameter changed."""
    torch.manual_seed(0)
    net = _Net(backend).to(device)
    initial = [p.detach().clone() for p in net.parameters()]
    image, scribble = _inputs(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device)
    scales, finite = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16):
            loss, _, similarity = net(image, scribble)
        similarity.q.retain_grad()
        similarity.k.retain_grad()
        scaler.scale(loss).backward()
        finite.append(bool(torch.isfinite(similarity.q.grad).all() and torch.isfinite(similarity.k.grad).all()))
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    changed = any(not torch.equal(a, p) for a, p in zip(initial, net.parameters()))
    return tuple(scales), tuple(finite), changed


@pytest.mark.parametrize("device,backend", _scaler_cases())
def test_grad_scaler_overflows_no_more_than_the_reference(device, backend):
    """fp16 with loss scaling: the kernels' gradients stay finite at every scale GradScaler tries, and
    the scaler skips no more steps than with the reference ops.

    With the default initial scale (2**16) the first step overflows with every backend, the reference
    too (seen on an H100 and on the development CPU), and GradScaler halves the scale. On the CPU the
    overflow is in the bias gradients of the block's fp16 linear layers (sums over all tokens), not
    in the kernels' gradients."""
    scales, finite, changed = _scaled_steps(backend, device)
    ref_scales, _, _ = _scaled_steps("reference", device)
    assert all(finite), f"non-finite q/k gradients from the {backend} kernels at the scales {scales}"
    assert scales[-1] >= ref_scales[-1], f"scales {scales} against the reference's {ref_scales}"
    assert changed, "no step was taken"
