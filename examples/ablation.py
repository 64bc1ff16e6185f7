"""The comparison table: pCE vs pCE + masked CRF vs pCE + masked CRF + attentive similarity
(AttenScribble) vs full supervision, same data, split, seed and schedule; each checkpoint selected
on the validation patients, each scored once on the test patients.

Writes ``<out>/<variant>/...`` (every run's files), ``<out>/ablation.json`` and
``<out>/ablation.md`` (the per-class table, with the machine and the schedule).

Example (the phantom, short CPU schedule):
    python examples/ablation.py --data runs/phantom --out runs/ablation_phantom --size 128 \
        --batch-size 4 --iterations 200 --val-every 50
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from train import VARIANTS, build_parser, check_args, config_from_args  # noqa: E402
from scribseg.engine import train  # noqa: E402

ORDER = ("pce", "pce+mcrf", "attenscribble", "full")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads (CPU)"


def markdown(results: dict, meta: dict) -> str:
    names = [s["class"] for s in next(iter(results.values()))["summary"]]
    unit = next(iter(results.values()))["unit"]
    head = "| objective | " + " | ".join(f"{n} Dice | {n} HD95 ({unit})" for n in names) + " | empty preds | selected at |"
    sep = "|" + "---|" * (2 * len(names) + 3)
    lines = [head, sep]
    for variant, res in results.items():
        cells = []
        for s in res["summary"]:
            cells.append(f"{s['dice_mean']:.3f}")
            cells.append("n/a" if math.isnan(s["hd95_mean"]) else f"{s['hd95_mean']:.1f} (n={s['hd95_cases']})")
        empty = res["summary"][-1]["empty_pred"]
        lines.append(f"| {res['variant']} | " + " | ".join(cells) + f" | {empty} | {res['selected_iteration']} |")
    lines.append("")
    lines.append(f"Machine: {meta['machine']}; torch {meta['torch']}; schedule: {meta['schedule']}; "
                 f"test: {meta['test_volumes']} volumes of {len(meta['test_patients'])} patients; "
                 f"wall time {meta['minutes']:.1f} min.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    parser.description = __doc__
    parser.add_argument("--variants", default=",".join(ORDER), help=f"comma-separated subset of {ORDER}")
    args = parser.parse_args(argv)
    check_args(parser, args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; expected some of {ORDER}")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results, t0 = {}, time.time()
    for v in variants:
        args.variant = v
        cfg = config_from_args(args)
        cfg.out = str(root / v.replace("+", "_"))
        print(f"=== {cfg.loss.variant} -> {cfg.out}", flush=True)
        summary = train(cfg)
        if "test" not in summary:
            print(f"{v}: stopped before the end, no test metrics", flush=True)
            continue
        results[v] = {k: summary["test"][k] for k in ("variant", "summary", "unit", "selected_iteration",
                                                       "test_patients")}
        results[v]["seconds_per_iteration"] = float(
            sum(r["seconds"] for r in summary["history"]["train"]) / max(1, len(summary["history"]["train"])))
    first = next(iter(results.values()))
    meta = {"machine": machine(), "torch": torch.__version__, "data": args.data,
            "schedule": f"{args.iterations} iterations, batch {args.batch_size}, {args.size}x{args.size}, "
                        f"val every {args.val_every}, seed {args.seed}, loss windows {args.window_scale}",
            "test_patients": first["test_patients"], "test_volumes": first["summary"][0]["cases"],
            "minutes": (time.time() - t0) / 60}
    (root / "ablation.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
    table = markdown(results, meta)
    (root / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
