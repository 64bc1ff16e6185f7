"""The number users feel: one training step of the example U-Net + spatial self-attention at the
official size (B = 12, 256 x 256, fp32, 4 classes; the block at the third encoder stage, a 64 x 64
grid; SGD step included), with the reference losses and block against the fused ones.

Providers (what the step contains; "reference" = backend "reference" for the block and both losses,
the official semantics; "fused" = backend "auto", the fastest measured backend of the device):

  unet+pce                 plain U-Net, partial cross-entropy on the scribbles
  +attention-reference     the attention block added (dense)            + pCE
  +crf-reference           the block and the masked CRF loss            + pCE
  method-reference         the block, the masked CRF and the attentive similarity loss (AttenScribble)
  +attention-fused, +crf-fused, method-fused   the same with the fused kernels
  +attention-aten, method-aten                 the block's attention through torch's fused SDPA
                                               kernels (backend "aten"), the losses fused
  method-triton, method-cuda                   the block and both losses on that one backend

Cases: the official size in fp32; on a GPU also
  matmul=tf32  torch's fp32 matmuls allowed to use TF32 (``torch.backends.cuda.matmul.fp32_precision
               = "tf32"``, which ``torch.set_float32_matmul_precision("high")`` also sets); the
               U-Net's convolutions use TF32 in every case (cuDNN's default). The Triton attention
               then multiplies in TF32 instead of tf32x3.
  amp=fp16     the example's ``--amp`` on CUDA: the forward under ``torch.autocast`` in fp16, the
               loss scaled by a GradScaler (scale, backward, ``scaler.step``, ``scaler.update``),
               whose scale is settled by 20 untimed steps first.

Mode "full" only: forward, backward and ``optimizer.step()`` (SGD, momentum 0.9, weight decay 1e-4,
as the official run). The batch is a synthetic cardiac phantom with synthesised scribbles
(examples/scribseg), built once per case.

    python -m benchmarks --suite train_step [--quick] [--device cuda]
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch

from attenscribble_ops.testing import cuda_matmul_fp32

from .common import Suite, Unavailable, Workload

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

STAGES = {"unet+pce": (False, 0.0, 0.0), "+attention": (True, 0.0, 0.0), "+crf": (True, 0.1, 0.0),
          "method": (True, 0.1, 0.1)}
_SCALER_SETTLING_STEPS = 20  # amp=fp16: steps run before timing (see build)
PROVIDERS = ("unet+pce", "+attention-reference", "+crf-reference", "method-reference", "+attention-fused",
             "+crf-fused", "method-fused", "+attention-aten", "method-aten", "method-triton", "method-cuda")


def _scribseg():
    if _EXAMPLES not in sys.path:
        sys.path.insert(0, _EXAMPLES)
    try:
        import scribseg  # noqa: F401
        from scribseg import objective, phantom, scribbles, slices
    except ImportError as exc:  # the examples' own requirements (scipy) missing
        raise Unavailable(f"the example package needs its requirements (examples/requirements.txt): {exc}") from exc
    return objective, phantom, scribbles, slices


def cases(quick: bool, device_type: str) -> list[dict]:
    if quick:
        return [dict(B=2, size=64)]
    official = dict(B=12, size=256)
    if device_type != "cuda":
        return [official]
    return [official, dict(official, matmul="tf32"), dict(official, amp="fp16")]


def providers(device_type: str) -> list[str]:
    return list(PROVIDERS)


def make_batch(batch: int, size: int, num_classes: int = 4, seed: int = 0) -> dict:
    """A batch in the training sampler's format from phantom volumes with synthesised scribbles."""
    _, phantom, scribbles, slices = _scribseg()
    from scribseg.volume import Volume

    rng = np.random.default_rng(seed)
    volumes = []
    for i in range(max(1, batch // 4)):
        image, label, spacing = phantom.phantom_case(rng)
        image = image.astype(np.float32) / max(1.0, float(image.max()))
        scribble = scribbles.synthesise_scribbles(label, num_classes, seed=seed + i)
        volumes.append(Volume(f"bench{i}", f"bench{i}", image, label, scribble, spacing, num_classes,
                              ("RV", "MYO", "LV")))
    sampler = slices.SliceSampler(volumes, size, augment=False)
    return sampler.sample(rng, batch)


def build(provider: str, case: dict, device: torch.device) -> Workload:
    objective, _, _, _ = _scribseg()
    stage, _, kind = provider.partition("-")
    attention, lambda_crf, lambda_asl = STAGES[stage]
    backend = kind if kind in ("reference", "triton", "cuda") else "auto"
    if backend in ("triton", "cuda") and device.type != "cuda":
        raise Unavailable(f"the {backend!r} backend's step is timed on a GPU only")
    cfg = objective.LossConfig(lambda_crf=lambda_crf, lambda_asl=lambda_asl, asl_from_iteration=0, backend=backend)
    cfg = cfg.scaled(case["size"], case["size"] // 4)
    torch.manual_seed(0)
    model = objective.ScribbleModel(4, cfg, attention_stage=2 if attention else None,
                                    attention_backend="aten" if kind == "aten" else None).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    batch = {k: v.to(device) for k, v in make_batch(case["B"], case["size"]).items()}
    params = [p for p in model.parameters() if p.requires_grad]

    amp = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}[case.get("amp")]
    # the example's loss scaling (examples/scribseg/engine.py): on for fp16 on CUDA
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16 and device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(batch, iteration=1)["loss"]
        return scaler.scale(loss)

    def after():
        scaler.step(opt)
        scaler.update()

    if scaler.is_enabled():
        # the scaler starts at 2**16 and halves on every overflowing step, whose optimizer step it
        # skips: settle it first, so that the timed steps are those of a running training
        for _ in range(_SCALER_SETTLING_STEPS):
            opt.zero_grad(set_to_none=True)
            step().backward()
            after()
        opt.zero_grad(set_to_none=True)

    matmul = case.get("matmul")
    context = None if matmul is None else functools.partial(cuda_matmul_fp32, matmul)
    return Workload(step, params, after_backward=after, modes=("full",), context=context)


SUITE = Suite("train_step", cases, providers, build, reference="unet+pce", modes=("full",))
