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


def attention_cases(backend, device):
    """The attention alone, for backends that have no similarity loss ("aten"): head dims that
    need padding (Dv != D), both gradients, fp16 on the GPU (its backward carries dLSE in two
    columns of a tensor laid out like the kernel's output)."""
    for dtype in (torch.float32, torch.float16) if device == "cuda" else (torch.float32,):
        for grid, heads, dim, dv in (((7, 9), 2, 16, 16), ((13, 5), 3, 32, 8)):
            d = make_similarity_inputs(2, heads, grid, dim, device=device)
            q, k = d["q"].to(dtype).requires_grad_(), d["k"].to(dtype).requires_grad_()
            v = torch.randn(q.shape[:3] + (dv,), device=device, dtype=dtype).requires_grad_()
            out, lse = ao.spatial_attention(q, k, v, logit_scale=0.7, backend=backend)
            (out.float().square().sum() + 1e-3 * lse.sum()).backward()


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    device = parser.parse_args(argv).device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    ran = 0
    attention_only = [b for b in runnable_backends("spatial_attention", device)
                      if b not in runnable_backends("attentive_similarity", device)]
    for op, run in (("masked_crf", crf_cases), ("attentive_similarity", similarity_cases),
                    ("spatial_attention", attention_cases)):
        for backend in runnable_backends(op, device):
            if op == "spatial_attention" and backend not in attention_only:
                continue  # run above, with the similarity loss
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
