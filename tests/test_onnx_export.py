"""torch.onnx.export of a network with the attention block, with both of torch's exporters (the
TorchScript-based one and the dynamo-based one): "auto" takes the reference while the exporter
traces (ONNX has operators for its torch ops, none for the fused kernels), a fused backend named
explicitly raises BackendUnavailableError, and the exported graph, run by onnx's reference
evaluator, gives the network's output."""
import io

import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

import attenscribble_ops as ao
from attenscribble_ops.testing import runnable_backends


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
