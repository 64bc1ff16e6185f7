"""torch.compile(fullgraph=True) traces the public functions (validation, backend selection and the
chosen implementation) and matches eager, values and gradients; torch.export captures the block."""
import pytest
import torch

import attenscribble_ops as ao
from attenscribble_ops.testing import loss_backend_for, make_crf_inputs, make_similarity_inputs, runnable_backends


@pytest.mark.parametrize("compatibility", [None, torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])])
def test_masked_crf_loss_compiles_fullgraph(compatibility):
    d = make_crf_inputs(2, 3, (10, 12), image_factor=2)

    def fn(p):
        return ao.masked_crf_loss(p, d["image"], radius=2, mask_dst=d["mask_dst"], compatibility=compatibility)

    p1 = d["probs"].clone().requires_grad_()
    p2 = d["probs"].clone().requires_grad_()
    eager = fn(p1)
    compiled = torch.compile(fn, fullgraph=True)(p2)
    torch.testing.assert_close(compiled, eager)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(p2.grad, p1.grad)


@pytest.mark.parametrize("with_lse", [False, True], ids=["own-lse", "lse-of-the-attention"])
def test_attentive_similarity_loss_compiles_fullgraph(with_lse):
    """Also with the attention's LSE handed over, as AttentiveSimilarityLoss does (the check that
    decides whether an LSE has autograd history must trace)."""
    d = make_similarity_inputs(2, 2, (4, 6), 8)

    def fn(q, k):
        lse = None
        if with_lse:
            _, lse, q, k = ao.functional.spatial_attention(q, k, torch.zeros_like(q), tie_qk=True)
        return ao.attentive_similarity_loss(q, k, d["probs"], d["head_weight"], d["head_bias"], grid=d["grid"],
                                            radius=2, sample_weight=torch.tensor([1.0, 0.0]), lse=lse)

    q1, k1 = d["q"].clone().requires_grad_(), d["k"].clone().requires_grad_()
    q2, k2 = d["q"].clone().requires_grad_(), d["k"].clone().requires_grad_()
    eager = fn(q1, k1)
    compiled = torch.compile(fn, fullgraph=True)(q2, k2)
    torch.testing.assert_close(compiled, eager)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(q2.grad, q1.grad)
    torch.testing.assert_close(k2.grad, k1.grad)


@pytest.mark.parametrize("tie_qk", [False, True])
def test_spatial_attention_aten_compiles_fullgraph(tie_qk):
    """The "aten" backend (torch's fused SDPA kernels, an autograd.Function over ATen ops) traces
    whole, with the similarity LSE's gradient through its second pass."""
    d = make_similarity_inputs(2, 2, (4, 6), 8)
    v0 = torch.randn_like(d["q"])

    def fn(q, k, v):
        out, lse = ao.spatial_attention(q, k, v, logit_scale=0.8, backend="aten", tie_qk=tie_qk)[:2]
        return out.square().sum() + (lse * torch.linspace(-1, 1, lse.shape[-1])).sum()

    eager_in = [t.clone().requires_grad_() for t in (d["q"], d["k"], v0)]
    compiled_in = [t.clone().requires_grad_() for t in (d["q"], d["k"], v0)]
    eager = fn(*eager_in)
    compiled = torch.compile(fn, fullgraph=True)(*compiled_in)
    torch.testing.assert_close(compiled, eager)
    eager.backward()
    compiled.backward()
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", runnable_backends("spatial_attention"))
def test_block_exports_with_torch_export(backend):
    """A network with the block exports with torch.export on every backend (the fused attention as
    its registered operator) and the exported program reproduces it."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.block = ao.nn.SpatialSelfAttention(16, heads=2, backend=backend)

        def forward(self, x):
            return self.block(self.stem(x))[0]

    net = Net().eval()
    x = torch.randn(2, 3, 6, 5)
    program = torch.export.export(net, (x,))
    torch.testing.assert_close(program.module()(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("backend", [b for b in runnable_backends("masked_crf") if b in ("reference", "cpu")])
def test_losses_export_with_dynamic_sizes(backend, strict):
    """The masked CRF without a mask (its denominator B * H * W stays symbolic) and the block with
    the similarity loss (the grid the block hands over is a pair of SymInts) export with dynamic
    spatial sizes, in torch.export's default non-strict mode too, and run at another size."""
    class Losses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ao.nn.SpatialSelfAttention(8, heads=2, backend=backend)
            self.loss = ao.nn.AttentiveSimilarityLoss(heads=2, radius=1, backend=backend)

        def forward(self, x, probs, image):
            _, sim = self.block(x)
            return self.loss(sim, probs) + ao.masked_crf_loss(probs, image, radius=1, backend=backend)

    torch.manual_seed(0)
    net = Losses().eval()
    h, w = torch.export.Dim("h", min=3, max=32), torch.export.Dim("w", min=3, max=32)

    def inputs(hh, ww):
        g = torch.Generator().manual_seed(hh * 100 + ww)
        return (torch.randn(2, 8, hh, ww, generator=g), torch.rand(2, 3, hh, ww, generator=g).softmax(1),
                torch.rand(2, 1, hh, ww, generator=g))

    program = torch.export.export(net, inputs(4, 5), dynamic_shapes=({2: h, 3: w}, {2: h, 3: w}, {2: h, 3: w}),
                                  strict=strict)
    for size in ((4, 5), (6, 3)):
        torch.testing.assert_close(program.module()(*inputs(*size)), net(*inputs(*size)), rtol=1e-5, atol=1e-6)


def _sizes_match_eager(fn, make, sizes, backend="inductor", one_graph=True):
    """fn compiled with fullgraph and dynamic shapes, called on inputs of every size, against eager
    (values and gradients); with ``one_graph``, one graph serves every size. ``make(size)`` ->
    (inputs differentiated, further arguments)."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)
    for size in sizes:
        inputs, rest = make(size)
        eager_in = [t.clone().requires_grad_() for t in inputs]
        compiled_in = [t.clone().requires_grad_() for t in inputs]
        eager = fn(*eager_in, *rest)
        got = compiled(*compiled_in, *rest)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
        eager.backward()
        got.backward()
        for a, b in zip(compiled_in, eager_in):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    if one_graph:
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


SIZES = [(4, 5), (6, 3), (5, 7)]


@pytest.mark.parametrize("backend", runnable_backends("masked_crf"))
def test_masked_crf_loss_compiles_with_dynamic_shapes(backend):
    def make(size):
        d = make_crf_inputs(2, 3, size, seed=sum(size))
        return (d["probs"],), (d["image"],)

    # the reference's dense window specialises on the size against the radius: it compiles again
    _sizes_match_eager(lambda p, image: ao.masked_crf_loss(p, image, radius=2, sigma_xy=3.0, backend=backend),
                       make, SIZES, one_graph=backend != "reference")


@pytest.mark.parametrize("backend", runnable_backends("spatial_attention"))
def test_attention_and_similarity_loss_compile_with_dynamic_shapes(backend):
    """The attention (its similarity LSE handed to the loss) and the loss, with a grid and a logit
    scale that torch.compile keeps symbolic (arguments of the compiled function: the block's
    attribute is one too)."""
    loss_backend = loss_backend_for(backend)

    def fn(q, k, v, probs, grid_h, grid_w, scale):
        out, lse, q, k = ao.spatial_attention(q, k, v, logit_scale=scale, backend=backend, tie_qk=True)
        loss = ao.attentive_similarity_loss(q, k, probs, torch.ones(2), torch.zeros(()), grid=(grid_h, grid_w),
                                            radius=1, logit_scale=scale, lse=lse, backend=loss_backend)
        return loss + out.square().mean()

    scales = dict(zip(SIZES, (0.8, 1.3, 0.5)))

    def make(size):
        d = make_similarity_inputs(2, 2, size, 8, seed=sum(size))
        return (d["q"], d["k"], torch.randn_like(d["q"])), (d["probs"], *size, scales[size])

    # the shapes stay symbolic; each scale compiles once (the operators' float arguments are
    # specialised), so no graph count
    _sizes_match_eager(fn, make, SIZES, one_graph=False)


@pytest.mark.parametrize("backend", runnable_backends("spatial_attention"))
def test_block_and_losses_trace_with_dynamic_shapes(backend):
    """The block and both losses, whole, with symbolic shapes (the block's logit scale, a float
    attribute, symbolic too). Through AOT autograd without Inductor: torch 2.13's Inductor fails
    on the block's Mix-FFN alone under dynamic=True (Linear, reshape, depthwise Conv2d: "cannot
    determine truth value of Relational"), with no op of this package involved."""
    torch.manual_seed(0)
    loss_backend = loss_backend_for(backend)
    block = ao.nn.SpatialSelfAttention(16, heads=2, backend=backend)
    similarity = ao.nn.AttentiveSimilarityLoss(heads=2, radius=1, backend=loss_backend)
    crf = ao.nn.MaskedCRFLoss(radius=1, backend=loss_backend)

    def fn(x, logits, image):
        features, sim = block(x)
        probs = torch.softmax(logits, 1)
        return similarity(sim, probs) + crf(probs, image) + features.square().mean()

    def make(size):
        g = torch.Generator().manual_seed(sum(size))
        h, w = size
        return ((torch.randn(2, 16, h, w, generator=g), torch.randn(2, 3, 2 * h, 2 * w, generator=g)),
                (torch.rand(2, 1, 2 * h, 2 * w, generator=g),))

    _sizes_match_eager(fn, make, SIZES[:2], backend="aot_eager", one_graph=backend != "reference")
