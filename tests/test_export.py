"""Exporting a network with the attention block.

torch.onnx.export, with both of torch's exporters (the TorchScript-based one and the dynamo-based
one): "auto" takes the reference while the exporter traces (ONNX has operators for its torch ops,
none for the fused kernels), a fused backend named explicitly raises BackendUnavailableError, and
the exported graph, run by onnx's reference evaluator, gives the network's output.

torch.jit.trace (deprecated by torch in favour of torch.export, still how many deployment
pipelines save a model): under "auto" the network traces into torch's operators only (the
block's attention as aten's SDPA, whatever the grad mode, so the trace's own check passes), saves
with torch.jit.save and runs from torch.jit.load. The losses trace as the reference. A fused
backend named explicitly raises BackendUnavailableError: the trace would record its Python
autograd functions, which TorchScript cannot save."""
import copy
import io
import warnings

import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

import attenscribble_ops as ao
from attenscribble_ops.testing import make_crf_inputs, runnable_backends


class _Net(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.block = ao.nn.SpatialSelfAttention(16, heads=2, backend=backend)

    def forward(self, x):
        return self.block(self.stem(x))[0]


def _export(net, x, dynamo):
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=dynamo, input_names=["x"])
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_block_exports_to_onnx_under_auto(dynamo):
    torch.manual_seed(0)
    net = _Net("auto").eval()
    x = torch.randn(2, 3, 6, 5)
    model = _export(net, x, dynamo)
    onnx.checker.check_model(model)
    got = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = net(x)  # outside the export: the fused kernels
    assert ao.resolve("spatial_attention", x) != "reference"
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in runnable_backends("spatial_attention") if b != "reference"])
def test_export_with_a_fused_backend_named_explicitly_raises(backend):
    net = _Net(backend).eval()
    with pytest.raises(Exception, match="ONNX export .*needs backend='reference'") as info:
        _export(net, torch.randn(1, 3, 4, 4), dynamo=False)
    error = info.value
    while not isinstance(error, ao.BackendUnavailableError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, ao.BackendUnavailableError)


# --- torch.jit.trace ---------------------------------------------------------------------------

def _trace(fn, *inputs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.trace.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(fn, inputs)


def _python_calls(graph) -> list[str]:
    return [str(node) for node in graph.nodes() if node.kind() == "prim::PythonOp"]


@pytest.mark.parametrize("grad", [True, False], ids=["grad-mode", "no-grad"])
def test_block_traces_saves_and_loads_under_auto(grad):
    torch.manual_seed(0)
    net = _Net("auto").eval()
    x = torch.randn(2, 3, 6, 5)
    with torch.set_grad_enabled(grad):
        traced = _trace(net, x)  # the trace's own check re-runs it under no_grad: same graph
    graph = traced.inlined_graph
    assert _python_calls(graph) == []
    assert "aten::scaled_dot_product_attention" in str(graph)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.(save|load).*")
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    assert ao.resolve("spatial_attention", x) != "reference"
    for batch in (2, 3):
        y = torch.randn(batch, 3, 6, 5)
        with torch.no_grad():
            expected = net(y)  # outside the trace: the fused kernels
        torch.testing.assert_close(loaded(y), expected, rtol=1e-5, atol=1e-5)
    # the loaded module trains: its gradients (through aten's SDPA) are as close to the float64
    # network's as the eager fused network's are (some parameters' gradients are ill-conditioned
    # in fp32: 2.4e-3 of their largest value on this input, on every backend)
    loaded(x).square().sum().backward()
    exact = _gradients(copy.deepcopy(net).double(), x.double())
    fused = _gradients(net, x)
    for name, p in loaded.named_parameters():
        error, fused_error = ((g - exact[name]).abs().max().item() for g in (p.grad.double(), fused[name]))
        assert error <= 2 * fused_error + 1e-7 * exact[name].abs().max().item(), (name, error, fused_error)


def _gradients(net, x):
    net.zero_grad()
    net(x).square().sum().backward()
    return {name: p.grad.double() for name, p in net.named_parameters()}


@pytest.mark.parametrize("backend", [b for b in runnable_backends("spatial_attention") if b != "reference"])
def test_trace_with_a_fused_backend_named_explicitly_raises(backend):
    net = _Net(backend).eval()
    with pytest.raises(ao.BackendUnavailableError, match="TorchScript trace .*needs backend='reference'"):
        _trace(net, torch.randn(1, 3, 4, 4))


def test_losses_trace_as_the_reference():
    """The masked CRF and the similarity loss under "auto" trace into torch's operators (the
    reference) and give the fused value."""
    inputs = make_crf_inputs(2, 3, (8, 9), seed=1)

    def crf(probs, image):
        return ao.masked_crf_loss(probs, image, radius=2)

    traced = _trace(crf, inputs["probs"], inputs["image"])
    assert _python_calls(traced.inlined_graph) == []
    torch.testing.assert_close(traced(inputs["probs"], inputs["image"]), crf(inputs["probs"], inputs["image"]),
                               rtol=1e-5, atol=1e-6)
    q, k = torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    probs = torch.softmax(torch.randn(2, 3, 8, 10), 1)
    weight, bias = torch.tensor([0.4, -0.3]), torch.tensor(0.1)

    def similarity(q, k, probs):
        return ao.attentive_similarity_loss(q, k, probs, weight, bias, grid=(4, 5), radius=1)

    traced = _trace(similarity, q, k, probs)
    assert _python_calls(traced.inlined_graph) == []
    torch.testing.assert_close(traced(q, k, probs), similarity(q, k, probs), rtol=1e-5, atol=1e-6)


def test_trace_under_deterministic_algorithms_takes_the_reference():
    """With deterministic algorithms asked for, the traced attention is the reference's (torch's
    operators still, no SDPA, whose backward kernels may not be deterministic)."""
    torch.manual_seed(0)
    net = _Net("auto").eval()
    x = torch.randn(2, 3, 6, 5)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        traced = _trace(net, x)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    graph = str(traced.inlined_graph)
    assert _python_calls(traced.inlined_graph) == [] and "scaled_dot_product_attention" not in graph
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), rtol=1e-5, atol=1e-5)
