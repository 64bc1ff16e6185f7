"""torch.func over every backend. Reverse mode (grad, vjp, jacrev) and vmap, per-sample gradients
included, run the fused kernels and give what autograd gives. Forward mode (jvp, jacfwd,
torch.autograd.forward_ad), which only the reference differentiates, makes "auto" take the
reference, and a fused backend named explicitly raises BackendUnavailableError: never a silently
zero tangent (what a custom operator without a forward-mode formula gives otherwise)."""
import contextlib
import warnings

import pytest
import torch
from torch import func
from torch.autograd import forward_ad

import attenscribble_ops as ao
from attenscribble_ops.testing import make_crf_inputs, make_similarity_inputs, runnable_backends

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
OPS = ("masked_crf", "attentive_similarity", "spatial_attention")
ALL = {op: [(b, d) for d in DEVICES for b in runnable_backends(op, d)] for op in OPS}
FUSED = {op: [(b, d) for b, d in cases if b != "reference"] for op, cases in ALL.items()}


def _ids(cases):
    return [f"{b}-{d}" for b, d in cases]


def _problem(op, backend, device, batch=2):
    """(f, xs): a scalar function of the op's differentiable inputs xs, as the tests differentiate
    it; every output of the op contributes, with random weights."""
    g = torch.Generator().manual_seed(11)
    if op == "masked_crf":
        inputs = make_crf_inputs(batch, 3, (8, 9), device=device, seed=2)
        image, mask = inputs["image"], inputs["mask_dst"]

        def f(probs):
            return ao.masked_crf_loss(probs, image[:probs.shape[0]], mask_dst=mask[:probs.shape[0]], radius=2,
                                      backend=backend)

        return f, (inputs["probs"],)
    if op == "attentive_similarity":
        s = make_similarity_inputs(batch, heads=2, grid=(4, 5), dim=8, device=device, seed=3)
        probs = s["probs"]

        def f(q, k, head_weight):
            return ao.attentive_similarity_loss(q, k, probs[:q.shape[0]], head_weight, s["head_bias"], grid=(4, 5),
                                                radius=1, backend=backend)

        return f, (s["q"], s["k"], s["head_weight"])
    s = make_similarity_inputs(batch, heads=1, grid=(4, 4), dim=8, device=device, seed=4)
    v = torch.randn(s["q"].shape, generator=g).to(device)
    w_out = torch.randn(s["q"].shape[1:], generator=g).to(device)
    w_lse = torch.randn(s["q"].shape[1:3], generator=g).to(device)

    def f(q, k, v):
        out, lse = ao.spatial_attention(q, k, v, logit_scale=0.7, backend=backend)
        return (out * w_out).sum() + (lse * w_lse).sum()

    return f, (s["q"], s["k"], v)


@contextlib.contextmanager
def _quiet_vmap_fallback():
    """vmap's fallback for a custom operator warns about its speed; that is not under test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        yield


def _autograd(f, xs):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    return torch.autograd.grad(f(*leaves), leaves)


def _close(got, expected):
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("op,backend,device", [(op, b, d) for op in OPS for b, d in ALL[op]],
                         ids=[f"{op}-{b}-{d}" for op in OPS for b, d in ALL[op]])
def test_grad_and_vjp_equal_autograd(op, backend, device):
    f, xs = _problem(op, backend, device)
    expected = _autograd(f, xs)
    argnums = tuple(range(len(xs)))
    _close(func.grad(f, argnums=argnums)(*xs), expected)
    value, pullback = func.vjp(f, *xs)
    torch.testing.assert_close(value, f(*xs), rtol=0, atol=0)
    _close(pullback(torch.ones_like(value)), expected)


@pytest.mark.parametrize("backend,device", ALL["spatial_attention"], ids=_ids(ALL["spatial_attention"]))
def test_attention_jacrev_matches_reference(backend, device):
    """jacrev vmaps the backward over every output element: the attention's full Jacobians of out
    and lse in q, against the reference's."""
    s = make_similarity_inputs(1, heads=1, grid=(2, 3), dim=4, device=device, seed=5)
    v = torch.randn(s["q"].shape, generator=torch.Generator().manual_seed(6)).to(device)

    def attention(backend_):
        return lambda q: ao.spatial_attention(q, s["k"], v, logit_scale=0.7, backend=backend_)

    q = s["q"]
    got = func.jacrev(attention(backend))(q)
    expected = func.jacrev(attention("reference"))(q)
    assert [tuple(j.shape) for j in got] == [tuple(q.shape) * 2, tuple(q.shape[:3] + q.shape)]
    for a, b in zip(got, expected, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op,backend,device", [(op, b, d) for op in OPS for b, d in ALL[op]],
                         ids=[f"{op}-{b}-{d}" for op in OPS for b, d in ALL[op]])
def test_per_sample_gradients(op, backend, device):
    """vmap(grad(f)) over the batch, the torch.func recipe for per-sample gradients (the custom
    operators run per sample through vmap's fallback), against one autograd call per sample."""
    f, xs = _problem(op, backend, device)
    shared = xs[2:] if op == "attentive_similarity" else ()  # head_weight is not per sample
    per_sample = xs[:len(xs) - len(shared)]

    def single(*xs_i):
        return f(*(x.unsqueeze(0) for x in xs_i), *shared)

    argnums = tuple(range(len(per_sample)))
    with _quiet_vmap_fallback():
        got = func.vmap(func.grad(single, argnums=argnums))(*per_sample)
    for i in range(per_sample[0].shape[0]):
        expected = _autograd(single, [x[i] for x in per_sample])
        _close([g[i] for g in got], expected)


@pytest.mark.parametrize("op,backend,device", [(op, b, d) for op in OPS for b, d in ALL[op]],
                         ids=[f"{op}-{b}-{d}" for op in OPS for b, d in ALL[op]])
def test_vmap_forward_equals_loop(op, backend, device):
    f, xs = _problem(op, backend, device)
    shared = xs[2:] if op == "attentive_similarity" else ()
    per_sample = xs[:len(xs) - len(shared)]

    def single(*xs_i):
        return f(*(x.unsqueeze(0) for x in xs_i), *shared)

    with _quiet_vmap_fallback():
        got = func.vmap(single)(*per_sample)
    expected = torch.stack([single(*(x[i] for x in per_sample)) for i in range(per_sample[0].shape[0])])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op,backend,device", [(op, b, d) for op in OPS for b, d in FUSED[op]],
                         ids=[f"{op}-{b}-{d}" for op in OPS for b, d in FUSED[op]])
def test_forward_mode_on_a_fused_backend_raises(op, backend, device):
    f, xs = _problem(op, backend, device)
    tangents = tuple(torch.ones_like(x) for x in xs)
    with pytest.raises(ao.BackendUnavailableError, match="forward-mode AD .* needs backend='reference'"):
        func.jvp(f, xs, tangents)
    with pytest.raises(ao.BackendUnavailableError, match="forward-mode AD"):
        with forward_ad.dual_level():
            f(*(forward_ad.make_dual(x, t) for x, t in zip(xs, tangents)))
    f(*xs)  # the same call without tangents still runs


@pytest.mark.parametrize("op,device", [(op, d) for op in OPS for d in DEVICES],
                         ids=[f"{op}-{d}" for op in OPS for d in DEVICES])
def test_forward_mode_under_auto_takes_the_reference(op, device):
    """jvp under "auto": the reference's tangent, which is <gradient, tangent> of the fused
    backends' reverse mode."""
    f_auto, xs = _problem(op, "auto", device)
    f_ref, _ = _problem(op, "reference", device)
    g = torch.Generator().manual_seed(7)
    tangents = tuple(torch.randn(x.shape, generator=g, dtype=x.dtype).to(device) for x in xs)
    value, tangent = func.jvp(f_auto, xs, tangents)
    value_ref, tangent_ref = func.jvp(f_ref, xs, tangents)
    torch.testing.assert_close(tangent, tangent_ref, rtol=0, atol=0)
    torch.testing.assert_close(value, value_ref, rtol=0, atol=0)
    grads = _autograd(f_auto, xs)  # reverse mode on the backend "auto" picks without tangents
    expected = sum((gr.double() * t.double()).sum() for gr, t in zip(grads, tangents))
    torch.testing.assert_close(tangent.double(), expected, rtol=1e-4, atol=1e-6)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(xs[0], tangents[0])
        assert ao.resolve(op, dual) == "reference"
        report = ao.explain(op, dual)
    assert "reference: selected" in report
    skipped = [b for b in ao.AUTO_ORDER[op][device] if (b, device) in FUSED[op]]
    assert all(f"{b}: skipped: forward-mode AD" in report for b in skipped), report


@pytest.mark.parametrize("backend,device", FUSED["spatial_attention"], ids=_ids(FUSED["spatial_attention"]))
def test_second_order_under_func_raises(backend, device):
    f, xs = _problem("spatial_attention", backend, device)
    with pytest.raises(RuntimeError, match="no second derivative"):
        func.grad(lambda q: func.grad(f)(q, *xs[1:]).square().sum())(xs[0])


@pytest.mark.parametrize("backend,device", FUSED["masked_crf"], ids=_ids(FUSED["masked_crf"]))
def test_masked_crf_hessian_vector_product_under_func(backend, device):
    """The fused masked CRF is exact to any order, under torch.func too: grad of grad, against
    the reference."""
    f, (probs,) = _problem("masked_crf", backend, device)
    f_ref, _ = _problem("masked_crf", "reference", device)
    u = torch.randn(probs.shape, generator=torch.Generator().manual_seed(8)).to(device)

    def hvp(fn):
        return func.grad(lambda p: (func.grad(fn)(p) * u).sum())(probs)

    torch.testing.assert_close(hvp(f), hvp(f_ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in runnable_backends("spatial_attention", "cpu")])
def test_block_and_loss_parameter_gradients_with_functional_call(backend):
    """The block and the loss as torch.func uses a model: func.grad over the parameters of
    functional_call (the tied q, k path of the fused attention), against autograd."""
    torch.manual_seed(0)
    block = ao.nn.SpatialSelfAttention(16, heads=2, backend=backend).eval()
    loss_fn = ao.nn.AttentiveSimilarityLoss(heads=block.similarity_heads, radius=1,
                                            backend=backend if backend != "aten" else "auto")
    x = torch.randn(2, 16, 4, 5)
    probs = torch.softmax(torch.randn(2, 3, 8, 10), 1)
    params = {**{f"block.{k}": v.detach() for k, v in block.named_parameters()},
              **{f"loss.{k}": v.detach() for k, v in loss_fn.named_parameters()}}
    model = torch.nn.ModuleDict({"block": block, "loss": loss_fn})

    def objective(params):
        feats, sim = func.functional_call(model["block"], {k[6:]: v for k, v in params.items()
                                                           if k.startswith("block.")}, (x,))
        loss = func.functional_call(model["loss"], {k[5:]: v for k, v in params.items() if k.startswith("loss.")},
                                    (sim, probs))
        return loss + feats.square().mean()

    got = func.grad(objective)(params)
    model.zero_grad()
    feats, sim = block(x)
    (loss_fn(sim, probs) + feats.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7)


def test_attn_gated_crf_drop_in_under_func():
    """The drop-in AttnGatedCRF (its window-pairs path on the official sparse mask): grad and jvp in
    the probabilities and the kernel, against the original's dense formula."""
    from attenscribble_ops.compat import AttnGatedCRF, pre_compute_xy_mask

    h, w, batch = 6, 7, 2
    n = h * w
    mask = pre_compute_xy_mask(h, w, 1, 6.0)
    g = torch.Generator().manual_seed(9)
    kernel = torch.rand(batch, n, n, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(batch, 3, h, w, generator=g, dtype=torch.float64), 1)
    module = AttnGatedCRF()

    def lean(p, k):
        return module(p, k, mask, h, w)["loss"]

    def dense(p, k):
        pairs = k * torch.as_tensor(mask)
        tokens = p.flatten(2).transpose(1, 2)
        return (pairs.sum() - (torch.bmm(pairs, tokens) * tokens).sum()) / (batch * n)

    for got, expected in zip(func.grad(lean, argnums=(0, 1))(probs, kernel),
                             func.grad(dense, argnums=(0, 1))(probs, kernel), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    tangents = (torch.randn(probs.shape, generator=g, dtype=torch.float64),
                torch.randn(kernel.shape, generator=g, dtype=torch.float64))
    got = func.jvp(lean, (probs, kernel), tangents)
    expected = func.jvp(dense, (probs, kernel), tangents)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
