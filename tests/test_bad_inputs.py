"""Every bad input gets a ValueError or TypeError that names the argument (the README's table is
this list). Meta tensors stand in for "another device"."""
import importlib.util
import math
import os

import pytest
import torch

from attenscribble_ops import attentive_similarity_loss, masked_crf_loss, spatial_attention

P = torch.rand(2, 3, 8, 8).softmax(1)
IMG = torch.rand(2, 1, 8, 8)
META = torch.empty(2, 3, 8, 8, device="meta")

CRF_CASES = [
    ("probs as a list", dict(probs=[[1.0]]), TypeError, "probs"),
    ("integer probs", dict(probs=torch.ones(2, 3, 8, 8, dtype=torch.int64)), TypeError, "probs"),
    ("complex probs", dict(probs=torch.ones(2, 3, 8, 8, dtype=torch.complex64)), TypeError, "probs"),
    ("float8 probs", dict(probs=P.to(torch.float8_e4m3fn)), TypeError, "probs must be a floating-point"),
    ("3-D probs", dict(probs=torch.rand(3, 8, 8)), ValueError, "probs"),
    ("batch of size 0", dict(probs=torch.rand(0, 3, 8, 8), image=torch.rand(0, 1, 8, 8)), ValueError, "probs"),
    ("image batch differs", dict(image=torch.rand(1, 1, 8, 8)), ValueError, "image"),
    ("image not an integer multiple", dict(image=torch.rand(2, 1, 12, 12)), ValueError, "image"),
    ("image smaller than probs", dict(image=torch.rand(2, 1, 4, 4)), ValueError, "image"),
    ("integer image", dict(image=torch.ones(2, 1, 8, 8, dtype=torch.uint8)), TypeError, "image"),
    ("image ndim differs", dict(image=torch.rand(2, 1, 2, 8, 8)), ValueError, "image"),
    ("image on another device", dict(image=torch.empty(2, 1, 8, 8, device="meta")), ValueError, "image"),
    ("image None but used", dict(image=None), ValueError, "image"),
    ("radius 0", dict(radius=0), ValueError, "radius"),
    ("negative radius", dict(radius=-2), ValueError, "radius"),
    ("float radius", dict(radius=1.5), TypeError, "radius"),
    ("bool radius", dict(radius=True), TypeError, "radius"),
    ("radius tuple of wrong length", dict(radius=(1, 2, 3)), ValueError, "radius"),
    ("radius past 2**15", dict(radius=(1 << 15) + 1), ValueError, "radius"),
    ("sigma so small that 1/sigma overflows", dict(sigma_xy=1e-320), ValueError, "sigma_xy is too small"),
    ("sigma_xy 0", dict(sigma_xy=0.0), ValueError, "sigma_xy"),
    ("negative sigma_image", dict(sigma_image=-0.1), ValueError, "sigma_image"),
    ("NaN sigma_image", dict(sigma_image=math.nan), ValueError, "sigma_image"),
    ("infinite weight", dict(weight=math.inf), ValueError, "weight"),
    ("sigma as a tensor", dict(sigma_xy=torch.tensor(6.0)), TypeError, "sigma_xy"),
    ("no feature at all", dict(sigma_xy=None, sigma_image=None), ValueError, "neither sigma_xy nor sigma_image"),
    ("empty kernels", dict(kernels=[]), TypeError, "kernels"),
    ("kernels as one dict", dict(kernels={"weight": 1, "xy": 6}), TypeError, "kernels"),
    ("descriptor without weight", dict(kernels=[{"xy": 6}]), ValueError, r"kernels\[0\]"),
    ("descriptor with bad sigma", dict(kernels=[(1.0, -6.0, None)]), ValueError, r"kernels\[0\].sigma_xy"),
    ("per-channel sigmas of wrong length", dict(kernels=[(1.0, 6.0, (0.1, 0.2))]), ValueError, "channels"),
    ("mask batch differs", dict(mask_dst=torch.ones(1, 1, 8, 8)), ValueError, "mask_dst"),
    ("mask with 2 channels", dict(mask_src=torch.ones(2, 2, 8, 8)), ValueError, "mask_src"),
    ("complex mask", dict(mask_dst=torch.ones(2, 1, 8, 8, dtype=torch.complex64)), TypeError, "mask_dst"),
    ("float8 mask", dict(mask_dst=torch.ones(2, 1, 8, 8, dtype=torch.float8_e5m2)), TypeError, "mask_dst"),
    ("mask not a tensor", dict(mask_dst=[[1.0]]), TypeError, "mask_dst"),
    ("mask not an integer multiple", dict(mask_dst=torch.ones(2, 1, 12, 12)), ValueError, "mask_dst"),
    ("mask on another device", dict(mask_dst=torch.empty(2, 1, 8, 8, device="meta")), ValueError, "mask_dst"),
    ("compatibility of wrong shape", dict(compatibility=torch.ones(2, 2)), ValueError, "compatibility"),
    ("compatibility with a diagonal", dict(compatibility=torch.ones(3, 3)), ValueError, "diagonal"),
    ("negative compatibility", dict(compatibility=-(1 - torch.eye(3))), ValueError, "negative"),
    ("complex compatibility", dict(compatibility=torch.ones(3, 3, dtype=torch.complex64)), TypeError,
     "compatibility"),
    ("compatibility on meta", dict(compatibility=torch.empty(3, 3, device="meta")), ValueError,
     "compatibility is on meta"),
    ("unknown padding", dict(padding="reflect"), ValueError, "padding"),
    ("sigma past float64 as a Python int", dict(sigma_xy=10 ** 400), ValueError, "sigma_xy must be finite"),
    ("sigma_xy too small for float32 probs", dict(sigma_xy=1e-20), ValueError, "sigma_xy = 1e-20 is out of range"),
    ("sigma_image too large for float32 probs", dict(sigma_image=1e20), ValueError, "sigma_image = 1e.20 is out"),
    ("sigma too small for float64 probs", dict(probs=P.double(), image=IMG.double(), sigma_image=1e-160), ValueError,
     "sigma_image = 1e-160 is out of range for float64"),
    ("spacing too small for float32 probs", dict(spacing=(1e-20, 1.0)), ValueError, r"spacing\[0\] = 1e-20"),
    ("window reach too large for float32 probs", dict(spacing=(5e18, 5e18)), ValueError, "farthest offset"),
    ("non-positive spacing", dict(spacing=(1.0, 0.0)), ValueError, r"spacing\[1\]"),
    ("spacing of wrong length", dict(spacing=(1.0, 1.0, 1.0)), ValueError, "spacing"),
    ("unknown backend", dict(backend="gpu"), ValueError, "backend"),
]


def call_crf(kwargs):
    kwargs = dict(kwargs)
    probs = kwargs.pop("probs", P)
    image = kwargs.pop("image", IMG)
    return masked_crf_loss(probs, image, **kwargs)


@pytest.mark.parametrize("case,kwargs,error,match", CRF_CASES, ids=[c[0] for c in CRF_CASES])
def test_masked_crf_bad_inputs(case, kwargs, error, match):
    with pytest.raises(error, match=match):
        call_crf(kwargs)


Q = torch.randn(2, 1, 16, 8)
SIM = dict(q=Q, k=torch.randn(2, 1, 16, 8), probs=torch.rand(2, 3, 16, 16).softmax(1),
           head_weight=torch.randn(1), head_bias=torch.randn(()))

SIM_CASES = [
    ("3-D q", dict(q=torch.randn(2, 16, 8)), ValueError, "q"),
    ("integer q", dict(q=torch.ones(2, 1, 16, 8, dtype=torch.int32)), TypeError, "q"),
    ("float8 q and k", dict(q=torch.ones(2, 1, 16, 8, dtype=torch.float8_e4m3fn),
                            k=torch.ones(2, 1, 16, 8, dtype=torch.float8_e4m3fn)), TypeError, "q must be a floating"),
    ("k shape differs", dict(k=torch.randn(2, 1, 16, 4)), ValueError, "k must have the shape"),
    ("k dtype differs", dict(k=torch.randn(2, 1, 16, 8, dtype=torch.float64)), TypeError, "k must have the dtype"),
    ("k on another device", dict(k=torch.empty(2, 1, 16, 8, device="meta")), ValueError, "k is on"),
    ("grid does not match q", dict(grid=(4, 5)), ValueError, "grid"),
    ("grid not a pair", dict(grid=16), TypeError, "grid"),
    ("grid of zero", dict(grid=(0, 16)), ValueError, r"grid\[0\]"),
    ("probs batch differs", dict(probs=torch.rand(1, 3, 16, 16)), ValueError, "probs"),
    ("probs 3-D", dict(probs=torch.rand(3, 16, 16)), ValueError, "probs"),
    ("integer probs", dict(probs=torch.ones(2, 3, 4, 4, dtype=torch.long)), TypeError, "probs"),
    ("head_weight does not match heads", dict(head_weight=torch.randn(2)), ValueError, "head_weight"),
    ("head_weight integer", dict(head_weight=torch.ones(1, dtype=torch.long)), TypeError, "head_weight"),
    ("head_bias not a scalar", dict(head_bias=torch.randn(2)), TypeError, "head_bias"),
    ("head_bias a float", dict(head_bias=0.5), TypeError, "head_bias"),
    ("radius 0", dict(radius=0), ValueError, "radius"),
    ("radius past 2**15", dict(radius=(1 << 15) + 1), ValueError, "radius must be <= 32768"),
    ("sigma 0", dict(sigma=0.0), ValueError, "sigma"),
    ("sigma so small that sigma**2 underflows", dict(sigma=1e-200), ValueError, "sigma must be between"),
    ("sigma so large that sigma**2 overflows", dict(sigma=1e200), ValueError, "sigma must be between"),
    ("logit_scale past float64 as a Python int", dict(logit_scale=10 ** 400), ValueError,
     "logit_scale must be finite"),
    ("infinite logit_scale", dict(logit_scale=math.inf), ValueError, "logit_scale"),
    ("sample_weight of wrong shape", dict(sample_weight=torch.ones(3)), ValueError, "sample_weight"),
    ("complex sample_weight", dict(sample_weight=torch.ones(2, dtype=torch.complex64)), TypeError, "sample_weight"),
    ("grad flag not a bool", dict(grad_probs=1), TypeError, "grad_probs"),
    ("both gradients off", dict(grad_probs=False, grad_kernel=False), ValueError, "grad_probs and grad_kernel"),
    ("lse of wrong shape", dict(lse=torch.zeros(2, 16)), ValueError, "lse"),
    ("integer lse", dict(lse=torch.zeros(2, 1, 16, dtype=torch.long)), TypeError, "lse"),
    ("float8 head_bias", dict(head_bias=torch.zeros((), dtype=torch.float8_e5m2)), TypeError, "head_bias"),
    ("lse on another device", dict(lse=torch.empty(2, 1, 16, device="meta")), ValueError, "lse"),
    ("batch of size 0", dict(q=torch.randn(0, 1, 16, 8), k=torch.randn(0, 1, 16, 8),
                             probs=torch.rand(0, 3, 16, 16)), ValueError, "q"),
    ("unknown backend", dict(backend="fast"), ValueError, "backend"),
]


def call_similarity(kwargs):
    args = dict(SIM, grid=(4, 4))
    args.update(kwargs)
    return attentive_similarity_loss(args.pop("q"), args.pop("k"), args.pop("probs"), args.pop("head_weight"),
                                     args.pop("head_bias"), **args)


@pytest.mark.parametrize("case,kwargs,error,match", SIM_CASES, ids=[c[0] for c in SIM_CASES])
def test_attentive_similarity_bad_inputs(case, kwargs, error, match):
    with pytest.raises(error, match=match):
        call_similarity(kwargs)


QA = torch.randn(1, 2, 5, 4)
ATTENTION_CASES = [
    ("v of another length", dict(v=torch.randn(1, 2, 6, 4)), ValueError, "v must have shape"),
    ("v of another dtype", dict(v=QA.double()), TypeError, "v must have the dtype"),
    ("v missing", dict(v=None), TypeError, "v must be a torch.Tensor"),
    ("3-D q", dict(q=torch.randn(2, 5, 4)), ValueError, "q"),
    ("k head dim differs", dict(k=torch.randn(1, 2, 5, 8)), ValueError, "k"),
    ("integer q", dict(q=torch.ones(1, 2, 5, 4, dtype=torch.long)), TypeError, "q"),
    ("float8 q, k, v", dict(q=QA.to(torch.float8_e4m3fn), k=QA.to(torch.float8_e4m3fn),
                            v=QA.to(torch.float8_e4m3fn)), TypeError, "q must be a floating"),
    ("v on another device", dict(v=torch.empty(1, 2, 5, 4, device="meta")), ValueError, "v"),
    ("infinite logit_scale", dict(logit_scale=math.inf), ValueError, "logit_scale"),
    ("tie_qk not a bool", dict(tie_qk="yes"), TypeError, "tie_qk"),
    ("return_lse not a bool", dict(return_lse=1), TypeError, "return_lse"),
    ("tie_qk without the LSE", dict(tie_qk=True, return_lse=False), ValueError, "needs return_lse=True"),
    ("unknown backend", dict(backend="flash"), ValueError, "backend"),
]


def call_attention(kwargs):
    args = dict(q=QA, k=QA, v=QA)
    args.update(kwargs)
    return spatial_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("case,kwargs,error,match", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_spatial_attention_bad_inputs(case, kwargs, error, match):
    with pytest.raises(error, match=match):
        call_attention(kwargs)


# The README's table (scripts/bad_inputs_table.py runs these and writes the errors they get).
TABLES = [("masked_crf_loss", CRF_CASES, call_crf), ("attentive_similarity_loss", SIM_CASES, call_similarity),
          ("spatial_attention", ATTENTION_CASES, call_attention)]


def test_readme_table_is_current():
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "bad_inputs_table.py")
    spec = importlib.util.spec_from_file_location("bad_inputs_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run python scripts/bad_inputs_table.py"


def test_nan_inputs_propagate():
    """NaN in probs or image is not rejected (that would need a host sync): it propagates. An
    infinite image value makes every kernel entry of that pixel exp(-inf) = 0 (it is disconnected)."""
    probs = P.clone()
    probs[0, 0, 0, 0] = float("nan")
    assert torch.isnan(masked_crf_loss(probs, IMG))
    image = IMG.clone()
    image[1, 0, 3, 3] = float("nan")
    assert torch.isnan(masked_crf_loss(P, image))
    image[1, 0, 3, 3] = float("inf")
    disconnected = masked_crf_loss(P, image)
    assert torch.isfinite(disconnected)
    image[1, 0, 3, 3] = 1e6  # finite but as far: exp underflows to 0 for the same entries
    assert torch.equal(disconnected, masked_crf_loss(P, image))
    q = SIM["q"].clone()
    q[0, 0, 0, 0] = float("nan")
    assert torch.isnan(attentive_similarity_loss(q, SIM["k"], SIM["probs"], SIM["head_weight"], SIM["head_bias"],
                                                 grid=(4, 4)))


def _direct_op_calls():
    """(operator name, arguments) of direct operator calls, all on the CPU; the Triton operators
    where the Triton backend runs here (the interpreter)."""
    q, k, v = (torch.randn(1, 1, 6, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    lse = torch.randn(1, 1, 6)
    sim = (q, k, lse, torch.rand(1, 2, 2, 3), torch.ones(1), torch.zeros(()), torch.ones(1), 1, 2.0, 1.0)
    crf = (torch.rand(1, 2, 4, 4), None, torch.ones(1, 1, 4, 4), None, None, [1.0, 0.2], [1, 1], [1.0, 1.0],
           True, True)
    calls = [("masked_crf_forward", crf), ("spatial_attention_forward", (q, k, v, 1.0)),
             ("spatial_attention_lse", (q, k, 1.0)), ("attentive_similarity_forward", sim)]
    from attenscribble_ops.testing import runnable_backends

    if "triton" in runnable_backends("spatial_attention"):
        calls += [("masked_crf_forward_triton", crf), ("spatial_attention_forward_triton", (q, k, v, 1.0)),
                  ("spatial_attention_lse_triton", (q, k, 1.0)), ("attentive_similarity_forward_triton", sim)]
    return calls


@pytest.mark.parametrize("name,args", _direct_op_calls(), ids=[c[0] for c in _direct_op_calls()])
def test_direct_operator_call_mixing_a_meta_tensor(name, args):
    """A direct torch.ops call with one tensor on meta and the rest on the CPU is dispatched to the
    fake kernel (Meta wins the dispatch): it raises, naming the argument, instead of returning
    uninitialised tensors."""
    op = getattr(torch.ops.attenscribble_ops, name)
    op(*args)  # valid as given
    for i, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor) or i == 0:
            continue
        mixed = list(args)
        mixed[i] = arg.to("meta")
        with pytest.raises(ValueError, match="is on meta but .* is on cpu"):
            op(*mixed)
