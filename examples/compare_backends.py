"""The same short training (same seed, data, split and schedule) with ``--loss-backend reference``
(the library's pure-PyTorch executable spec) and with ``--loss-backend auto`` (the fastest backend
the library finds here): loss curves, final test metrics, time and peak memory per iteration, and
what each backend resolved to (:func:`attenscribble_ops.explain`). Time and peak memory of one
training step and of the two losses alone are measured in a fresh process per backend.

Agreement is judged with stated tolerances: every iteration's loss within ``--loss-rtol``
(relative) and every class's final test Dice within ``--dice-atol``. A fused backend sums in
another order than the reference, so curves agree to float rounding at first and can drift slowly
over many SGD steps: keep the run short.

Example:
    python examples/compare_backends.py --data runs/phantom --out runs/compare_backends \
        --size 64 --batch-size 4 --iterations 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import attenscribble_ops  # noqa: E402
from attenscribble_ops.testing import peak_memory, time_it  # noqa: E402

from ablation import machine  # noqa: E402
from scribseg.engine import TrainConfig, load_volumes, train  # noqa: E402
from scribseg.objective import LossConfig, ScribbleModel  # noqa: E402
from scribseg.slices import SliceSampler, batch_rng  # noqa: E402
from scribseg.splits import make_or_load_split, partition  # noqa: E402

OPS = ("masked_crf", "attentive_similarity", "spatial_attention")


def resolved(backend: str, example: torch.Tensor) -> dict[str, str]:
    """Which implementation each op runs with ``backend`` on tensors like ``example`` (every op's
    first input is a 4-D float tensor on the run's device: probs (B, C, H, W) or q (B, heads, n, D))."""
    return {op: attenscribble_ops.resolve(op, example, backend) for op in OPS}


def measure_step(cfg: TrainConfig, volumes, split, repeat: int = 3) -> dict:
    """Median seconds and peak extra memory of one full training step and of the two losses alone
    (forward + backward), on a fixed batch."""
    parts = partition(volumes, split)
    sampler = SliceSampler(parts["train"], cfg.size)
    batch = sampler.sample(batch_rng(cfg.seed, 0, 0), cfg.batch_size)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(cfg.seed)
    model = ScribbleModel(sampler.num_classes, cfg.loss, attention_stage=cfg.attention_stage).to(device)
    model.train()

    def step():
        terms = model(batch, 1)
        terms["loss"].backward()
        model.zero_grad(set_to_none=True)

    logits, sim = model.net(batch["image"])
    logits = logits.detach()
    q, k = sim.q.detach(), sim.k.detach()

    def losses():
        lg = logits.clone().requires_grad_()
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        probs = lg.softmax(1)
        unannotated = (batch["scribble"] == model.ignore_index).unsqueeze(1).float()
        crf = attenscribble_ops.masked_crf_loss(probs, batch["image"], mask_dst=unannotated, backend=cfg.loss.backend)
        asl = model.asl(type(sim)(qq, kk, sim.grid, None if sim.lse is None else sim.lse.detach(), sim.logit_scale),
                        probs, sample_weight=batch["gate_label"])
        (crf + asl).backward()

    # peak first, on a cold call: on the CPU the measure is the growth of the resident set, which a
    # warmed-up allocator (memory already taken from the OS) would hide
    losses_peak = peak_memory(losses, device)
    step_peak = peak_memory(step, device)
    return {"step_seconds": time_it(step, device, warmup=1, repeat=repeat), "step_peak_bytes": step_peak,
            "losses_seconds": time_it(losses, device, warmup=1, repeat=repeat), "losses_peak_bytes": losses_peak,
            "resolved": resolved(cfg.loss.backend, batch["image"])}


def _measure_fresh(cfg: TrainConfig, split: dict) -> dict:
    """:func:`measure_step` in this (fresh) process, reading the data itself."""
    volumes = load_volumes(cfg, log=lambda *a: None)
    return measure_step(cfg, volumes, split)


def measure_isolated(cfg: TrainConfig, split: dict) -> dict:
    """:func:`measure_step` in a fresh spawned process, so that one backend's peak memory is not
    hidden by what the allocator kept from the previous one (on the CPU, the peak is the growth
    of the resident set)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_fresh, cfg, split).result()


def compare(data: str, out: str, *, size: int = 64, batch_size: int = 4, iterations: int = 20, seed: int = 2022,
            loss_rtol: float = 1e-3, dice_atol: float = 0.02, limit=None, val_fraction=0.15,
            test_fraction=0.25, progress: bool = False, log=print) -> dict:
    out_dir = Path(out)
    runs = {}
    for backend in ("reference", "auto"):
        cfg = TrainConfig(data=data, out=str(out_dir / backend), size=size, batch_size=batch_size,
                          iterations=iterations, seed=seed, val_every=max(1, iterations), ckpt_every=iterations,
                          val_fraction=val_fraction, test_fraction=test_fraction, limit=limit, progress=progress,
                          loss=LossConfig(backend=backend))
        volumes = load_volumes(cfg, log=lambda *a: None)
        split = make_or_load_split(volumes, None, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        summary = train(cfg, log=log)
        step = measure_isolated(cfg, split)
        train_secs = [r["seconds"] for r in summary["history"]["train"]]
        runs[backend] = {
            "losses": [r["loss"] for r in summary["history"]["train"]],
            "test": {s["class"]: s["dice_mean"] for s in summary["test"]["summary"]},
            "test_hd95": {s["class"]: s["hd95_mean"] for s in summary["test"]["summary"]},
            "train_seconds_per_iteration_median": statistics.median(train_secs),
            **step,
        }
    ref, auto = runs["reference"], runs["auto"]
    rel = [abs(a - r) / max(1.0, abs(r)) for a, r in zip(auto["losses"], ref["losses"])]
    dice_diff = {c: abs(auto["test"][c] - ref["test"][c]) for c in ref["test"]}
    report = {
        "machine": machine(), "torch": torch.__version__, "attenscribble_ops": attenscribble_ops.__version__,
        "schedule": f"{iterations} iterations, batch {batch_size}, {size}x{size}, seed {seed}",
        "runs": runs, "max_loss_rel_diff": max(rel), "max_dice_abs_diff": max(dice_diff.values()),
        "tolerance": {"loss_rtol": loss_rtol, "dice_atol": dice_atol},
        "losses_match": max(rel) <= loss_rtol, "metrics_match": max(dice_diff.values()) <= dice_atol,
        "explain": attenscribble_ops.explain(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(report, indent=1, default=float))
    (out_dir / "compare.md").write_text(markdown(report) + "\n")
    return report


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.0f}"


def markdown(rep: dict) -> str:
    lines = ["| --loss-backend | resolved (masked_crf / attentive_similarity / spatial_attention) | "
             "train s/it (median) | step s | step peak MiB | losses s | losses peak MiB | final loss | test mean Dice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rep["runs"].items():
        res = " / ".join(r["resolved"][op] for op in OPS)
        lines.append(f"| {name} | {res} | {r['train_seconds_per_iteration_median']:.3f} | {r['step_seconds']:.3f} | "
                     f"{_mib(r['step_peak_bytes'])} | {r['losses_seconds']:.3f} | {_mib(r['losses_peak_bytes'])} | "
                     f"{r['losses'][-1]:.5f} | {r['test']['mean']:.4f} |")
    lines.append("")
    lines.append(f"Max relative loss difference over {len(rep['runs']['reference']['losses'])} iterations: "
                 f"{rep['max_loss_rel_diff']:.2e} (tolerance {rep['tolerance']['loss_rtol']:g}: "
                 f"{'match' if rep['losses_match'] else 'MISMATCH'}); max test Dice difference: "
                 f"{rep['max_dice_abs_diff']:.2e} (tolerance {rep['tolerance']['dice_atol']:g}: "
                 f"{'match' if rep['metrics_match'] else 'MISMATCH'}). Machine: {rep['machine']}; "
                 f"torch {rep['torch']}; {rep['schedule']}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/phantom", help="data folder (generated phantom if it does not exist)")
    p.add_argument("--out", default="runs/compare_backends")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--seed", type=int, default=2022)
    p.add_argument("--loss-rtol", type=float, default=1e-3)
    p.add_argument("--dice-atol", type=float, default=0.02)
    args = p.parse_args(argv)
    if not Path(args.data).exists():
        from scribseg.phantom import ensure_phantom

        ensure_phantom(args.data, patients=24, seed=0)
    rep = compare(args.data, args.out, size=args.size, batch_size=args.batch_size, iterations=args.iterations,
                  seed=args.seed, loss_rtol=args.loss_rtol, dice_atol=args.dice_atol, progress=True)
    print(markdown(rep))
    print("\n" + rep["explain"])
    return 0 if rep["losses_match"] and rep["metrics_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
