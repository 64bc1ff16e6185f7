"""The training run: data, model, SGD with poly decay, validation-only model selection, atomic
checkpoints and resume, DDP (torchrun; gloo on the CPU, NCCL on GPUs), optional AMP, and the final
test evaluation with metrics files and figures.

Reproducibility: every batch and every dropout mask is drawn from generators seeded by
(seed, iteration, rank), so an interrupted run resumed from its last checkpoint continues exactly
as if it had not stopped (on the same hardware and thread count).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import figures
from .evaluation import evaluate, format_table, mean_dice, summarise
from .objective import LossConfig, ScribbleModel
from .readers import load_dataset
from .scribbles import ensure_scribbles
from .slices import SliceSampler, batch_rng
from .splits import make_or_load_split, partition, save_split
from .volume import DataError, describe


# ---------------------------------------------------------------------------------------------
# Checkpoints are written atomically (a temporary file in the same folder, then ``os.replace``):
# a crash while saving leaves the previous checkpoint intact, never a truncated one.
def save_atomic(obj: Any, path) -> Path:
    """torch.save ``obj`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path) -> dict:
    """Load a checkpoint written by :func:`save_atomic`; a missing or corrupt file is an error
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors of a damaged file come in many types
        raise RuntimeError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "iteration" not in ckpt:
        raise RuntimeError(f"{path}: not a scribseg training checkpoint (no 'model'/'iteration' entries)")
    return ckpt


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    data: str
    out: str
    fmt: str = "auto"
    size: int = 256
    batch_size: int = 12
    iterations: int = 60000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 2022
    val_every: int = 200
    ckpt_every: int = 100
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_file: Optional[str] = None
    attention_stage: Optional[int] = 2
    attention_heads: int = 1
    amp: bool = False
    device: str = "auto"
    resume: bool = False
    stop_after: Optional[int] = None     # leave the loop after this iteration (simulates an interruption)
    synth_scribbles: bool = False        # replace the data's scribbles by synthesised ones
    spacing: Optional[tuple] = None      # (z, y, x) mm for data without spacing (e.g. WSL4MIS HDF5)
    limit: Optional[int] = None          # read only the first N volumes (quick checks)
    chaos_sequence: str = "T1DUAL-in"    # CHAOS MR sequence: T1DUAL-in, T1DUAL-out or T2SPIR
    progress: bool = True
    window_scale: str = "official"       # "official" windows, or "auto": scaled to --size (LossConfig.scaled)
    final_eval: bool = True
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def poly_lr(base: float, iteration: int, total: int, power: float) -> float:
    """lr = base * (1 - iteration / total) ** power (the paper's schedule)."""
    return base * (1.0 - iteration / total) ** power


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if not cfg.amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def load_volumes(cfg: TrainConfig, log=print):
    volumes = load_dataset(cfg.data, fmt=cfg.fmt, spacing=cfg.spacing, limit=cfg.limit,
                           chaos_sequence=cfg.chaos_sequence)
    made = ensure_scribbles(volumes, seed=cfg.seed, force=cfg.synth_scribbles)
    log(f"data: {cfg.data}: {describe(volumes)}" + (f"; scribbles synthesised for {made}" if made else ""))
    if cfg.spacing is not None:
        for v in volumes:
            v.spacing = tuple(cfg.spacing) if v.spacing is None else v.spacing
    return volumes


def _checkpoint_state(model: ScribbleModel, opt, scaler, iteration: int, history: dict, cfg: TrainConfig,
                      split: dict, best: dict) -> dict:
    """Everything a resumed run continues from; ``scaler``: the fp16 AMP loss scale and its growth
    tracker (a fresh scale after a resume would skip steps the uninterrupted run takes)."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "iteration": iteration, "history": history, "config": _config_dict(cfg), "split": split,
            "best": best, "torch": torch.__version__}


def _config_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["loss"]["variant"] = cfg.loss.variant
    return d


def validate(model: ScribbleModel, volumes, cfg: TrainConfig, device, iteration: int) -> dict:
    rows, _ = evaluate(model.net, volumes, cfg.size, device=device, amp_dtype=_amp_dtype(cfg, device))
    names = volumes[0].class_names
    per_class = {n: float(np.mean([r["dice"] for r in rows if r["class_name"] == n])) for n in names}
    return {"iteration": iteration, "mean_dice": mean_dice(rows), "per_class": per_class}


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) one training; returns a summary dict (history, best, test metrics)."""
    rank, world, local_rank = _dist_info()
    if world > 1 and not dist.is_initialized():
        device = _device(cfg, local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    device = _device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main = rank == 0
    log = log if main else (lambda *a, **k: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    volumes = load_volumes(cfg, log)
    split = make_or_load_split(volumes, cfg.split_file, val_fraction=cfg.val_fraction,
                               test_fraction=cfg.test_fraction, seed=cfg.seed)
    parts = partition(volumes, split)
    log(f"split by patient (seed {cfg.seed}): train {len(split['train'])} patients / {len(parts['train'])} volumes, "
        f"val {len(split['val'])} / {len(parts['val'])}, test {len(split['test'])} / {len(parts['test'])}")
    if not cfg.loss.dense and cfg.loss.lambda_asl > 0 and cfg.loss.asl_gate == "label":
        unlabelled = [v.case_id for v in parts["train"] if v.label is None]
        if unlabelled:  # the gate would read an all-background label: ASL silently off for those slices
            raise DataError(f"--asl-gate label (the official gate) reads each training slice's dense label, but "
                            f"{len(unlabelled)} training volumes have none (e.g. {unlabelled[0]}): use --asl-gate "
                            "scribble or none")
    sampler = SliceSampler(parts["train"], cfg.size, dense=cfg.loss.dense)
    num_classes = sampler.num_classes

    if cfg.window_scale == "auto":
        grid = None if cfg.attention_stage is None else cfg.size >> cfg.attention_stage
        cfg = dataclasses.replace(cfg, loss=cfg.loss.scaled(cfg.size, grid), window_scale="applied")
        log(f"windows scaled to {cfg.size}x{cfg.size}: masked CRF radius {cfg.loss.crf_radius}, sigma_xy "
            f"{cfg.loss.crf_sigma_xy:g} px; ASL radius {cfg.loss.asl_radius}, sigma {cfg.loss.asl_sigma:g} grid units")
    elif cfg.window_scale not in ("official", "applied"):
        raise ValueError(f"window_scale must be 'official' or 'auto', got {cfg.window_scale!r}")
    torch.manual_seed(cfg.seed)
    model = ScribbleModel(num_classes, cfg.loss, attention_stage=cfg.attention_stage,
                          attention_heads=cfg.attention_heads).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    history: dict = {"train": [], "val": []}
    best = {"mean_dice": -1.0, "iteration": -1}
    start = 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if cfg.resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        if ckpt["split"] != split:
            raise RuntimeError(f"{last_path}: the checkpoint's patient split differs from this run's; resume with "
                               "the same data, seed and split options (or --split-file)")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):  # absent in checkpoints written before it was saved; empty when disabled
            scaler.load_state_dict(ckpt["scaler"])
        start, history, best = ckpt["iteration"], ckpt["history"], ckpt["best"]
        log(f"resumed from {last_path} at iteration {start}")
    elif cfg.resume:
        log(f"--resume: no checkpoint at {last_path}, starting from scratch")
    if main:
        save_split(split, out / "split.json")
        (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=1, default=str))

    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.asl is not None)
    end = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, cfg.stop_after)
    bar = None
    if main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, desc=cfg.loss.variant, dynamic_ncols=True)
    model.train()
    for it in range(start, end):
        t0 = time.perf_counter()
        lr = poly_lr(cfg.lr, it, cfg.iterations, cfg.poly_power)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sampler.sample(batch_rng(cfg.seed, it, rank), cfg.batch_size)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        torch.manual_seed((cfg.seed * 1_000_003 + it) * 1009 + rank)  # dropout masks: a function of (it, rank)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            terms = ddp(batch, it)
        opt.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        record = {"iteration": it, "lr": lr, **{k: float(v.detach()) for k, v in terms.items()}}
        if world > 1:
            vals = torch.tensor([record["loss"]], dtype=torch.float64)
            dist.all_reduce(vals)
            record["loss_all_ranks"] = float(vals[0]) / world
        record["seconds"] = time.perf_counter() - t0
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss became {record['loss']} at iteration {it}: {record}")
        history["train"].append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        done = it + 1
        if main and (done % cfg.val_every == 0 or done == cfg.iterations):
            v = validate(model, parts["val"], cfg, device, done)
            history["val"].append(v)
            if v["mean_dice"] > best["mean_dice"]:
                best = {"mean_dice": v["mean_dice"], "iteration": done}
                save_atomic(_checkpoint_state(model, opt, scaler, done, history, cfg, split, best), best_path)
            log(f"iteration {done}: validation mean Dice {v['mean_dice']:.4f} (best {best['mean_dice']:.4f} at "
                f"{best['iteration']})")
        if main and (done % cfg.ckpt_every == 0 or done == end):
            save_atomic(_checkpoint_state(model, opt, scaler, done, history, cfg, split, best), last_path)
        if world > 1 and done % cfg.val_every == 0:
            dist.barrier()
    if bar is not None:
        bar.close()
    summary = {"history": history, "best": best, "split": split, "stopped_at": end, "config": _config_dict(cfg)}
    if main:
        (out / "history.json").write_text(json.dumps(history, indent=0))
    if main and end == cfg.iterations and cfg.final_eval:
        summary["test"] = final_evaluation(model, parts, cfg, device, best_path, out, log)
    if world > 1:
        dist.barrier()
    return summary


def final_evaluation(model: ScribbleModel, parts: dict, cfg: TrainConfig, device, best_path: Path, out: Path,
                     log=print) -> dict:
    """Evaluate the validation-selected checkpoint on the test patients; write CSV/JSON/figures."""
    if best_path.exists():
        model.load_state_dict(load_checkpoint(best_path)["model"])
    test = parts["test"]
    rows, preds = evaluate(model.net, test, cfg.size, device=device, amp_dtype=_amp_dtype(cfg, device),
                           keep_predictions=True)
    names = test[0].class_names
    summary = summarise(rows, names)
    unit = "mm" if all(v.spacing is not None for v in test) else "voxels"
    result = {"variant": cfg.loss.variant, "selected_iteration": _best_iteration(best_path), "unit": unit,
              "test_patients": sorted({v.patient for v in test}), "summary": summary, "cases": rows}
    (out / "metrics_test.json").write_text(json.dumps(result, indent=1, default=float))
    _write_csv(rows, out / "metrics_test.csv")
    figdir = out / "figures"
    figdir.mkdir(exist_ok=True)
    hist = json.loads((out / "history.json").read_text())
    figures.plot_curves(hist, figdir / "curves.png", title=cfg.loss.variant)
    figures.plot_cases(test, preds, figdir / "test_cases.png", title=f"{cfg.loss.variant}: test patients")
    log(format_table(summary, unit, title=f"test ({len(test)} volumes), checkpoint selected on validation at "
                                          f"iteration {result['selected_iteration']}"))
    return result


def _best_iteration(best_path: Path) -> Optional[int]:
    return load_checkpoint(best_path)["best"]["iteration"] if best_path.exists() else None


def _write_csv(rows, path: Path) -> None:
    import csv

    keys = ["case", "patient", "class", "class_name", "dice", "hd95", "status", "pred_voxels", "gt_voxels",
            "spacing"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})
