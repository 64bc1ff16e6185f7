"""Modules: the spatial self-attention block against the official block's formulas, the similarity
loss module's official initialisation, and the masked CRF module."""
import math

import pytest
import torch
import torch.nn.functional as F

import attenscribble_ops as ao
from attenscribble_ops.testing import make_crf_inputs
from attenscribble_ops.nn import AttentionSimilarity, AttentiveSimilarityLoss, MaskedCRFLoss, SpatialSelfAttention

f64 = torch.float64


def _official_forward(block: SpatialSelfAttention, x: torch.Tensor):
    """The official EncoderFormer attention branch written out with the block's own parameters."""
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    logits_all = []
    for blk in block.blocks:
        u = F.layer_norm(t, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        heads = block.heads
        q = (u @ blk.q.weight.T).reshape(b, h * w, heads, c // heads).permute(0, 2, 1, 3)
        kv = (u @ blk.kv.weight.T).reshape(b, h * w, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        logits = q @ kv[0].transpose(-2, -1)
        attn = (logits * (c // heads) ** -0.5).softmax(-1)
        o = (attn @ kv[1]).transpose(1, 2).reshape(b, h * w, c)
        t = t + o @ blk.proj.weight.T + blk.proj.bias
        u = F.layer_norm(t, (c,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        z = u @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
        z = F.conv2d(z.transpose(1, 2).reshape(b, -1, h, w), blk.mlp.dwconv.weight, blk.mlp.dwconv.bias,
                     padding=1, groups=z.shape[-1])
        z = F.gelu(z.flatten(2).transpose(1, 2))
        t = t + z @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        logits_all.append(logits)
    t = F.layer_norm(t, (c,), block.norm.weight, block.norm.bias, block.norm.eps)
    return t.transpose(1, 2).reshape(b, c, h, w), torch.cat(logits_all, 1)


@pytest.mark.parametrize("heads,depth,grid", [(1, 1, (8, 8)), (2, 2, (5, 7))])
def test_block_matches_the_official_formulas(heads, depth, grid):
    block = SpatialSelfAttention(16, heads=heads, depth=depth, backend="reference").double().eval()
    x = torch.randn(2, 16, *grid, dtype=f64)
    feats, sim = block(x)
    expected, logits = _official_forward(block, x)
    torch.testing.assert_close(feats, expected)
    assert isinstance(sim, AttentionSimilarity) and sim.grid == grid and sim.heads == heads * depth
    torch.testing.assert_close(sim.q @ sim.k.transpose(-1, -2), logits)
    torch.testing.assert_close(sim.lse, torch.logsumexp(logits, -1))


def test_block_plus_loss_equals_the_official_pipeline_and_backpropagates():
    """Official: sigmoid(conv1x1(softmax(logits) + transpose)) then AttnGatedCRF."""
    torch.manual_seed(3)
    block = SpatialSelfAttention(8, heads=2, backend="reference").double()
    loss_fn = AttentiveSimilarityLoss(heads=block.similarity_heads, radius=2, sigma=3.0, backend="reference").double()
    x = torch.randn(2, 8, 4, 5, dtype=f64, requires_grad=True)
    probs = torch.rand(2, 3, 8, 10, dtype=f64).softmax(1)
    feats, sim = block(x)
    loss = loss_fn(sim, probs)
    _, logits = _official_forward(block, x)
    attn = logits.softmax(-1)
    kernel = torch.sigmoid(F.conv2d(attn + attn.transpose(-1, -2), loss_fn.weight.view(1, -1, 1, 1),
                                    loss_fn.bias.view(1))).squeeze(1)
    expected = ao.compat.AttnGatedCRF()(probs, kernel, ao.compat.pre_compute_xy_mask(4, 5, 2, 3.0), 4, 5)["loss"]
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert x.grad.abs().sum() > 0 and loss_fn.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in block.named_parameters() if ".q." in n or ".kv." in n)


def test_similarity_loss_initialised_as_the_official_conv():
    torch.manual_seed(11)
    conv = torch.nn.Conv2d(3, 1, kernel_size=1, bias=True)
    torch.manual_seed(11)
    loss = AttentiveSimilarityLoss(heads=3)
    assert torch.equal(loss.weight.detach(), conv.weight.detach().view(3))
    assert torch.equal(loss.bias.detach(), conv.bias.detach().view(()))
    one = AttentiveSimilarityLoss(heads=1)
    assert -1 <= one.weight.item() <= 1 and -1 <= one.bias.item() <= 1


def test_block_initialisation_is_official():
    torch.manual_seed(0)
    block = SpatialSelfAttention(64, mlp_ratio=4)
    blk = block.blocks[0]
    assert blk.q.bias is None and blk.kv.bias is None and blk.proj.bias.abs().sum() == 0
    assert abs(blk.q.weight.std().item() - 0.02) < 0.002
    assert abs(blk.mlp.dwconv.weight.std().item() - math.sqrt(2 / 9)) < 0.02
    assert blk.mlp.fc1.out_features == 256 and torch.equal(block.norm.weight, torch.ones(64))


def test_masked_crf_module_equals_the_function():
    d = make_crf_inputs(2, 3, (6, 7), dtype=f64)
    module = MaskedCRFLoss(radius=2, sigma_xy=3.0, backend="reference")
    torch.testing.assert_close(module(d["probs"], d["image"], mask_dst=d["mask_dst"]),
                               ao.masked_crf_loss(d["probs"], d["image"], radius=2, sigma_xy=3.0,
                                                  mask_dst=d["mask_dst"], backend="reference"))
    assert "radius=2" in repr(module)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="divisible"):
        SpatialSelfAttention(10, heads=3)
    with pytest.raises(ValueError, match="heads"):
        AttentiveSimilarityLoss(heads=0)
    with pytest.raises(ValueError, match="mlp_ratio must give"):
        SpatialSelfAttention(8, mlp_ratio=0.1)
    with pytest.raises(ValueError, match=r"drop_path must be a probability in \[0, 1\)"):
        SpatialSelfAttention(8, drop_path=1.0)
    with pytest.raises(ValueError, match="drop_path"):
        SpatialSelfAttention(8, drop_path=-0.5)
    with pytest.raises(ValueError, match=r"drop must be a probability in \[0, 1\]"):
        SpatialSelfAttention(8, drop=1.5)
    with pytest.raises(ValueError, match="sigma must be between"):
        AttentiveSimilarityLoss(sigma=1e-200)
    with pytest.raises(ValueError, match="radius must be <= 32768"):
        AttentiveSimilarityLoss(radius=1 << 16)
    block = SpatialSelfAttention(8)
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\)"):
        block(torch.randn(1, 4, 3, 3))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        block(torch.ones(1, 8, 3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="AttentionSimilarity"):
        AttentiveSimilarityLoss()((torch.zeros(1), torch.zeros(1)), torch.zeros(1, 2, 3, 3))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "trace", "checkpoint"])
def test_deep_block_without_an_lse(mode):
    """depth > 1 where the blocks compute no similarity LSE (no grad, a trace, a reentrant
    checkpoint's forward): features as with grad, similarity.lse None (a loss computes its own)."""
    torch.manual_seed(0)
    block = SpatialSelfAttention(8, heads=2, depth=2)
    x = torch.randn(2, 8, 4, 5)
    want, with_grad = block(x)
    assert with_grad.lse is not None and with_grad.lse.shape == (2, 4, 20)
    if mode == "no_grad":
        with torch.no_grad():
            got, sim = block(x)
    elif mode == "inference_mode":
        with torch.inference_mode():
            got, sim = block(x)
    elif mode == "trace":
        class Features(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.block = block

            def forward(self, t):
                return self.block(t)[0]

        got, sim = torch.jit.trace(Features(), (x,), check_trace=False)(x), None
    else:
        from torch.utils.checkpoint import checkpoint

        leaf = x.clone().requires_grad_()
        got = checkpoint(lambda t: block(t)[0], leaf, use_reentrant=True)
        got.square().sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
        sim = None
    torch.testing.assert_close(got, want)
    if sim is not None:
        assert sim.lse is None and sim.q.shape == with_grad.q.shape


def test_changing_logit_scale_after_construction_takes_effect():
    """The block reads logit_scale at every forward: the LSE it hands over matches the scale it
    reports (the loss with it equals the loss computing its own LSE, and the reference's)."""
    import dataclasses

    torch.manual_seed(0)
    losses = {}
    for backend in ("reference", "cpu") if "cpu" in ao.available_backends()["spatial_attention"] else ("reference",):
        torch.manual_seed(0)
        block = SpatialSelfAttention(8, backend=backend).double()
        with torch.no_grad():
            block.blocks[0].q.weight.mul_(30)
            block.blocks[0].kv.weight.mul_(30)
        loss_fn = AttentiveSimilarityLoss(radius=2, backend=backend).double()
        x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        probs = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64).softmax(1)
        block.logit_scale = 3.0
        _, sim = block(x)
        assert sim.logit_scale == 3.0
        handed, own = loss_fn(sim, probs), loss_fn(dataclasses.replace(sim, lse=None), probs)
        torch.testing.assert_close(handed, own)
        losses[backend] = handed
    torch.testing.assert_close(losses.get("cpu", losses["reference"]), losses["reference"])
    with pytest.raises(TypeError, match="logit_scale must be a real number"):
        block.logit_scale = "3"
