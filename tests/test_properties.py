"""Property-based tests: random shapes, radii, dtypes, masks and options, every runnable backend
against the reference (values and gradients). CI runs a few hundred cases; `make test-extended`
sets ATTENSCRIBBLE_HYPOTHESIS_EXAMPLES to run thousands."""
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attenscribble_ops as ao  # noqa: E402
from attenscribble_ops.testing import TOLERANCES, runnable_backends  # noqa: E402

EXAMPLES = int(os.environ.get("ATTENSCRIBBLE_HYPOTHESIS_EXAMPLES", "120"))
# The Triton interpreter costs ~1-2 ms per program: far fewer cases, smaller shapes.
TRITON_EXAMPLES = max(4, EXAMPLES // 20)
COMMON = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.data_too_large])

CRF_BACKENDS = [b for b in runnable_backends("masked_crf") if b not in ("reference", "triton")]
SIM_BACKENDS = [b for b in runnable_backends("attentive_similarity") if b not in ("reference", "triton")]


@st.composite
def crf_case(draw, small=False):
    nd = draw(st.sampled_from([2, 2, 3]))
    limit = 6 if small else (9 if nd == 2 else 5)
    shape = tuple(draw(st.integers(1, limit)) for _ in range(nd))
    radius = tuple(draw(st.integers(1, 3 if small else 4)) for _ in range(nd))
    batch = draw(st.integers(1, 2))
    classes = draw(st.integers(1, 5))
    channels = draw(st.integers(1, 3))
    factor = draw(st.sampled_from([1, 1, 2]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn((batch, classes) + shape, generator=g, dtype=torch.float64)).softmax(1)
    image = torch.rand((batch, channels) + tuple(s * factor for s in shape), generator=g, dtype=torch.float64)
    kw = dict(radius=radius if draw(st.booleans()) else radius[0],
              padding=draw(st.sampled_from(["zeros", "valid"])))
    if draw(st.booleans()):
        kernels = [(draw(st.floats(0.1, 2.0)), draw(st.sampled_from([None, 1.5, 6.0])),
                    draw(st.sampled_from([None, 0.1, 0.5])))
                   for _ in range(draw(st.integers(1, 3)))]
        kw["kernels"] = [(w, 6.0 if sxy is None and simg is None else sxy, simg) for w, sxy, simg in kernels]
    else:
        kw["sigma_xy"] = draw(st.sampled_from([1.0, 3.0, 6.0]))
        kw["sigma_image"] = draw(st.sampled_from([0.05, 0.1, 1.0]))
    for name in ("mask_dst", "mask_src"):
        if draw(st.booleans()):
            kw[name] = (torch.rand((batch, 1) + shape, generator=g) < draw(st.floats(0.0, 1.0))).double()
    if classes > 1 and draw(st.integers(0, 4)) == 0:
        compat = torch.rand(classes, classes, generator=g, dtype=torch.float64)
        compat.fill_diagonal_(0)
        kw["compatibility"] = compat
    if nd == 3 and draw(st.booleans()):
        kw["spacing"] = (draw(st.floats(0.5, 5.0)), 1.0, draw(st.floats(0.5, 2.0)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return probs.to(dtype), image.to(dtype), kw


def _crf_value_and_grad(probs, image, kw, backend):
    p = probs.clone().requires_grad_()
    loss = ao.masked_crf_loss(p, image, backend=backend, **kw)
    loss.backward()
    return loss.detach(), p.grad


def _assert_crf_matches(probs, image, kw, backend):
    atol, rtol = TOLERANCES[probs.dtype]
    want, want_grad = _crf_value_and_grad(probs.double(), image.double(), kw, "reference")
    got, got_grad = _crf_value_and_grad(probs, image, kw, backend)
    scale = max(1.0, want.abs().item())
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=rtol, atol=atol * max(1.0, want_grad.abs().max().item()))


@pytest.mark.parametrize("backend", CRF_BACKENDS)
@settings(max_examples=EXAMPLES, **COMMON)
@given(case=crf_case())
def test_masked_crf_backends_match_reference(backend, case):
    _assert_crf_matches(*case, backend)


@pytest.mark.skipif("triton" not in runnable_backends("masked_crf"), reason="no Triton masked CRF here")
@settings(max_examples=TRITON_EXAMPLES, **COMMON)
@given(case=crf_case(small=True))
def test_masked_crf_triton_matches_reference(case):
    _assert_crf_matches(*case, "triton")


@st.composite
def similarity_case(draw):
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dim = draw(st.sampled_from([4, 8, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    std = draw(st.sampled_from([0.3, 1.0, 3.0]))
    q = torch.randn(batch, heads, h * w, dim, generator=g, dtype=torch.float64) * std
    k = torch.randn(batch, heads, h * w, dim, generator=g, dtype=torch.float64) * std
    factor = draw(st.sampled_from([1, 2, 4]))
    probs = (2 * torch.randn(batch, draw(st.integers(1, 4)), h * factor, w * factor, generator=g,
                             dtype=torch.float64)).softmax(1)
    hw = torch.rand(heads, generator=g, dtype=torch.float64) * 2 - 1
    hb = torch.rand((), generator=g, dtype=torch.float64) * 2 - 1
    kw = dict(grid=(h, w), radius=draw(st.integers(1, 6)), sigma=draw(st.sampled_from([1.0, 6.0])),
              logit_scale=draw(st.sampled_from([1.0, 0.5])))
    if draw(st.booleans()):
        kw["sample_weight"] = (torch.rand(batch, generator=g) < 0.6).double()
    switch = draw(st.sampled_from(["both", "probs", "kernel"]))
    kw["grad_probs"] = switch != "kernel"
    kw["grad_kernel"] = switch != "probs"
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return [t.to(dtype) for t in (q, k, probs, hw, hb)], kw


@pytest.mark.parametrize("backend", SIM_BACKENDS)
@settings(max_examples=EXAMPLES, **COMMON)
@given(case=similarity_case())
def test_attentive_similarity_backends_match_reference(backend, case):
    _assert_similarity_matches(*case, backend)


def _assert_similarity_matches(tensors, kw, backend):
    atol, rtol = TOLERANCES[tensors[0].dtype]

    def run(ts, name):
        leaves = [t.clone().requires_grad_() for t in ts]
        loss = ao.attentive_similarity_loss(*leaves, backend=name, **kw)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return loss.detach(), grads

    want, want_grads = run([t.double() for t in tensors], "reference")
    got, got_grads = run(tensors, backend)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


ATT_BACKENDS = [b for b in runnable_backends("spatial_attention") if b not in ("reference", "triton")]


@st.composite
def attention_case(draw, small=False, large_scales=True):
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n = draw(st.integers(1, 40 if small else 150))
    dim = draw(st.sampled_from([16, 32] if small else [1, 4, 16, 24, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    std = draw(st.sampled_from([0.3, 1.0, 4.0]))
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64) * s for s in (std, std, 1.0))
    # the Triton kernels share one running maximum between the two softmaxes only for scales > 0;
    # large scales (similarity logits up to ~4e5) check that the exponents cancel as the
    # reference's do (README, Large logit scales)
    scale = draw(st.sampled_from([1.0, 0.5, 2.0] + ([-0.7, 0.0] if small else [])
                                 + ([30.0, -12.0, 1e3] if large_scales else [])))
    dtype = torch.float32 if small else draw(st.sampled_from([torch.float64, torch.float32]))
    return [t.to(dtype) for t in (q, k, v)], scale


def _assert_attention_matches(tensors, scale, backend):
    atol, rtol = TOLERANCES[tensors[0].dtype]

    def run(ts, name):
        leaves = [t.clone().requires_grad_() for t in ts]
        out, lse = ao.spatial_attention(*leaves, logit_scale=scale, backend=name)
        g = torch.Generator().manual_seed(1)
        weight_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        weight_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
        total = (out * weight_out).sum() + (lse * weight_lse).sum()
        return [out.detach(), lse.detach(), *torch.autograd.grad(total, leaves)]

    want = run([t.double() for t in tensors], "reference")
    got = run(tensors, backend)
    # In fp32 with large logits (|s q.k| in the hundreds) the problem itself is ill-conditioned:
    # the rule is then the project's low-precision one, the kernel's error at most twice the
    # reference's own error in the same dtype (both against float64), beside the fixed tolerance.
    # "aten" is torch's SDPA kernels: its LSE gradient there reached 5.0 times the reference's
    # error in the extended run (fp32, D = 64, 138 tokens, logits of a few hundred), so it gets 8.
    factor = 8 if backend == "aten" else 2
    own = run(tensors, "reference") if tensors[0].dtype != torch.float64 else want
    for a, b, r in zip(got, want, own):
        magnitude = max(1.0, b.abs().max().item())
        err = (a.double() - b).abs()
        bound = atol * magnitude + rtol * b.abs()
        if bool((err > bound).any()):
            ref_err = (r.double() - b).abs().max().item()
            assert err.max().item() <= factor * ref_err + atol * magnitude, (err.max().item(), ref_err)


@pytest.mark.parametrize("backend", ATT_BACKENDS)
@settings(max_examples=EXAMPLES, **COMMON)
@given(data=st.data())
def test_spatial_attention_backends_match_reference(backend, data):
    # "aten" (torch's SDPA) is not held to the large scales (README, Large logit scales)
    _assert_attention_matches(*data.draw(attention_case(large_scales=backend != "aten")), backend)


@st.composite
def long_attention_case(draw, large_scales=True):
    """Sequences past one key block of the CPU tiles (2048 keys): running maxima across blocks."""
    heads, n = draw(st.integers(1, 2)), draw(st.integers(2049, 2400))
    dim = draw(st.sampled_from([8, 16, 64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    std = draw(st.sampled_from([0.3, 1.0, 2.0]))
    q, k, v = (torch.randn(1, heads, n, dim, generator=g, dtype=torch.float64) * s for s in (std, std, 1.0))
    # the largest keys somewhere after the first block, or nowhere in particular
    start = draw(st.integers(0, n - 1))
    k[:, :, start:start + 64] *= draw(st.sampled_from([1.0, 3.0]))
    # large scales: the running maxima and sums rescaled across key blocks at logits of ~1e4
    scale = draw(st.sampled_from([1.0, -0.7, 2.0] + ([30.0, 1e3] if large_scales else [])))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return [t.to(dtype) for t in (q, k, v)], scale


@pytest.mark.parametrize("backend", ATT_BACKENDS)
@settings(max_examples=max(3, EXAMPLES // 20), **COMMON)
@given(data=st.data())
def test_spatial_attention_long_sequences_match_reference(backend, data):
    _assert_attention_matches(*data.draw(long_attention_case(large_scales=backend != "aten")), backend)


@pytest.mark.skipif("triton" not in runnable_backends("spatial_attention"), reason="no Triton attention here")
@settings(max_examples=TRITON_EXAMPLES, **COMMON)
@given(case=attention_case(small=True))
def test_spatial_attention_triton_matches_reference(case):
    _assert_attention_matches(*case, "triton")


@pytest.mark.skipif("triton" not in runnable_backends("attentive_similarity"), reason="no Triton similarity here")
@settings(max_examples=TRITON_EXAMPLES, **COMMON)
@given(case=similarity_case())
def test_attentive_similarity_triton_matches_reference(case):
    tensors, kw = case
    _assert_similarity_matches([t.float() for t in tensors], kw, "triton")
