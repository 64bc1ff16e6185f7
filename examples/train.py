"""Train a scribble-supervised U-Net (+ spatial self-attention) with the AttenScribble objective.

Defaults are the official ACDC run (spec §6): 256 x 256, batch 12, 60 000 iterations, SGD lr 0.01
momentum 0.9 weight decay 1e-4 with poly decay 0.9, lambda_crf = lambda_asl = 0.1, seed 2022.
The checkpoint is selected on the validation patients only; the test patients are scored once, at
the end, and written to ``<out>/metrics_test.{csv,json}`` with figures in ``<out>/figures``.

Examples:
    python examples/train.py --data ../shared/data/acdc/volumes --out runs/acdc
    python examples/train.py --data runs/phantom --size 128 --iterations 300 --out runs/p --resume
    torchrun --nproc_per_node 2 examples/train.py --data runs/phantom --out runs/ddp ...   (DDP)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scribseg.engine import TrainConfig, train  # noqa: E402
from scribseg.model import CHANNELS  # noqa: E402
from scribseg.objective import LossConfig  # noqa: E402
from scribseg.volume import DataError, parse_spacing  # noqa: E402

VARIANTS = {
    "pce": dict(lambda_crf=0.0, lambda_asl=0.0),
    "pce+mcrf": dict(lambda_asl=0.0),
    "attenscribble": dict(),
    "full": dict(dense=True, lambda_crf=0.0, lambda_asl=0.0),
}


def build_parser(require_data: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=require_data,
                   help="data folder (WSL4MIS *.h5, ACDC NIfTI, CHAOS DICOM, NIfTI pairs)")
    p.add_argument("--format", default="auto", dest="fmt",
                   choices=["auto", "h5", "acdc-nifti", "chaos-dicom", "nifti-pairs"])
    p.add_argument("--chaos-sequence", default="T1DUAL-in", choices=["T1DUAL-in", "T1DUAL-out", "T2SPIR"],
                   help="CHAOS MR sequence to read (paper: T1-DUAL in-phase)")
    p.add_argument("--out", required=require_data, help="run folder (checkpoints, metrics, figures)")
    p.add_argument("--variant", default="attenscribble", choices=sorted(VARIANTS),
                   help="objective: pCE, pCE + masked CRF, the full AttenScribble objective, or full supervision")
    p.add_argument("--size", type=int, default=256, help="in-plane training/inference size (official 256)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--iterations", type=int, default=60000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=2022)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--split-file", help="JSON {train: [...], val: [...], test: [...]} of patient ids")
    p.add_argument("--attention-stage", type=int, default=2, help="encoder stage of the attention block; -1: none")
    p.add_argument("--attention-heads", type=int, default=1)
    p.add_argument("--lambda-crf", type=float, default=None, help="override the variant's masked CRF weight")
    p.add_argument("--lambda-asl", type=float, default=None, help="override the variant's ASL weight")
    p.add_argument("--asl-gate", default="label", choices=["label", "scribble", "none"],
                   help="per-sample ASL gate: 'label' as the official code (dense GT has >1 class), 'scribble' "
                        "(uses no dense label), or none")
    p.add_argument("--window-scale", default="official", choices=["official", "auto"],
                   help="'official': masked CRF radius 5 / sigma_xy 6 px and ASL radius 5 / sigma 6 grid units "
                        "whatever the size; 'auto': scaled by size/256 (grid/64), keeping the official extent "
                        "relative to the image at a reduced --size")
    p.add_argument("--loss-backend", default="auto", choices=["auto", "reference", "cpu", "cuda", "triton"],
                   help="attenscribble_ops backend of both losses and the attention block")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA with loss scaling, bf16 on the CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt if it exists")
    p.add_argument("--stop-after", type=int, help="leave after this iteration (checkpoint kept; for --resume tests)")
    p.add_argument("--synth-scribbles", action="store_true", help="replace the data's scribbles by synthesised ones")
    p.add_argument("--spacing", help="z,y,x voxel size in mm for data that stores none (WSL4MIS HDF5)")
    p.add_argument("--limit", type=int, help="read only the first N volumes")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Values argparse's types let through but training cannot use: ``parser.error`` (exit 2,
    "error: ...") names the option, instead of a failure deep inside the run."""
    import math

    import torch

    def need(ok: bool, message: str) -> None:
        if not ok:
            parser.error(message)

    need(args.size >= 16 and args.size % 16 == 0,
         f"--size must be a positive multiple of 16 (four 2x poolings), got {args.size}")
    need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    need(args.batch_size * (args.size // 16) ** 2 >= 2,
         f"--batch-size {args.batch_size} at --size {args.size} leaves one value per channel at the U-Net's "
         "bottleneck, where BatchNorm needs more: use a larger batch or size")
    for name in ("iterations", "val_every", "ckpt_every"):
        need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("limit", "threads", "stop_after"):
        value = getattr(args, name)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    need(math.isfinite(args.lr) and args.lr > 0, f"--lr must be a finite number > 0, got {args.lr}")
    stages = len(CHANNELS)
    need(-1 <= args.attention_stage < stages,
         f"--attention-stage must be an encoder stage 0-{stages - 1}, or -1 for no attention block, got "
         f"{args.attention_stage}")
    if args.attention_stage >= 0:
        channels = CHANNELS[args.attention_stage]
        need(args.attention_heads >= 1 and channels % args.attention_heads == 0,
             f"--attention-heads must divide the {channels} channels of stage {args.attention_stage}, got "
             f"{args.attention_heads}")
    else:
        asl = args.lambda_asl if args.lambda_asl is not None else VARIANTS[args.variant].get(
            "lambda_asl", LossConfig.lambda_asl)
        need(asl == 0, f"--variant {args.variant} has an attentive similarity loss (weight {asl}), which needs the "
             f"attention block: give --attention-stage 0-{stages - 1}, or --lambda-asl 0")
    for name in ("lambda_crf", "lambda_asl"):
        value = getattr(args, name)
        need(value is None or (math.isfinite(value) and value >= 0),
             f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not args.split_file:  # the fractions make the split (scribseg/splits.py checks them again there)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(args, name)
            need(0 < value < 1, f"--{name.replace('_', '-')} must be in (0, 1), got {value}")
        need(args.val_fraction + args.test_fraction < 1,
             f"--val-fraction + --test-fraction must leave patients to train on, got {args.val_fraction} + "
             f"{args.test_fraction}")
    try:
        parse_spacing(args.spacing)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            parser.error(f"--device must be auto or a torch device (cpu, cuda, cuda:N, ...), got {args.device!r}")
        need(device.type != "cuda" or torch.cuda.is_available(),
             f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
        need(device.type != "cuda" or device.index is None or device.index < torch.cuda.device_count(),
             f"--device {args.device}: only {torch.cuda.device_count()} CUDA devices")


def config_from_args(args) -> TrainConfig:
    loss_kw = dict(VARIANTS[args.variant])
    if args.lambda_crf is not None:
        loss_kw["lambda_crf"] = args.lambda_crf
    if args.lambda_asl is not None:
        loss_kw["lambda_asl"] = args.lambda_asl
    loss = LossConfig(asl_gate=args.asl_gate, backend=args.loss_backend, **loss_kw)
    return TrainConfig(
        data=args.data, out=args.out, fmt=args.fmt, size=args.size, batch_size=args.batch_size,
        iterations=args.iterations, lr=args.lr, seed=args.seed, val_every=args.val_every,
        ckpt_every=args.ckpt_every, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        split_file=args.split_file, attention_stage=None if args.attention_stage < 0 else args.attention_stage,
        attention_heads=args.attention_heads, amp=args.amp, device=args.device, resume=args.resume,
        stop_after=args.stop_after, synth_scribbles=args.synth_scribbles, spacing=parse_spacing(args.spacing),
        limit=args.limit, chaos_sequence=args.chaos_sequence, progress=not args.no_progress,
        window_scale=args.window_scale, loss=loss)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        train(config_from_args(args))
    except DataError as exc:  # a missing or corrupt input file: its name, without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
