"""Double backward (create_graph=True: gradient penalties, Hessian-vector products) never gives a
silently wrong number: the masked CRF's fused backends are exact to any order (its gradient is
linear in the probabilities), the fused attention and similarity loss raise a clear error when a
second backward reaches them, and first-order gradients under create_graph equal the plain ones."""
import warnings

import pytest
import torch

import attenscribble_ops as ao
from attenscribble_ops.testing import loss_backend_for, make_crf_inputs, make_similarity_inputs, runnable_backends

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _fused(op, device, dtype=torch.float32):
    return [(b, device) for b in runnable_backends(op, device, dtype) if b != "reference"]


CRF_FUSED = [case for d in DEVICES for case in _fused("masked_crf", d)]
ATTENTION_FUSED = [case for d in DEVICES for case in _fused("spatial_attention", d)]
SIMILARITY_FUSED = [case for d in DEVICES for case in _fused("attentive_similarity", d)]

CRF_OPTIONS = {
    "official": dict(radius=2),
    "masks+compat+valid": dict(radius=2, mask_src=True, compatibility=True, padding="valid"),
    "two kernels": dict(radius=(1, 2), kernels=[ao.CRFKernel(1.0, 3.0, 0.5), ao.CRFKernel(0.5, 2.0, None)]),
}


def _crf_case(name, dtype, device, shape=(7, 6), classes=3):
    inputs = make_crf_inputs(2, classes, shape, channels=1, dtype=dtype, device=device, seed=3)
    options = dict(CRF_OPTIONS[name])
    if options.pop("mask_src", False):
        g = torch.Generator().manual_seed(5)
        options["mask_src"] = (torch.rand((2, 1) + shape, generator=g) < 0.8).to(device=device, dtype=dtype)
    if options.pop("compatibility", False):
        g = torch.Generator().manual_seed(6)
        compat = torch.rand(classes, classes, generator=g, dtype=torch.float64)
        options["compatibility"] = compat.fill_diagonal_(0)
    return inputs, options


def _penalty_gradient(loss_fn, leaf):
    """d/d leaf of 1e3 * |d loss / d leaf|^2: a gradient penalty, through the loss's backward."""
    (g,) = torch.autograd.grad(loss_fn(leaf), leaf, create_graph=True)
    (gg,) = torch.autograd.grad(1e3 * g.double().square().sum(), leaf)
    return gg.double()


@pytest.mark.parametrize("name", list(CRF_OPTIONS))
def test_masked_crf_cpu_second_and_third_order_pass_gradgradcheck(name):
    if "cpu" not in runnable_backends("masked_crf", "cpu", torch.float64):
        pytest.skip("no compiled CPU kernels")
    inputs, options = _crf_case(name, torch.float64, "cpu")
    probs = inputs["probs"].clone().requires_grad_()

    def loss(p):
        return ao.masked_crf_loss(p, inputs["image"], mask_dst=inputs["mask_dst"], backend="cpu", **options)

    assert torch.autograd.gradcheck(loss, (probs,))
    assert torch.autograd.gradgradcheck(loss, (probs,))

    def grad(p):
        return torch.autograd.grad(loss(p), p, create_graph=True)[0]

    assert torch.autograd.gradgradcheck(grad, (probs,))  # third order


def test_masked_crf_3d_double_backward_matches_reference():
    backend = "cpu" if "cpu" in runnable_backends("masked_crf", "cpu", torch.float64) else "triton"
    dtype = torch.float64 if backend == "cpu" else torch.float32
    inputs = make_crf_inputs(1, 3, (4, 5, 6), dtype=torch.float64, seed=4)
    logits = inputs["probs"].log().requires_grad_()

    def loss(backend_, dt):
        return lambda x: ao.masked_crf_loss(x.to(dt).softmax(1), inputs["image"].to(dt),
                                            mask_dst=inputs["mask_dst"], radius=(1, 2, 2), spacing=(2.0, 1.0, 1.0),
                                            backend=backend_)

    expected = _penalty_gradient(loss("reference", torch.float64), logits)
    got = _penalty_gradient(loss(backend, dtype), logits)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("name", list(CRF_OPTIONS))
@pytest.mark.parametrize("backend,device", CRF_FUSED, ids=[f"{b}-{d}" for b, d in CRF_FUSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_masked_crf_double_backward_matches_reference(backend, device, dtype, name):
    """A gradient penalty through softmax and the loss: the second-order gradient of the logits
    against the float64 reference's."""
    if backend not in runnable_backends("masked_crf", device, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    inputs, options = _crf_case(name, torch.float64, "cpu")
    logits = inputs["probs"].log().to(device).requires_grad_()

    def loss(backend_, dt, dev):
        mask_src = options.get("mask_src")
        opts = dict(options, **({} if mask_src is None else {"mask_src": mask_src.to(dev, dt)}))
        return lambda x: ao.masked_crf_loss(x.to(dt).softmax(1), inputs["image"].to(dev, dt),
                                            mask_dst=inputs["mask_dst"].to(dev, dt), backend=backend_, **opts)

    expected = _penalty_gradient(loss("reference", torch.float64, device), logits)
    got = _penalty_gradient(loss(backend, dtype, device), logits)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("backend,device", CRF_FUSED, ids=[f"{b}-{d}" for b, d in CRF_FUSED])
def test_masked_crf_registered_operator_double_backward(backend, device):
    """The operator's autograd formula registered with torch.library (what torch.compile and direct
    callers get) is exact to second order too, as the eager path the backends take."""
    from attenscribble_ops import _crf_ops, _crf_params

    inputs, _ = _crf_case("official", torch.float32, device)
    probs = inputs["probs"].clone().requires_grad_()
    params = _crf_params.CRFParams(radius=(2, 2), spacing=(1.0, 1.0), zero_padding=True, weights=(1.0,),
                                   sigma_xy=(6.0,), sigma_image=((0.1,),))
    op = torch.ops.attenscribble_ops.masked_crf_forward if backend != "triton" else \
        torch.ops.attenscribble_ops.masked_crf_forward_triton
    args = _crf_ops.op_arguments(probs, inputs["image"], inputs["mask_dst"], None, None, params)

    def registered(p):
        return op(p, *args[1:])[0]

    def eager(p):
        return _crf_ops.loss(op, p, inputs["image"], inputs["mask_dst"], None, None, params)

    expected = _penalty_gradient(eager, probs)
    got = _penalty_gradient(registered, probs)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def _first_and_second(loss_fn, leaves, backward_call):
    """First-order gradients without and with create_graph, and the error of a second backward."""
    plain = torch.autograd.grad(loss_fn(), leaves)
    with warnings.catch_warnings():
        # what torch says when a backward op without autograd is called under create_graph
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        graph = torch.autograd.grad(loss_fn(), leaves, create_graph=True)
        for p, g in zip(plain, graph):
            torch.testing.assert_close(g, p, rtol=0, atol=0)
        penalty = sum(g.float().square().sum() for g in graph)
        with pytest.raises(RuntimeError, match="has no second derivative.*backend='reference'"):
            backward_call(penalty)


SECOND_BACKWARDS = {
    "grad-inputs": lambda leaves: (lambda penalty: torch.autograd.grad(penalty, leaves[:1])),
    "backward": lambda leaves: (lambda penalty: penalty.backward()),
}


@pytest.mark.parametrize("how", list(SECOND_BACKWARDS))
@pytest.mark.parametrize("backend,device", ATTENTION_FUSED, ids=[f"{b}-{d}" for b, d in ATTENTION_FUSED])
def test_fused_attention_refuses_second_order(backend, device, how):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 24, 16, generator=g).to(device).requires_grad_() for _ in range(3))

    def loss():
        out, lse = ao.spatial_attention(q, k, v, backend=backend)
        return out.square().sum() + (lse * torch.linspace(-1, 1, lse.shape[-1], device=device)).sum()

    leaves = (q, k, v)
    _first_and_second(loss, leaves, SECOND_BACKWARDS[how](leaves))


@pytest.mark.parametrize("given_lse", [False, True], ids=["own-lse", "lse-of-the-attention"])
@pytest.mark.parametrize("backend,device", SIMILARITY_FUSED, ids=[f"{b}-{d}" for b, d in SIMILARITY_FUSED])
def test_fused_similarity_loss_refuses_second_order(backend, device, given_lse):
    inputs = make_similarity_inputs(2, 2, (6, 6), 16, dtype=torch.float32, device=device, seed=2)
    q, k, hw, hb = (inputs[n].clone().requires_grad_() for n in ("q", "k", "head_weight", "head_bias"))
    logits = inputs["probs"].log().requires_grad_()

    def loss():
        qq, kk, lse = q, k, None
        if given_lse:
            _, lse, qq, kk = ao.functional.spatial_attention(q, k, torch.zeros_like(q), backend=backend, tie_qk=True)
        return ao.attentive_similarity_loss(qq, kk, logits.softmax(1), hw, hb, grid=inputs["grid"], radius=2,
                                            lse=lse, backend=backend)

    leaves = (logits, q, k, hw, hb)
    _first_and_second(loss, leaves, SECOND_BACKWARDS["grad-inputs"](leaves))


@pytest.mark.parametrize("backend", ["reference"] + [b for b, d in ATTENTION_FUSED if d == "cpu"])
def test_block_and_loss_under_create_graph(backend):
    """The nn modules: a training step's first-order gradients under create_graph equal the plain
    ones; a gradient penalty through them runs on the reference and raises on a fused backend."""
    block = ao.nn.SpatialSelfAttention(16, heads=2, backend=backend)
    asl = ao.nn.AttentiveSimilarityLoss(heads=block.similarity_heads, radius=2,
                                        backend=loss_backend_for(backend))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 6, 6, generator=g, requires_grad=True)
    probs = torch.randn(2, 3, 24, 24, generator=g).softmax(1)

    def loss():
        features, similarity = block(x)
        return features.square().mean() + asl(similarity, probs)

    params = [x] + [p for p in block.parameters() if p.requires_grad]
    plain = torch.autograd.grad(loss(), params)
    graph = torch.autograd.grad(loss(), params, create_graph=True)
    for p, q in zip(plain, graph):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    penalty = graph[0].square().sum()
    if backend == "reference":
        (second,) = torch.autograd.grad(penalty, x)
        assert torch.isfinite(second).all() and second.abs().sum() > 0
    else:
        with pytest.raises(RuntimeError, match="has no second derivative"):
            torch.autograd.grad(penalty, x)


@pytest.mark.parametrize("backend,device", CRF_FUSED, ids=[f"{b}-{d}" for b, d in CRF_FUSED])
def test_masked_crf_fp16_third_order_matches_reference(backend, device):
    """Third order with fp16 probabilities, g = dL/dp, s = d|g|^2/dp = 2 H g, t = d|s|^2/dp = 8 H^3 g:
    the operator takes the fp32 gradients it is differentiated along as they are."""
    if backend not in runnable_backends("masked_crf", device, torch.float16):
        pytest.skip(f"{backend} does not take float16")
    inputs, _ = _crf_case("official", torch.float64, "cpu")

    def orders(backend_, dt):
        p = inputs["probs"].to(device, dt).requires_grad_()
        loss = ao.masked_crf_loss(p, inputs["image"].to(device, dt), mask_dst=inputs["mask_dst"].to(device, dt),
                                  radius=2, backend=backend_)
        (g,) = torch.autograd.grad(loss, p, create_graph=True)
        (s,) = torch.autograd.grad(g.float().square().sum(), p, create_graph=True)
        (t,) = torch.autograd.grad(s.float().square().sum(), p)
        return s.double(), t.double()

    s_ref, t_ref = orders("reference", torch.float64)
    s, t = orders(backend, torch.float16)
    assert t_ref.abs().max() > 0
    torch.testing.assert_close(s, s_ref, rtol=2e-2, atol=2e-2 * s_ref.abs().max().item())
    torch.testing.assert_close(t, t_ref, rtol=2e-2, atol=2e-2 * t_ref.abs().max().item())
