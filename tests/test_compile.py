"""torch.compile(fullgraph=True) traces the public functions (validation, backend selection and the
chosen implementation) and matches eager, values and gradients; torch.export captures the block."""
import pytest
import torch

import attenscribble_ops as ao
from attenscribble_ops.testing import make_crf_inputs, make_similarity_inputs, runnable_backends


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
