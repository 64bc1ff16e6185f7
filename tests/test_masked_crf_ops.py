"""The masked CRF operators as operators: gradcheck, torch.library.opcheck, torch.compile against
eager, bitwise determinism (repeats, thread counts), bad inputs, int64 indexing."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attenscribble_ops as ops
from attenscribble_ops import _crf_ops, _crf_params, backends
from attenscribble_ops.testing import available_memory_gib
from crf_cases import Case, assert_matches_reference, loss_and_grad, make, op_arguments


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRADCHECK_CASES = [
    Case(shape=(4, 5), radius=2, masks=("dst", "src")),
    Case(shape=(4, 5), compat=True, masks=("dst",)),
    Case(shape=(2, 3, 4), radius=(1, 1, 2), padding="valid", kernels=((1.0, 2.0, 0.5), (0.5, 1.5, None))),
]


def runnable(backend, device=DEVICE):
    return backends.why_not("masked_crf", backend, backends.Meta(device, torch.float64, 4)) is None


def _backends_here():
    out = [("reference", "cpu")]
    if runnable("cpu", "cpu"):
        out.append(("cpu", "cpu"))
    if torch.cuda.is_available() and runnable("cuda", "cuda"):
        out.append(("cuda", "cuda"))
    return out


@pytest.mark.parametrize("backend,device", _backends_here(), ids=lambda v: str(v))
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c.id() for c in GRADCHECK_CASES])
def test_gradcheck(backend, device, case):
    tensors, options = make(Case(**{**case.__dict__, "batch": 1}), torch.float64, device)
    rest = {k: v for k, v in tensors.items() if k != "probs"}
    probs = tensors["probs"].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ops.masked_crf_loss(p, backend=backend, **rest, **options), (probs,))


def _op_pairs():
    pairs = []
    if runnable("cpu", "cpu"):
        pairs.append(("compiled", "cpu"))
    if torch.cuda.is_available() and runnable("cuda", "cuda"):
        pairs.append(("compiled", "cuda"))
    if runnable("triton"):
        pairs.append(("triton", DEVICE))
    return pairs


def _op(kind):
    if kind == "compiled":
        return torch.ops.attenscribble_ops.masked_crf_forward
    return torch.ops.attenscribble_ops.masked_crf_forward_triton


@pytest.mark.parametrize("kind,device", _op_pairs(), ids=lambda v: str(v))
@pytest.mark.parametrize("case", [Case(shape=(3, 4), batch=1, masks=("dst", "src")),
                                  Case(shape=(2, 3, 3), batch=1, compat=True, masks=())], ids=["2d", "3d-compat"])
def test_opcheck(kind, device, case):
    probs, image, mask_dst, mask_src, compat, params = op_arguments(case, torch.float32, device)
    for requires_grad in (True, False):
        args = _crf_ops.op_arguments(probs.detach().requires_grad_(requires_grad), image, mask_dst, mask_src, compat,
                                     params)
        assert args[-1] == requires_grad  # with_grad follows autograd
        torch.library.opcheck(_op(kind), args)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if runnable(b)] + (
    ["cuda"] if torch.cuda.is_available() and runnable("cuda", "cuda") else []))
def test_compile_fullgraph_matches_eager(backend):
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    tensors, options = make(Case(shape=(4, 6), masks=("dst", "src"), radius=2), torch.float32, device)
    rest = {k: v for k, v in tensors.items() if k != "probs"}

    def loss_fn(p):
        return ops.masked_crf_loss(p, backend=backend, **rest, **options) * 2.0

    torch._dynamo.reset()
    # the interpreter has no Inductor lowering for Triton launches on the CPU: check the graph
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager" if device == "cpu" and backend == "triton"
                             else "inductor")
    results = []
    for fn in (loss_fn, compiled):
        probs = tensors["probs"].detach().clone().requires_grad_()
        loss = fn(probs)
        loss.backward()
        results.append((loss.detach(), probs.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not runnable("cpu", "cpu"), reason="no compiled CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cpu_bitwise_deterministic_across_threads(dtype):
    tensors, options = make(Case(shape=(33, 21), classes=4, radius=3, masks=("dst", "src")), dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grad("cpu", tensors, options, 0.9)
        torch.set_num_threads(2)
        two = loss_and_grad("cpu", tensors, options, 0.9)
        again = loss_and_grad("cpu", tensors, options, 0.9)
    finally:
        torch.set_num_threads(threads)
    for a, b in ((one, two), (two, again)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.skipif(not runnable("cpu", "cpu"), reason="no compiled CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", [Case(shape=(7, 13), classes=5, radius=3, masks=("dst", "src")),
                                  Case(shape=(2, 5, 9), classes=6, compat=True, kernels=((1.0, 2.0, 0.3),) * 2)],
                         ids=["2d", "3d-compat"])
def test_cpu_baseline_instruction_set(monkeypatch, case, dtype):
    """ATTENSCRIBBLE_CPU_ISA=baseline runs the build for the baseline ISA (16-byte vectors, no
    FMA) that machines without AVX2 get."""
    monkeypatch.setenv("ATTENSCRIBBLE_CPU_ISA", "baseline")
    assert_matches_reference("cpu", case, dtype)


@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if runnable(b, "cuda" if b == "cuda" else DEVICE)
                                     and (b != "cuda" or torch.cuda.is_available())])
def test_gpu_backends_bitwise_repeatable(backend):
    device = "cuda" if backend == "cuda" else DEVICE
    tensors, options = make(Case(shape=(9, 37), classes=3, masks=("dst", "src")), torch.float32, device)
    first = loss_and_grad(backend, tensors, options, 1.1)
    second = loss_and_grad(backend, tensors, options, 1.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind,device", _op_pairs(), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_eager_autograd_matches_registered_formula(kind, device, dtype):
    """The backends' eager path (_crf_ops.loss: the operator inside a plain autograd.Function)
    gives the loss and gradient of the operator's registered autograd formula, bitwise, in probs'
    dtype, and still dispatches the operator (dispatch modes see it)."""
    probs, image, mask_dst, mask_src, compat, params = op_arguments(Case(shape=(6, 7), masks=("dst",)), dtype,
                                                                    device)
    results = []
    for path in ("registered", "eager"):
        p = probs.detach().clone().requires_grad_()
        if path == "registered":
            raw = _op(kind)(*_crf_ops.op_arguments(p, image, mask_dst, mask_src, compat, params))[0]
        else:
            with _RecordOps() as seen:
                raw = _crf_ops.loss(_op(kind), p, image, mask_dst, mask_src, compat, params)
            assert _op(kind).default.name() in seen.names
        (raw * 0.7).backward()
        assert p.grad.dtype == dtype
        results.append((raw.detach(), p.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with torch.no_grad():  # no gradient wanted: the operator alone, asked for none
        raw = _crf_ops.loss(_op(kind), probs.detach().requires_grad_(), image, mask_dst, mask_src, compat, params)
    assert raw.grad_fn is None and torch.equal(raw, results[0][0])


BAD = [
    (dict(probs=torch.rand(2, 3, 4)), ValueError, "probs"),
    (dict(probs=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "probs"),
    (dict(image=torch.rand(3, 1, 4, 4)), ValueError, "image"),
    (dict(image=torch.rand(2, 1, 6, 6)), ValueError, "image"),
    (dict(image=None), ValueError, "image"),
    (dict(mask_dst=torch.ones(2, 2, 4, 4)), ValueError, "mask_dst"),
    (dict(mask_src=torch.ones(2, 1, 5, 4)), ValueError, "mask_src"),
    (dict(radius=0), ValueError, "radius"),
    (dict(radius=(1, 2, 3)), ValueError, "radius"),
    (dict(radius=1.5), TypeError, "radius"),
    (dict(spacing=(1.0, -1.0)), ValueError, "spacing"),
    (dict(padding="reflect"), ValueError, "padding"),
    (dict(sigma_xy=0.0), ValueError, "sigma_xy"),
    (dict(kernels=[(1.0, None, None)]), ValueError, "kernels[0]"),
    (dict(compatibility=torch.ones(3, 3)), ValueError, "compatibility"),
    (dict(compatibility=torch.ones(2, 2)), ValueError, "compatibility"),
    (dict(backend="fast"), ValueError, "backend"),
]


@pytest.mark.parametrize("bad,error,name", BAD, ids=[f"{n}-{i}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_inputs_name_the_argument(bad, error, name):
    args = dict(probs=torch.rand(2, 3, 4, 4), image=torch.rand(2, 1, 4, 4), backend="auto")
    args.update(bad)
    probs = args.pop("probs")
    with pytest.raises(error, match=name.replace("[", r"\[").replace("]", r"\]")):
        ops.masked_crf_loss(probs, **args)


@pytest.mark.skipif(not runnable("cpu", "cpu"), reason="no compiled CPU kernel")
def test_operator_checks_reject_inconsistent_direct_calls():
    """Called directly (bypassing masked_crf_loss), the operators refuse what could index out of
    bounds instead of reading garbage."""
    probs, image, mask_dst, mask_src, compat, params = op_arguments(Case(masks=("dst", "src")), torch.float32)
    good = list(_crf_ops.op_arguments(probs, image, mask_dst, mask_src, compat, params))
    forward = torch.ops.attenscribble_ops.masked_crf_forward
    forward(*good)
    bad = [(1, image[..., :-1]), (2, mask_dst.double()), (3, mask_src[:1]), (5, good[5][:-1]), (6, [1]),
           (7, [1.0, 0.0]), (1, image.expand(2, 3, *image.shape[2:])), (5, [1.0, -1.0, 10.0]), (6, [1, -1]),
           (0, probs[:, :, :0])]
    for index, value in bad:
        args = list(good)
        args[index] = value
        with pytest.raises(RuntimeError):
            forward(*args)


@pytest.mark.skipif(not runnable("cpu", "cpu"), reason="no compiled CPU kernel")
def test_operator_without_gradient_refuses_backward():
    probs, image, mask_dst, mask_src, compat, params = op_arguments(Case(), torch.float32)
    args = list(_crf_ops.op_arguments(probs.requires_grad_(), image, mask_dst, mask_src, compat, params))
    args[-1] = False
    raw, grad = torch.ops.attenscribble_ops.masked_crf_forward(*args)
    assert grad.shape == (0,)
    with pytest.raises(RuntimeError, match="with_grad=False"):
        raw.backward()


def _big_backends():
    big_cpu = available_memory_gib() >= 14 or os.environ.get("ATTENSCRIBBLE_BIG_TESTS")
    params = [pytest.param("compiled", "cpu", marks=[pytest.mark.slow, pytest.mark.skipif(
        not runnable("cpu", "cpu") or not big_cpu,
        reason="needs the CPU kernel and about 13 GiB free (2^31 half-precision probabilities and their "
               "float32 gradient)")])]
    for kind, backend in (("compiled", "cuda"), ("triton", "triton")):
        params.append(pytest.param(kind, "cuda", marks=pytest.mark.skipif(
            not torch.cuda.is_available() or not runnable(backend, "cuda"), reason="needs a CUDA device")))
    return params


@pytest.mark.parametrize("kind,device", _big_backends())
def test_int64_offsets_past_2_31_elements(kind, device):
    """One plane of 2^31 + 2^15 half-precision pixels: probabilities 1 except near the end, so the
    loss and gradient come only from pixels past element 2^31, which a small crop computes. The
    operator is called directly (loss and gradient from one pass, no autograd copies)."""
    h, w, tail = 2 ** 16 + 1, 2 ** 15, 6
    probs = torch.ones(1, 1, h, w, dtype=torch.float16, device=device)
    probs[..., -3:, :] = 0.5
    probs[..., -1, -5:] = 0.25
    _assert_tail_matches_crop(kind, probs, tail)


@pytest.mark.parametrize("kind,device", [p for p in _big_backends() if p.values[1] == "cuda"])
def test_int64_class_offsets_past_2_31_elements(kind, device):
    """Three classes on a plane of 2^30 + 2^15 pixels: each class fits int32 offsets, the sample
    does not (class 2 starts past element 2^31). One-hot class 0 except near the end, where class
    2 takes over: only pixels of the last rows, at offsets past 2^31 in class 2, carry loss and
    gradient. About 18 GiB (fp16 probabilities, fp32 gradient)."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs a GPU with 24 GiB")
    h, w, tail = 2 ** 15 + 1, 2 ** 15, 6
    probs = torch.zeros(1, 3, h, w, dtype=torch.float16, device=device)
    probs[:, 0] = 1.0
    probs[:, :, -3:, :] = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float16, device=device).view(1, 3, 1, 1)
    probs[:, :, -1, -5:] = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float16, device=device).view(1, 3, 1)
    assert probs.numel() > 2 ** 31 and probs[0, 0].numel() < 2 ** 31
    _assert_tail_matches_crop(kind, probs, tail)


def _assert_tail_matches_crop(kind, probs, tail):
    h, w = probs.shape[2:]
    options = dict(radius=1, sigma_xy=1.5, sigma_image=None, padding="valid")
    params = _crf_params.canonical(nd=2, spacing=None, kernels=None, weight=1.0, channels=None, **options)
    args = _crf_ops.op_arguments(probs.requires_grad_(), None, None, None, None, params)
    raw, grad = _op(kind)(*args)
    crop = probs.detach()[..., -tail:, :].cpu().double().requires_grad_()
    ref = ops.masked_crf_loss(crop, backend="reference", **options) * (tail * w)
    ref.backward()
    torch.testing.assert_close(raw.cpu().double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad[..., -tail + 1:, :].cpu().double(), crop.grad[..., 1:, :], rtol=1e-5, atol=1e-5)
    # far from the tail every neighbour is class 0 with P = 1: dP_k0 = -2 sum_j K_kj, 0 for the others
    k = torch.exp(-0.5 * torch.tensor([1.0, 2.0], dtype=torch.float64) / 1.5 ** 2)
    interior = grad[0, :, h // 2, 1:-1].cpu().double()
    want = torch.zeros_like(interior)
    want[0] = -8 * float(k.sum())
    torch.testing.assert_close(interior, want, rtol=1e-5, atol=1e-5)


def test_options_remembered_by_value_and_type():
    """canonical() remembers plain option sets, but never lets a remembered result answer for an
    input that validation refuses (True == 1 and hash(True) == hash(1) in Python)."""
    opts = dict(nd=2, spacing=None, padding="zeros", kernels=None, weight=1.0, sigma_xy=6.0, sigma_image=0.1,
                channels=1)
    first = _crf_params.canonical(radius=1, **opts)
    assert _crf_params.canonical(radius=1, **opts) is first  # remembered
    with pytest.raises(TypeError, match="radius"):
        _crf_params.canonical(radius=True, **opts)
    with pytest.raises(TypeError, match="radius"):
        _crf_params.canonical(radius=(1, True), **opts)
    assert _crf_params.canonical(radius=[1, 1], **opts) == first  # lists: validated every time
    with pytest.raises(ValueError, match="sigma_xy"):
        _crf_params.canonical(radius=1, **dict(opts, sigma_xy=float("nan")))
