"""torch.func over every backend. Reverse mode (grad, vjp, jacrev) and vmap, per-sample gradients
included, run the fused kernels and give what autograd gives. Forward mode (jvp, jacfwd,
torch.autograd.forward_ad), which only the reference differentiates, makes "auto" take the
reference, and a fused backend named explicitly raises BackendUnavailableError: never a silently
zero tangent (what a custom operator without a forward-mode formula gives otherwise)."""
import collections
import contextlib
import warnings

import pytest
import torch
from torch import func
from torch.autograd import forward_ad

import attenscribble_ops as ao
from attenscribble_ops.testing import loss_backend_for, make_crf_inputs, make_similarity_inputs, runnable_backends

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
    """vmap's per-sample fallback warns about its speed for torch's operators without a batching
    rule (the CPU SDPA kernels of "aten", unfold_backward in the reference masked CRF); this
    package's operators have rules (_vmapped asserts it)."""
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


def _per_sample(op, backend, device, batch=2):
    """(single, per_sample): the problem's function of one sample's inputs (the similarity's head
    weight shared, not per sample) and the inputs batched over the samples."""
    f, xs = _problem(op, backend, device, batch=batch)
    shared = xs[2:] if op == "attentive_similarity" else ()
    per_sample = xs[:len(xs) - len(shared)]
    return (lambda *xs_i: f(*(x.unsqueeze(0) for x in xs_i), *shared)), per_sample


def _fallback_warnings(fn) -> list[str]:
    """The messages of vmap's per-sample fallback warning for this package's operators in ``fn``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "batching rule" in str(w.message) and "attenscribble_ops" in str(w.message)]


def _vmapped(backend, fn):
    """``fn()``, which vmaps: this package's operators must not go through torch's per-sample
    fallback (they have rules, attenscribble_ops/_vmap.py); the warnings of torch's own operators
    without one ("aten", the reference masked CRF) are quieted."""
    if backend in ("aten", "reference"):
        with _quiet_vmap_fallback():
            return fn()
    result = []
    assert _fallback_warnings(lambda: result.append(fn())) == []
    return result[0]


@pytest.mark.parametrize("op,backend,device", [(op, b, d) for op in OPS for b, d in ALL[op]],
                         ids=[f"{op}-{b}-{d}" for op in OPS for b, d in ALL[op]])
def test_per_sample_gradients(op, backend, device):
    """vmap(grad(f)) over the batch, the torch.func recipe for per-sample gradients, against one
    autograd call per sample; no operator of this package through vmap's fallback."""
    single, per_sample = _per_sample(op, backend, device)
    argnums = tuple(range(len(per_sample)))
    got = _vmapped(backend, lambda: func.vmap(func.grad(single, argnums=argnums))(*per_sample))
    for i in range(per_sample[0].shape[0]):
        expected = _autograd(single, [x[i] for x in per_sample])
        _close([g[i] for g in got], expected)


@pytest.mark.parametrize("op,backend,device", [(op, b, d) for op in OPS for b, d in ALL[op]],
                         ids=[f"{op}-{b}-{d}" for op in OPS for b, d in ALL[op]])
def test_vmap_forward_equals_loop(op, backend, device):
    single, per_sample = _per_sample(op, backend, device)
    got = _vmapped(backend, lambda: func.vmap(single)(*per_sample))
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


@pytest.mark.parametrize("op", OPS)
def test_forward_mode_over_other_transforms_takes_the_reference(op):
    """Forward mode outside grad (jvp(grad(f)), hessian = jacfwd(jacrev)) and outside vmap: the
    innermost tensors are grad's or vmap's wrappers, which hide the tangent, so the forward-mode
    transform is found among the active transforms: "auto" takes the reference, a named fused
    backend raises, and jvp(vmap(f)) runs (unpack_dual has no batching rule)."""
    f_auto, xs = _problem(op, "auto", "cpu")
    f_ref, _ = _problem(op, "reference", "cpu")
    g = torch.Generator().manual_seed(9)
    tangents = tuple(torch.randn(x.shape, generator=g, dtype=x.dtype) for x in xs)

    def hvp(fn):
        return func.jvp(func.grad(fn), (xs[0],), (tangents[0],))[1]

    first = lambda fn: (lambda x: fn(x, *xs[1:]))  # noqa: E731 - f of its first input only
    torch.testing.assert_close(hvp(first(f_auto)), hvp(first(f_ref)), rtol=0, atol=0)
    if op == "masked_crf":  # hessian of the small CRF problem (the others' are large)
        small = xs[0][:1, :, :4, :4]
        crf = lambda p: ao.masked_crf_loss(p, small[:, :1], radius=1)  # noqa: E731
        crf_ref = lambda p: ao.masked_crf_loss(p, small[:, :1], radius=1, backend="reference")  # noqa: E731
        torch.testing.assert_close(func.hessian(crf)(small), func.hessian(crf_ref)(small), rtol=0, atol=0)
    for backend, _ in FUSED[op]:
        if _ != "cpu":
            continue
        f_fused, _ = _problem(op, backend, "cpu")
        with pytest.raises(ao.BackendUnavailableError, match="forward-mode AD"):
            hvp(first(f_fused))
    batched = tuple(x[None] for x in xs)
    per_sample = func.jvp(func.vmap(f_auto), batched, tuple(t[None] for t in tangents))[1]
    torch.testing.assert_close(per_sample[0].double(), func.jvp(f_ref, xs, tangents)[1].double(), rtol=1e-5,
                               atol=1e-8)


@pytest.mark.parametrize("op", OPS)
def test_compile_over_transforms_takes_the_reference(op):
    """torch.compile(grad(f)) and torch.compile(vmap(grad(f))) under "auto": the reference (the
    fused kernels' autograd functions do not compile under the transforms), equal to eager; a
    named fused backend raises. torch.compile of f itself still takes the fused kernels."""
    torch._dynamo.reset()
    f_auto, xs = _problem(op, "auto", "cpu")
    grad_eager = func.grad(f_auto)(*xs)
    compiled = torch.compile(func.grad(f_auto), backend="aot_eager", fullgraph=True)(*xs)
    torch.testing.assert_close(compiled, grad_eager, rtol=1e-5, atol=1e-7)
    batched = tuple(x[None].expand(2, *x.shape) for x in xs)
    per_sample = torch.compile(func.vmap(func.grad(f_auto)), backend="aot_eager", fullgraph=True)(*batched)
    torch.testing.assert_close(per_sample[0], grad_eager, rtol=1e-5, atol=1e-7)
    for backend, device in FUSED[op]:
        if device != "cpu":
            continue
        f_fused, _ = _problem(op, backend, "cpu")
        torch._dynamo.reset()
        with pytest.raises(Exception, match="torch.compile over torch.func transforms"):
            torch.compile(func.grad(f_fused), backend="aot_eager", fullgraph=True)(*xs)
    torch._dynamo.reset()


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


def _block_loss_and_inputs(backend, batch):
    """The block (dim 16, 2 heads, on a 4 x 5 grid) and its similarity loss (radius 1), seeded, with
    features and 3-class probabilities for `batch` samples."""
    torch.manual_seed(0)
    block = ao.nn.SpatialSelfAttention(16, heads=2, backend=backend).eval()
    loss_fn = ao.nn.AttentiveSimilarityLoss(heads=block.similarity_heads, radius=1,
                                            backend=loss_backend_for(backend))
    return block, loss_fn, torch.randn(batch, 16, 4, 5), torch.softmax(torch.randn(batch, 3, 8, 10), 1)


@pytest.mark.parametrize("backend", [b for b in runnable_backends("spatial_attention", "cpu")])
def test_block_and_loss_parameter_gradients_with_functional_call(backend):
    """The block and the loss as torch.func uses a model: func.grad over the parameters of
    functional_call (the tied q, k path of the fused attention), against autograd."""
    block, loss_fn, x, probs = _block_loss_and_inputs(backend, 2)
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


# --- vmap rules of the operators (attenscribble_ops/_vmap.py) -------------------------------------

KERNEL_OPS = {op: [(b, d) for b, d in FUSED[op] if b != "aten"] for op in OPS}  # "aten": torch's SDPA ops


def _op_calls(fn) -> collections.Counter:
    """How often each operator of this package ran inside ``fn`` (profiler events)."""
    with torch.profiler.profile() as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("attenscribble_ops::"))


@pytest.mark.parametrize("backend,device", KERNEL_OPS["spatial_attention"], ids=_ids(KERNEL_OPS["spatial_attention"]))
def test_vmap_runs_the_attention_once_for_all_samples(backend, device):
    """The attention operators fold the vmapped dimension into their batch: per-sample gradients
    over 5 samples run the forward and the backward operator once each, not 5 times."""
    single, per_sample = _per_sample("spatial_attention", backend, device, batch=5)
    calls = _op_calls(lambda: func.vmap(func.grad(single, argnums=(0, 1, 2)))(*per_sample))
    suffix = "_triton" if backend == "triton" else ""
    for name in ("forward", "backward"):
        count = calls[f"attenscribble_ops::spatial_attention_{name}{suffix}"]
        assert 1 <= count < 5, calls  # the vmapped call (and, in this profiler, the kernel's) vs 1 + 5 without


@pytest.mark.parametrize("backend,device", KERNEL_OPS["spatial_attention"], ids=_ids(KERNEL_OPS["spatial_attention"]))
def test_vmap_attention_in_dims_and_nesting(backend, device):
    """The fold rule takes a vmapped dimension anywhere, arguments that are not vmapped, and
    nested vmaps: against a loop over the samples."""
    g = torch.Generator().manual_seed(12)
    shape = (2, 2, 12, 8)  # (B, heads, n, D) of one sample

    def rand(*lead):
        return torch.randn(*lead, *shape, generator=g).to(device)

    def attention(q, k, v):
        out, lse = ao.spatial_attention(q, k, v, logit_scale=0.6, backend=backend)
        return out, lse

    q, k, v = rand(3).movedim(0, 2), rand(), rand(3)  # q vmapped at dim 2, k shared, v at dim 0
    got = func.vmap(attention, in_dims=(2, None, 0))(q, k, v)
    expected = [attention(q.select(2, i), k, v[i]) for i in range(3)]
    for j in range(2):
        torch.testing.assert_close(got[j], torch.stack([e[j] for e in expected]), rtol=1e-5, atol=1e-6)

    q2, k2 = rand(4), rand(3)  # vmap over q's samples inside a vmap over k's
    nested = func.vmap(func.vmap(attention, in_dims=(0, None, None)), in_dims=(None, 0, None))(q2, k2, v[0])
    assert nested[0].shape == (3, 4) + shape
    for i in range(3):
        for j in range(4):
            out, lse = attention(q2[j], k2[i], v[0])
            torch.testing.assert_close(nested[0][i, j], out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(nested[1][i, j], lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", KERNEL_OPS["attentive_similarity"],
                         ids=_ids(KERNEL_OPS["attentive_similarity"]))
@pytest.mark.parametrize("with_lse", [False, True], ids=["own-lse", "given-lse"])
def test_vmap_similarity_per_sample_head_weights(backend, device, with_lse):
    """Per-sample gradients of the loss in q, k and a per-sample head weight (the fold rule's loop
    path, and the looped backward), with and without a given LSE: against autograd per sample."""
    s = make_similarity_inputs(3, heads=2, grid=(4, 5), dim=8, device=device, seed=13)
    g = torch.Generator().manual_seed(14)
    head_weights = torch.randn(3, 2, generator=g).to(device)
    sample_weight = torch.tensor([1.0, 0.0, 0.5], device=device)

    def single(q, k, head_weight, gate):
        lse = None
        if with_lse:  # the attention's similarity LSE, as the block hands it over
            lse = ao.spatial_attention(q[None], k[None], k[None], logit_scale=0.5, backend=backend)[1]
        return ao.attentive_similarity_loss(q[None], k[None], s["probs"][:1], head_weight, s["head_bias"],
                                            grid=(4, 5), radius=1, lse=lse, logit_scale=0.5,
                                            sample_weight=gate[None], backend=backend)

    per_sample = (s["q"], s["k"], head_weights, sample_weight)
    grads = []
    assert _fallback_warnings(
        lambda: grads.append(func.vmap(func.grad(single, argnums=(0, 1, 2)))(*per_sample))) == []
    for i in range(3):
        _close([gr[i] for gr in grads[0]], _autograd(lambda q, k, w: single(q, k, w, sample_weight[i]),
                                                      [x[i] for x in per_sample[:3]]))


@pytest.mark.parametrize("backend,device", KERNEL_OPS["masked_crf"], ids=_ids(KERNEL_OPS["masked_crf"]))
def test_vmap_masked_crf_per_sample_images_and_masks(backend, device):
    """vmap over the probabilities, the image and the destination mask (the mask's clean-up runs
    on the batched tensor; the loss loops, being a sum over the batch): against a loop."""
    inputs = make_crf_inputs(4, 3, (8, 9), device=device, seed=15)

    def single(probs, image, mask):
        return ao.masked_crf_loss(probs[None], image[None], mask_dst=mask[None], radius=2, backend=backend)

    xs = (inputs["probs"], inputs["image"], inputs["mask_dst"].float())
    got = []
    assert _fallback_warnings(lambda: got.append(func.vmap(func.grad(single), in_dims=(0, 0, 0))(*xs))) == []
    for i in range(4):
        torch.testing.assert_close(got[0][i], _autograd(lambda p: single(p, xs[1][i], xs[2][i]), [xs[0][i]])[0],
                                   rtol=1e-6, atol=1e-7)
    values = func.vmap(single)(*xs)
    torch.testing.assert_close(values, torch.stack([single(*(x[i] for x in xs)) for i in range(4)]))


@pytest.mark.parametrize("backend", [b for b in runnable_backends("spatial_attention", "cpu")])
def test_vmap_per_sample_gradients_of_the_block_and_loss(backend):
    """Per-sample gradients of the block's parameters under the method's losses, vmap(grad) over
    functional_call: the block's tied q, k path, whose backward adds the attention's dq, dk into
    the loss's (under torch.func through the plain backward operator: vmap cannot batch an
    operator that writes into its arguments). Against autograd, one sample at a time."""
    block, loss_fn, x, probs = _block_loss_and_inputs(backend, 3)
    params = {k: v.detach() for k, v in block.named_parameters()}

    def per_sample(params, x_i, probs_i):
        feats, sim = func.functional_call(block, params, (x_i[None],))
        return loss_fn(sim, probs_i[None]) + feats.square().mean()

    with _quiet_vmap_fallback():  # "aten": torch's CPU SDPA operators have no batching rule
        got = func.vmap(func.grad(per_sample), in_dims=(None, 0, 0))(params, x, probs)
    for i in range(3):
        block.zero_grad()
        feats, sim = block(x[i:i + 1])
        (loss_fn(sim, probs[i:i + 1]) + feats.square().mean()).backward()
        for name, p in block.named_parameters():
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-5, atol=1e-7)


NOT_ATEN = [(b, d) for b, d in ALL["spatial_attention"] if b != "aten"]


@pytest.mark.parametrize("backend,device", NOT_ATEN, ids=_ids(NOT_ATEN))
def test_vmap_over_no_samples(backend, device):
    """vmap over a dimension of size 0 gives empty outputs and gradients, as the reference does
    (the kernels themselves take no empty batch). Not "aten": torch's fallback for its SDPA
    operators refuses size 0."""
    q = torch.randn(0, 1, 2, 12, 8, device=device)

    def f(q):
        return ao.spatial_attention(q, q, q, logit_scale=0.5, backend=backend)

    with _quiet_vmap_fallback():
        out, lse = func.vmap(f)(q)
        grad = func.vmap(func.grad(lambda q: f(q)[0].sum() + f(q)[1].sum()))(q)
    assert out.shape == q.shape and lse.shape == q.shape[:4] and grad.shape == q.shape
