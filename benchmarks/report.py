"""Plots and README tables generated from saved results (never typed by hand).

    python -m benchmarks.report                 # PNGs for every results file
    python -m benchmarks.report --readme README.md   # rewrite the tables between the markers

A case dict may carry ``series``: the name of the case key that varies along that series (e.g.
"size" or "radius"), or a list of names for a case on several series; its rows are plotted against
that key, one line per provider, log scale.
README sections live between ``<!-- bench:<suite>:begin -->`` and ``<!-- bench:<suite>:end -->``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import defaultdict

from . import common


def _load(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def series_of(row: dict) -> list[str]:
    """The series a row belongs to: ``series`` is one case key or a list of them (a case at the
    crossing of two series, e.g. the official size on both the size and the radius axes)."""
    series = row.get("series")
    if not series:
        return []
    return [series] if isinstance(series, str) else list(series)


def plot_groups(rows: list[dict]) -> dict:
    """(series, mode, workload) -> the measured rows drawn in that plot."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("median_ms") is None:
            continue
        for series in series_of(r):
            groups[(series, r["mode"], r.get("workload") or "")].append(r)
    return groups


def plot_results(path: str) -> list[str]:
    """One PNG per (series, mode): time and peak memory against the varying key, per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.ticker
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = plot_groups(_load(path))
    written = []
    for (series, mode, workload), items in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        by_provider = defaultdict(list)
        for r in items:
            by_provider[r["provider"]].append(r)
        for provider, rs in sorted(by_provider.items()):
            rs.sort(key=lambda r: r[series])
            xs = [r[series] for r in rs]
            ax_t.plot(xs, [r["median_ms"] for r in rs], marker="o", label=provider)
            if all(r.get("peak_mib") for r in rs):
                ax_m.plot(xs, [r["peak_mib"] for r in rs], marker="o", label=provider)
        ticks = sorted({r[series] for r in items})
        for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel(series)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        suite = items[0]["suite"]
        title = f"{suite} {workload}".strip()
        fig.suptitle(f"{title}, {mode}, vs {series} — {items[0]['device']}", fontsize=9)
        fig.tight_layout()
        tag = f"-{common.slug(workload)}" if workload else ""
        out = os.path.splitext(path)[0] + f"{tag}-{series}-{mode}.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(out)
    return written


# rows without "timing" were all timed with a synchronisation before each sample
_TIMING_NOTES = {"queued": " of CUDA-event samples with the launches queued ahead",
                 "synced": " of CUDA-event samples, each after a synchronisation (host path included)"}


def _timing_note(row: dict) -> str:
    if row.get("device_type") != "cuda":
        return ""
    return _TIMING_NOTES[row.get("timing", "synced")]


def markdown_table(rows: list[dict], mode: str = "full", reference: str = "reference",
                   relative_time: bool = False) -> str:
    """The rows of one mode as a markdown table; providers that did not run are listed below it
    with their reason (and the cases it applies to, when not all). ``relative_time``: a "time vs
    reference" column (a cost factor, e.g. of a training step) instead of the speed-up."""
    rows = common.add_ratios([dict(r) for r in rows], reference)
    rows = [r for r in rows if r["mode"] == mode]
    if not rows:
        return ""
    device = rows[0]["device"]
    what = {"full": "forward + backward" + (" + optimizer step" if rows[0]["suite"] == "train_step" else ""),
            "forward": "forward (autograd recording)", "backward": "backward alone"}[mode]
    first = "time vs" if relative_time else "speed-up vs"
    lines = [f"Measured on {device}, torch {rows[0]['torch']}, git {rows[0]['git']} ({rows[0]['date'][:10]}); "
             f"{mode} = {what}, median{_timing_note(rows[0])}"
             + (f"; Triton attention tiles {rows[0]['attention_tiles']}" if rows[0].get("attention_tiles") else "")
             + ".", "",
             f"| case | provider | time (ms) | peak extra memory (MiB) | {first} {reference} | memory vs {reference} |",
             "|---|---|---:|---:|---:|---:|"]
    skipped = {}
    cases = []
    for r in rows:
        label = common.case_label(r)
        if label not in cases:
            cases.append(label)
        if r.get("median_ms") is None:
            skipped.setdefault(r.get("skipped", ""), {}).setdefault(label, set()).add(r["provider"])
            continue
        mem = "n/a" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"
        if "speedup" not in r:
            speed = ""
        elif relative_time:
            speed = f"{1.0 / r['speedup']:.2f}×"
        else:
            speed = f"{r['speedup']:.1f}×"
        ratio = f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else ""
        lines.append(f"| {label} | {r['provider']} | {r['median_ms']:.3f} | {mem} | {speed} | {ratio} |")
    if skipped:
        lines.append("")
        for reason, by_case in skipped.items():
            names = sorted(set().union(*by_case.values()))
            where = "" if len(by_case) == len(cases) else " at " + "; ".join(by_case)
            lines.append(f"Not run{where}: {', '.join(names)} — {reason.rstrip('.')}.")
    return "\n".join(lines)


# The provider the ratios are taken against, where it is not "reference".
_SUITE_REFERENCE = {"train_step": "unet+pce"}


def update_readme(readme: str, results_dir: str = common.RESULTS_DIR) -> list[str]:
    """Replace every ``bench:<name>`` section of the README with the table of ``<name>.json``."""
    with open(readme) as f:
        text = f.read()
    updated = []
    for match in re.finditer(r"<!-- bench:([\w.-]+):begin -->", text):
        name = match.group(1)
        path = os.path.join(results_dir, name + ".json")
        if not os.path.exists(path):
            continue
        rows = _load(path)
        suite = rows[0]["suite"] if rows else ""
        body = markdown_table(rows, reference=_SUITE_REFERENCE.get(suite, "reference"),
                              relative_time=suite in _SUITE_REFERENCE)
        pattern = re.compile(rf"(<!-- bench:{re.escape(name)}:begin -->\n).*?(<!-- bench:{re.escape(name)}:end -->)",
                             re.S)
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
        updated.append(name)
    with open(readme, "w") as f:
        f.write(text)
    return updated


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("--results", default=common.RESULTS_DIR)
    parser.add_argument("--readme", default=None, help="rewrite this file's bench sections")
    args = parser.parse_args(argv)
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        if path.endswith(".partial.json"):  # a stopped run's rows: plotted once renamed
            continue
        for png in plot_results(path):
            print(png)
    if args.readme:
        print("updated sections:", ", ".join(update_readme(args.readme, args.results)) or "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
