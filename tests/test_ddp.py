"""DDP with the fused losses: two processes (gloo, CPU) give the same gradients as one process that
averages the two ranks' losses (the examples' 2-process training run is tests/test_examples_distributed.py)."""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ddp_worker  # noqa: E402


def test_two_process_gradients_equal_one_process_mean(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "ddp_worker.py"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp_grads.pt")

    model = ddp_worker.build_model()
    losses = [model(ddp_worker.make_batch(rank), iteration=1)["loss"] for rank in (0, 1)]
    ((losses[0] + losses[1]) / 2).backward()
    names = [name for name, p in model.named_parameters() if p.grad is not None]
    assert any(name.startswith("asl.") for name in names)          # the loss's head mixing is trained too
    assert any("attention" in name for name in names)
    # float rounding of the two summation orders, at the scale of the model's gradients (the conv
    # biases before a batch norm have gradients of rounding size themselves)
    scale = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        if p.grad is None:
            assert ddp[name] is None or not ddp[name].abs().any(), name
            continue
        err = (ddp[name] - p.grad).abs().max().item()
        assert err <= 1e-5 * scale + 1e-4 * p.grad.abs().max().item(), f"{name}: {err:.3e} (scale {scale:.3e})"
