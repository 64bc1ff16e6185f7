"""The backend registry: explicit backends raise the exact reason, "auto" walks the order,
explain() and available_backends() report what is compiled."""
import pytest
import torch

import attenscribble_ops as ao
from attenscribble_ops import backends
from attenscribble_ops.backends import BackendUnavailableError, Meta

from attenscribble_ops.testing import make_crf_inputs


def test_reference_is_always_available():
    for op, names in ao.available_backends().items():
        assert "reference" in names, op
    for op in backends.OPS:
        assert backends.why_not(op, "reference", Meta("cpu", torch.float32, 4)) is None


def test_named_backend_on_the_wrong_device_raises_the_reason():
    d = make_crf_inputs(1, 2, (6, 6))
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ao.masked_crf_loss(d["probs"], d["image"], backend="cuda")
    reason = backends.why_not("masked_crf", "cpu", Meta("meta", torch.float32, 4))
    assert "CPU tensors" in reason or "no 'cpu' implementation" in reason


def test_auto_takes_the_first_runnable_backend_in_the_order():
    meta = Meta("cpu", torch.float32, 4)
    name, _ = backends.select("masked_crf", "auto", meta)
    order = backends.AUTO_ORDER["masked_crf"]["cpu"]
    first = next(b for b in order if backends.why_not("masked_crf", b, meta) is None)
    assert name == first


def test_auto_skips_non_deterministic_implementations_when_asked(monkeypatch):
    calls = []

    def fake(*args):
        calls.append(args)
        return torch.zeros(())

    monkeypatch.setitem(backends._REGISTRY, ("masked_crf", "cpu"), backends._Entry(fake, None, False))
    monkeypatch.delitem(backends._MODULE_ERRORS, "cpu", raising=False)
    monkeypatch.setitem(backends.AUTO_ORDER, "masked_crf", {"cpu": ("cpu", "reference")})
    meta = Meta("cpu", torch.float32, 4)
    assert backends.select("masked_crf", "auto", meta)[0] == "cpu"
    torch.use_deterministic_algorithms(True)
    try:
        assert backends.select("masked_crf", "auto", meta)[0] == "reference"
        assert "not deterministic" in ao.explain("masked_crf", meta=meta)
        assert backends.select("masked_crf", "cpu", meta)[1] is fake  # named explicitly: the user's choice
    finally:
        torch.use_deterministic_algorithms(False)


def test_explain_reports_extension_triton_and_every_op():
    text = ao.explain()
    assert "extension:" in text and "triton:" in text
    for op in backends.OPS:
        assert f"{op} on cpu/float32" in text
    one = ao.explain("masked_crf", torch.zeros(1, 2, 3, 3, 3))
    assert "masked_crf on cpu/float32/5-D" in one and "attentive_similarity" not in one
    with pytest.raises(ValueError, match="op must be one of"):
        ao.explain("nope")
    with pytest.raises(TypeError, match="example must be a tensor"):
        ao.explain("masked_crf", [1.0])
    with pytest.raises(TypeError, match="meta must be"):
        ao.explain("masked_crf", meta="cpu")


def test_register_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown op"):
        backends.register("nope", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.register("masked_crf", "metal")


def test_resolve_names_the_backend_auto_picks():
    probs = torch.rand(1, 2, 4, 4)
    name = ao.resolve("masked_crf", probs)
    assert name == backends.select("masked_crf", "auto", Meta.of(probs))[0]
    assert ao.resolve("masked_crf", probs, "reference") == "reference"
    with pytest.raises(BackendUnavailableError):
        ao.resolve("masked_crf", probs, "cuda")
    with pytest.raises(ValueError, match="op must be one of"):
        ao.resolve("crf", probs)


def test_every_triton_custom_op_launches_on_its_tensors_device():
    """Triton launches on the current device, not the tensors': every custom op of the Triton
    backend is wrapped to make its first tensor's GPU current (checked in the source, since the
    wrapper only acts on CUDA tensors)."""
    import pathlib
    import re

    root = pathlib.Path(ao.__file__).parent / "triton"
    found = 0
    for path in sorted(root.glob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"@torch\.library\.custom_op\(", line):
                found += 1
                assert lines[i + 1] == "@_target.on_tensor_device", f"{path.name}:{i + 1}: {line}"
    assert found >= 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tensors_on_the_second_gpu_while_the_first_is_current(backend):
    """Every op on cuda:1 with cuda:0 current: the same values and gradients as on the CPU."""
    if backend not in ao.available_backends()["masked_crf"]:
        pytest.skip(f"{backend} not built")
    torch.cuda.set_device(0)
    d = make_crf_inputs(2, 3, (19, 23), seed=3)
    q, k, v = (torch.randn(2, 2, 30, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    probs_grid = torch.rand(2, 3, 5, 6).softmax(1)
    hw, hb = torch.tensor([0.4, -0.3]), torch.tensor(0.2)

    def run(device, be):
        leaves = [t.to(device).requires_grad_() for t in (d["probs"], q, k, v)]
        crf = ao.masked_crf_loss(leaves[0], d["image"].to(device), mask_dst=d["mask_dst"].to(device), backend=be)
        out, lse, qt, kt = ao.spatial_attention(*leaves[1:], backend=be, tie_qk=True)
        sim = ao.attentive_similarity_loss(qt, kt, probs_grid.to(device), hw.to(device), hb.to(device),
                                           grid=(5, 6), radius=2, lse=lse, backend=be)
        (crf + sim + out.square().mean()).backward()
        torch.cuda.synchronize(1)
        return [x.detach().cpu() for x in (crf, sim, out)] + [t.grad.cpu() for t in leaves]

    want = run("cpu", "cpu" if "cpu" in ao.available_backends()["masked_crf"] else "reference")
    got = run("cuda:1", backend)
    assert torch.cuda.current_device() == 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-5)


def test_triton_refuses_slices_past_int32_offsets():
    """The Triton kernels index inside a (batch, head) slice in int32: a slice of 2**31 elements or
    more is refused with the reason (expanded tensors: nothing that large is allocated)."""
    from attenscribble_ops.testing import runnable_backends

    if "triton" not in runnable_backends("spatial_attention"):
        pytest.skip("the Triton backend does not run here")
    q = torch.zeros(1, 1, 1, 64).expand(1, 1, 2 ** 25, 64)
    with pytest.raises(BackendUnavailableError, match="int32"):
        ao.spatial_attention(q, q, q, backend="triton")
    probs = torch.zeros(1, 3, 1, 1).expand(1, 3, 2 ** 12, 2 ** 13)
    with pytest.raises(BackendUnavailableError, match="int32"):
        ao.attentive_similarity_loss(q, q, probs, torch.ones(1), torch.zeros(()), grid=(2 ** 12, 2 ** 13),
                                     backend="triton")
    small = torch.zeros(1, 1, 4096, 64)
    assert backends.why_not("spatial_attention", "triton", backends.Meta.of(small)) is None
