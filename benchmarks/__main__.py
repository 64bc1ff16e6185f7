"""One command for the benchmarks:

    python -m benchmarks --suite masked_crf [--device cuda] [--quick] [--modes full] [--providers cpu reference]
                         [--skip-providers reference-compile]

runs the chosen suites, prints a table with the speed-up and memory ratio against the reference,
writes ``benchmarks/results/<suite>-<device>.json`` / ``.csv`` (``--out`` elsewhere) and draws the
PNG plots of ``benchmarks.report``. While a suite runs, the rows so far are kept in
``<suite>-<device>.partial.json``: a run stopped by a time limit leaves them there.
"""
import argparse
import importlib
import sys

import torch

from . import common

SUITES = {
    "masked_crf": "benchmarks.bench_masked_crf",
    "attentive_similarity": "benchmarks.bench_attentive_similarity",
    "attention": "benchmarks.bench_spatial_attention",
    "train_step": "benchmarks.bench_train_step",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", default=["all"], choices=["all", *SUITES])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke run)")
    parser.add_argument("--modes", nargs="+", default=list(common.MODES), choices=common.MODES)
    parser.add_argument("--providers", nargs="+", default=None, help="subset of providers")
    parser.add_argument("--skip-providers", nargs="+", default=[], metavar="PROVIDER",
                        help="providers left out (e.g. reference-compile, whose compiles take the longest)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10,
                        help=f"samples per row; shorter rows take as many more as add up to about "
                             f"{common.MIN_SECONDS} s ({common.MAX_REPEAT} at most), slower ones as many as fit in "
                             f"{common.MAX_SECONDS} s ({common.MIN_SLOW_SAMPLES} at least)")
    parser.add_argument("--timing", default="queued", choices=common.TIMINGS,
                        help="GPU: 'queued' launches ahead (a training loop's pace: GPU time, or host time where "
                             "longer), 'synced' synchronises before each sample (adds the host path)")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="directory for JSON/CSV results")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--json-only", action="store_true", help="no CSV next to the JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = list(SUITES) if "all" in args.suite else args.suite
    print(f"{common.device_name(device)} | torch {torch.__version__} | git {common._git_revision()}")
    for name in names:
        try:
            module = importlib.import_module(SUITES[name])
        except ModuleNotFoundError as exc:
            if exc.name != SUITES[name]:
                raise
            print(f"suite {name}: not available in this version ({exc.name})")
            continue
        suite = module.SUITE
        print(f"\n== {name} ==")
        def save_so_far(rows, suite=suite, name=name):
            common.write_results(common.add_ratios([dict(r) for r in rows], suite.reference), name, device, args.out,
                                 partial=True)

        chosen = [p for p in suite.providers(device.type)
                  if (args.providers is None or p in args.providers) and p not in args.skip_providers]
        if not chosen:
            print(f"suite {name}: none of its providers {suite.providers(device.type)} was chosen")
            continue
        rows = common.run_suite(suite, device, quick=args.quick, modes=args.modes, providers=chosen,
                                warmup=args.warmup, repeat=args.repeat, timing=args.timing, on_row=save_so_far)
        common.add_ratios(rows, suite.reference)
        print(common.table(rows))
        path = common.write_results(rows, name, device, args.out, csv=not args.json_only)
        print(f"results: {path}")
        if not args.no_plots:
            from . import report

            for png in report.plot_results(path):
                print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
