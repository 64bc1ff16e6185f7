"""Importing the package never fails for lack of the extension or of Triton: it falls back to the
reference and explains why (run in a subprocess where both imports are blocked)."""
import subprocess
import sys
import textwrap


def test_import_without_extension_and_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules["attenscribble_ops._C"] = None   # makes `from . import _C` raise ImportError
        sys.modules["triton"] = None
        import torch
        import attenscribble_ops as ao
        probs = torch.rand(1, 2, 6, 6).softmax(1)
        loss = ao.masked_crf_loss(probs, torch.rand(1, 1, 6, 6))
        assert torch.isfinite(loss)
        text = ao.explain()
        assert "extension: not loaded" in text and "_C could not be imported" in text, text
        assert "triton: unavailable" in text, text
        assert ao.available_backends()["masked_crf"] == ["reference"]
        for name in ("cpu", "triton"):
            try:
                ao.masked_crf_loss(probs, torch.rand(1, 1, 6, 6), backend=name)
            except ao.BackendUnavailableError as exc:
                assert ("could not be imported" if name == "cpu" else "triton is not importable") in str(exc)
            else:
                raise AssertionError(name + " should not run")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
