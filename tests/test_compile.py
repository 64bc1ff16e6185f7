"""torch.compile(fullgraph=True) traces the public functions (validation, backend selection and the
chosen implementation) and matches eager, values and gradients."""
import pytest
import torch

import attenscribble_ops as ao
from attenscribble_ops.testing import make_crf_inputs, make_similarity_inputs


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


def test_attentive_similarity_loss_compiles_fullgraph():
    d = make_similarity_inputs(2, 2, (4, 6), 8)

    def fn(q, k):
        return ao.attentive_similarity_loss(q, k, d["probs"], d["head_weight"], d["head_bias"], grid=d["grid"],
                                            radius=2, sample_weight=torch.tensor([1.0, 0.0]))

    q1, k1 = d["q"].clone().requires_grad_(), d["k"].clone().requires_grad_()
    q2, k2 = d["q"].clone().requires_grad_(), d["k"].clone().requires_grad_()
    eager = fn(q1, k1)
    compiled = torch.compile(fn, fullgraph=True)(q2, k2)
    torch.testing.assert_close(compiled, eager)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(q2.grad, q1.grad)
    torch.testing.assert_close(k2.grad, k1.grad)
