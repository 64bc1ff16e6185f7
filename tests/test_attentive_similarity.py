"""attentive_similarity_loss: every backend against the dense reference (values and all gradients),
odd grids, large radii, several heads, sample gates, gradient switches, LSE hand-over, extreme
logits, float64 gradcheck, the low-precision rule, determinism and bad inputs.

Compiled-op checks (opcheck, torch.compile, nvcc, CUDA) are in test_attentive_similarity_ops.py."""
import pytest
import torch

import attenscribble_ops as A
from attenscribble_ops.testing import make_similarity_inputs, runnable_backends

FUSED = [b for b in runnable_backends("attentive_similarity", "cpu", torch.float32) if b != "reference"]
NAMES = ("loss", "q", "k", "probs", "head_weight", "head_bias")


def _dtype_for(backend):
    """Triton computes in fp32; the compiled CPU kernels also run fp64, compared at fp64 tolerance."""
    return torch.float32 if backend == "triton" else torch.float64


def _run(inputs, backend, dtype, *, upstream=1.0, lse=None, **options):
    """Loss and the gradients of (q, k, probs, head_weight, head_bias) after loss * upstream."""
    leaves = {name: inputs[name].detach().to(dtype).requires_grad_()
              for name in ("q", "k", "probs", "head_weight", "head_bias")}
    sample_weight = options.pop("sample_weight", None)
    if sample_weight is not None:
        sample_weight = sample_weight.to(dtype)
    loss = A.attentive_similarity_loss(leaves["q"], leaves["k"], leaves["probs"], leaves["head_weight"],
                                       leaves["head_bias"], grid=inputs["grid"], sample_weight=sample_weight,
                                       lse=lse, backend=backend, **options)
    (loss * upstream).backward()
    return [loss.detach()] + [leaves[name].grad for name in NAMES[1:]]


def _assert_close(got, want, rtol, atol_scale, what=""):
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, f"{what}{name}: expected no gradient"
            continue
        assert g is not None, f"{what}{name}: missing gradient"
        atol = atol_scale * max(w.abs().max().item(), 1e-30)
        # the name before torch's own message (how many elements, how far off, where)
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol,
                                   msg=lambda text, name=name: f"{what}{name}: {text}")


def _tolerance(dtype):
    return (1e-9, 1e-10) if dtype == torch.float64 else (2e-4, 2e-5)


# (grid, heads, radius, sigma, batch, gate): odd grids, a radius larger than the grid, several heads
CASES = [
    ((7, 9), 2, 2, 2.0, 2, (1.0, 0.5)),
    ((3, 4), 3, 9, 6.0, 2, (0.0, 1.0)),
    ((13, 64), 1, 5, 6.0, 1, None),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(backend, case):
    grid, heads, radius, sigma, batch, gate = CASES[case]
    if backend == "triton" and grid == (13, 64):
        radius = 1  # the interpreter: keep the window small on the larger grid
    x = make_similarity_inputs(batch, heads, grid, 16, probs_factor=3, seed=case)
    gate = None if gate is None else torch.tensor(gate)
    dtype = _dtype_for(backend)
    upstream = float(torch.empty(()).uniform_(0.5, 3.0))
    opts = dict(radius=radius, sigma=sigma, logit_scale=1.3, sample_weight=gate, upstream=upstream)
    want = _run(x, "reference", torch.float64, **dict(opts))
    got = _run(x, backend, dtype, **dict(opts))
    rtol, atol = _tolerance(dtype)
    _assert_close(got, want, rtol, atol)


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
def test_many_heads_in_groups():
    """More heads than the CPU backward keeps accumulators for at once (groups of 8, then 1)."""
    x = make_similarity_inputs(2, 9, (4, 5), 4, seed=13)
    want = _run(x, "reference", torch.float64, radius=2, upstream=1.7)
    got = _run(x, "cpu", torch.float64, radius=2, upstream=1.7)
    _assert_close(got, want, *_tolerance(torch.float64))


@pytest.mark.parametrize("backend", FUSED)
def test_lse_handed_over_by_the_attention(backend):
    """The LSE from spatial_attention carries the dense part of dq, dk through its own backward."""
    x = make_similarity_inputs(2, 2, (5, 7), 16, seed=3)
    dtype = _dtype_for(backend)
    v = torch.randn(x["q"].shape, dtype=torch.float64)
    results = {}
    for name, be, dt in (("reference", "reference", torch.float64), ("fused", backend, dtype)):
        q, k, vv = (t.detach().to(dt).requires_grad_() for t in (x["q"], x["k"], v))
        out, lse = A.spatial_attention(q, k, vv, logit_scale=0.7, backend=be)
        loss = A.attentive_similarity_loss(q, k, x["probs"].to(dt), x["head_weight"].to(dt), x["head_bias"].to(dt),
                                           grid=x["grid"], radius=2, logit_scale=0.7, lse=lse, backend=be)
        (loss + 1e-3 * out.square().sum()).backward()
        results[name] = (loss.detach(), q.grad, k.grad, vv.grad)
    rtol, atol = _tolerance(dtype)
    for g, w in zip(results["fused"], results["reference"]):
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * w.abs().max().item())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("leaf", [False, True], ids=["detached", "leaf-requiring-grad"])
def test_lse_without_history_is_recomputed(backend, leaf):
    """A handed-over LSE without autograd history would drop the dense part of dq, dk: ignored,
    also when it is a leaf that requires grad (it is not connected to q, k)."""
    x = make_similarity_inputs(1, 1, (6, 5), 16, seed=4)
    dtype = _dtype_for(backend)
    lse = torch.logsumexp(x["q"] @ x["k"].transpose(-1, -2), -1).to(dtype).detach()
    want = _run(x, "reference", torch.float64, radius=2)
    got = _run(x, backend, dtype, radius=2, lse=lse.requires_grad_() if leaf else lse)
    rtol, atol = _tolerance(dtype)
    _assert_close(got, want, rtol, atol)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("switch", ["grad_probs", "grad_kernel"])
def test_gradient_switches(backend, switch):
    x = make_similarity_inputs(2, 2, (5, 6), 16, seed=5)
    dtype = _dtype_for(backend)
    want = _run(x, "reference", torch.float64, radius=2, **{switch: False})
    got = _run(x, backend, dtype, radius=2, **{switch: False})
    if switch == "grad_probs":
        assert got[3] is None and got[1] is not None
    else:
        assert got[1] is None and got[2] is None and got[4] is None and got[5] is None and got[3] is not None
    rtol, atol = _tolerance(dtype)
    _assert_close(got, want, rtol, atol)


def test_both_switches_off_is_an_error():
    x = make_similarity_inputs(1, 1, (4, 4), 16)
    with pytest.raises(ValueError, match="grad_probs and grad_kernel"):
        A.attentive_similarity_loss(x["q"], x["k"], x["probs"], x["head_weight"], x["head_bias"], grid=(4, 4),
                                    grad_probs=False, grad_kernel=False)


@pytest.mark.parametrize("backend", FUSED)
def test_zero_gate_gives_zero_loss_and_gradients(backend):
    x = make_similarity_inputs(2, 1, (5, 5), 16, seed=6)
    got = _run(x, backend, _dtype_for(backend), radius=2, sample_weight=torch.zeros(2))
    for value in got:
        assert torch.count_nonzero(value) == 0


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_logits(backend, sign):
    """Logits of magnitude ~1e4: the LSE never overflows; values and gradients stay finite and
    agree with the float64 reference (a near-one-hot softmax)."""
    x = make_similarity_inputs(1, 2, (4, 5), 16, seed=7)
    scale = (1e4 / (x["q"] @ x["k"].transpose(-1, -2)).abs().max()) ** 0.5
    x["q"], x["k"] = x["q"] * scale * sign, x["k"] * scale
    dtype = _dtype_for(backend)
    got = _run(x, backend, dtype, radius=3)
    for value in got:
        assert torch.isfinite(value).all()
    want = _run(x, "reference", torch.float64, radius=3)
    # fp32 logits of 1e4 carry absolute errors ~1e-3: compare the loss, which is what survives
    rtol = 1e-9 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(got[0].double(), want[0], rtol=rtol, atol=rtol)
    if dtype == torch.float64:
        # near one-hot rows: the q, k gradients are ~1e-9, so compare them at an absolute level
        for name, g, w in zip(NAMES, got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", [b for b in ["reference"] + FUSED if b != "triton"])
def test_gradcheck_float64(backend):
    x = make_similarity_inputs(2, 2, (3, 5), 4, probs_factor=1, dtype=torch.float64, seed=8)
    gate = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def fn(q, k, probs, hw, hb):
        return A.attentive_similarity_loss(q, k, probs, hw, hb, grid=(3, 5), radius=2, sigma=1.5, logit_scale=0.9,
                                           sample_weight=gate, backend=backend)

    args = tuple(x[name].clone().requires_grad_() for name in ("q", "k", "probs", "head_weight", "head_bias"))
    # the dense reference is slow under gradcheck: random-projection mode for it, the full check for kernels
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=backend == "reference")


@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_error_within_twice_the_reference(backend):
    """fp16 inputs: the kernel's error against float64 is at most twice the reference's own error
    on the same fp16 inputs (fp32 accumulation and LSE in both)."""
    x = make_similarity_inputs(2, 2, (6, 7), 16, seed=9)
    exact = _run(x, "reference", torch.float64, radius=2)
    rounded = {name: (x[name].half().double() if torch.is_tensor(x[name]) else x[name]) for name in x}
    ref = _run(rounded, "reference", torch.float16, radius=2)
    got = _run(rounded, backend, torch.float16, radius=2)
    for name, e, r, g in zip(NAMES, exact, ref, got):
        ref_err = (r.double() - e).abs().max().item()
        err = (g.double() - e).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * e.abs().max().item(), f"{name}: {err:.3g} vs reference {ref_err:.3g}"


@pytest.mark.skipif(not A.backends.why_not("attentive_similarity", "cpu", A.backends.Meta("cpu", torch.bfloat16, 4))
                    is None, reason="the cpu backend is not built")
def test_bfloat16_on_cpu():
    x = make_similarity_inputs(1, 1, (5, 6), 16, seed=10)
    exact = _run(x, "reference", torch.float64, radius=2)
    rounded = {name: (x[name].bfloat16().double() if torch.is_tensor(x[name]) else x[name]) for name in x}
    ref = _run(rounded, "reference", torch.bfloat16, radius=2)
    got = _run(rounded, "cpu", torch.bfloat16, radius=2)
    for name, e, r, g in zip(NAMES, exact, ref, got):
        assert g.dtype == (torch.float32 if name == "loss" else torch.bfloat16)
        ref_err = (r.double() - e).abs().max().item()
        err = (g.double() - e).abs().max().item()
        assert err <= 2 * ref_err + 1e-2 * e.abs().max().item(), f"{name}: {err:.3g} vs reference {ref_err:.3g}"


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic(backend):
    x = make_similarity_inputs(2, 1, (5, 5), 16, seed=11)
    first = _run(x, backend, torch.float32, radius=2)
    second = _run(x, backend, torch.float32, radius=2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    x = make_similarity_inputs(2, 2, (5, 7), 16, dtype=torch.float64, seed=12)
    want = _run(x, "reference", torch.float64, radius=2)
    for backend in FUSED:
        y = dict(x)
        y["q"] = x["q"].transpose(1, 2).contiguous().transpose(1, 2)  # heads-inner strides, as the block makes
        y["probs"] = x["probs"].transpose(2, 3).contiguous().transpose(2, 3)
        got = _run(y, backend, _dtype_for(backend), radius=2)
        rtol, atol = _tolerance(_dtype_for(backend))
        _assert_close(got, want, rtol, atol, what=f"{backend}: ")


def _call(**changes):
    x = make_similarity_inputs(2, 2, (4, 5), 16)
    args = dict(q=x["q"], k=x["k"], probs=x["probs"], head_weight=x["head_weight"], head_bias=x["head_bias"])
    kwargs = dict(grid=(4, 5))
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value
    return A.attentive_similarity_loss(*args.values(), **kwargs)


@pytest.mark.parametrize("changes, error, match", [
    (dict(q=torch.rand(2, 2, 20)), ValueError, "q must have shape"),
    (dict(k=torch.rand(2, 2, 20, 8)), ValueError, "k must have the shape of q"),
    (dict(q=torch.ones(2, 2, 20, 16, dtype=torch.int64)), TypeError, "q must be a floating-point"),
    (dict(grid=(5, 5)), ValueError, "grid"),
    (dict(grid=20), TypeError, "grid"),
    (dict(probs=torch.rand(3, 4, 8, 10)), ValueError, "probs has batch size"),
    (dict(head_weight=torch.rand(3)), ValueError, "head_weight"),
    (dict(head_bias=torch.rand(2)), TypeError, "head_bias"),
    (dict(radius=0), ValueError, "radius"),
    (dict(sigma=-1.0), ValueError, "sigma"),
    (dict(sigma=float("nan")), ValueError, "sigma"),
    (dict(logit_scale="1"), TypeError, "logit_scale"),
    (dict(sample_weight=torch.ones(3)), ValueError, "sample_weight"),
    (dict(lse=torch.zeros(2, 2, 19)), ValueError, "lse"),
    (dict(lse=torch.zeros(2, 2, 20, dtype=torch.int64)), TypeError, "lse"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(grad_probs=1), TypeError, "grad_probs"),
])
def test_bad_inputs(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
def test_compiled_op_rejects_bad_shapes_with_clear_errors():
    x = make_similarity_inputs(1, 1, (4, 5), 16, probs_factor=1)
    ops = torch.ops.attenscribble_ops
    lse = torch.zeros(1, 1, 20)
    with pytest.raises(ValueError, match="lse must be"):
        ops.attentive_similarity_forward(x["q"], x["k"], lse[:, :, :5], x["probs"], x["head_weight"],
                                         x["head_bias"], None, 2, 6.0, 1.0)
    with pytest.raises(ValueError, match="probs must be"):
        ops.attentive_similarity_forward(x["q"], x["k"], lse, torch.rand(1, 4, 4, 4), x["head_weight"],
                                         x["head_bias"], None, 2, 6.0, 1.0)
    with pytest.raises(ValueError, match="grad_rows"):
        ops.attentive_similarity_backward(torch.ones(1, 3), x["q"], x["k"], lse, x["probs"], x["head_weight"],
                                          x["head_bias"], None, 2, 6.0, 1.0)
