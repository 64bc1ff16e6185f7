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
