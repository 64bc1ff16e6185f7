"""Small forward + backward cases of every op on every GPU backend, for compute-sanitizer
(memcheck, racecheck). Odd shapes on purpose: tails of tiles and windows past the border.

    compute-sanitizer --tool memcheck --error-exitcode 9 python scripts/sanitize_cases.py
    python scripts/sanitize_cases.py --device cpu     # the same cases on the CPU kernels (tests do this)
"""
import sys

import torch

import attenscribble_ops as ao
from attenscribble_ops.testing import make_crf_inputs, make_similarity_inputs, runnable_backends


def crf_cases(backend, device):
    for shape, radius in (((13, 37), 5), ((5, 9, 11), (1, 2, 3)), ((3, 4), 8)):
        d = make_crf_inputs(2, 3, shape, device=device, image_factor=1)
        p = d["probs"].requires_grad_()
        loss = ao.masked_crf_loss(p, d["image"], radius=radius, mask_dst=d["mask_dst"], mask_src=d["mask_dst"],
                                  backend=backend)
        loss.backward()
        comp = ao.masked_crf_loss(p, d["image"], radius=radius, compatibility=1 - torch.eye(3), backend=backend)
        comp.backward()


def similarity_cases(backend, device):
    for grid, heads, dim in (((7, 9), 2, 16), ((13, 5), 1, 32)):
        d = make_similarity_inputs(2, heads, grid, dim, device=device)
        q, k = d["q"].requires_grad_(), d["k"].requires_grad_()
        w, b = d["head_weight"].requires_grad_(), d["head_bias"].requires_grad_()
        loss = ao.attentive_similarity_loss(q, k, d["probs"], w, b, grid=grid, radius=3, backend=backend,
                                            sample_weight=torch.tensor([1.0, 0.0], device=device))
        loss.backward()
        v = torch.randn_like(q)
        out, lse = ao.spatial_attention(q, k, v, backend=backend)
        (out.square().sum() + lse.sum()).backward()


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    device = parser.parse_args(argv).device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    ran = 0
    for op, run in (("masked_crf", crf_cases), ("attentive_similarity", similarity_cases)):
        for backend in runnable_backends(op, device):
            if backend == "reference" or (device == "cpu" and backend == "triton"):
                continue
            run(backend, device)
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"{op}/{backend}: ok", flush=True)
            ran += 1
    return 0 if ran else 3


if __name__ == "__main__":
    sys.exit(main())
