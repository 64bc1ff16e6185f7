"""A short demonstration of both losses: value, gradient, time and peak memory of every backend
that runs here, against the pure-PyTorch reference (the official semantics).

    python examples/quick_demo.py [--device cuda] [--full]

--full uses the official sizes (B=12, 256x256, 64x64 attention grid); the default is smaller so
that the reference finishes in seconds on a laptop CPU.
"""
import argparse

import torch

import attenscribble_ops as ao
from attenscribble_ops.testing import (device_name, make_crf_inputs, make_similarity_inputs, peak_memory,
                                       runnable_backends, time_it)


def _run(name, fn, inputs, device):
    """(loss, grads, seconds, peak bytes) of fn(**inputs) forward + backward."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}

    def step():
        for t in leaves.values():
            t.grad = None
        loss = fn(**leaves)
        loss.backward()
        return loss

    loss = step()
    grads = {k: t.grad.clone() for k, t in leaves.items()}
    seconds = time_it(step, device, warmup=0, repeat=3)
    memory = peak_memory(step, device)
    return loss.detach(), grads, seconds, memory


def _table(title, fn, inputs, op, device, ndim):
    print(f"\n{title}")
    print(f"  {'backend':<10} {'loss':>14} {'max |grad - ref|':>18} {'fwd+bwd':>10} {'peak extra':>12}")
    ref = None
    for backend in ["reference"] + [b for b in runnable_backends(op, device, torch.float32, ndim) if b != "reference"]:
        loss, grads, seconds, memory = _run(backend, lambda **kw: fn(backend=backend, **kw), inputs, device)
        if ref is None:
            ref = (loss, grads, seconds)
        err = max((grads[k] - ref[1][k]).abs().max().item() for k in grads)
        mem = "n/a" if memory is None else f"{memory / 2**20:.0f} MiB"
        speed = f" ({ref[2] / seconds:.1f}x)" if backend != "reference" else ""
        print(f"  {backend:<10} {loss.item():>14.6f} {err:>18.2e} {seconds * 1e3:>8.1f}ms {mem:>12}{speed}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="official sizes (slow for the reference on a CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(ao.explain())
    print(f"\nMeasured on: {device_name(device)}, torch {torch.__version__}")

    batch, side, grid = (12, 256, 64) if args.full else (4, 128, 32)
    crf = make_crf_inputs(batch, 4, (side, side), device=device)
    image, mask = crf.pop("image"), crf.pop("mask_dst")
    _table(f"Masked CRF loss: B={batch}, C=4, {side}x{side}, radius 5, official kernel (sigma_xy 6, sigma_img 0.1)",
           lambda probs, backend: ao.masked_crf_loss(probs, image, mask_dst=mask, backend=backend),
           crf, "masked_crf", device, 4)

    sim = make_similarity_inputs(batch, 1, (grid, grid), 64, 4, side // grid, device=device)
    g = sim.pop("grid")
    _table(f"Attentive similarity loss: B={batch}, 1 head, {grid}x{grid} grid (n={grid * grid}), D=64, radius 5",
           lambda backend, **kw: ao.attentive_similarity_loss(kw["q"], kw["k"], kw["probs"], kw["head_weight"],
                                                              kw["head_bias"], grid=g, backend=backend),
           sim, "attentive_similarity", device, 4)


if __name__ == "__main__":
    main()
