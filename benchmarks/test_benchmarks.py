"""pytest-benchmark entry point: the same suites and builders as ``python -m benchmarks``.

    pytest benchmarks                          # quick shapes (smoke run, a few seconds per case)
    ATTENSCRIBBLE_BENCH_FULL=1 pytest benchmarks --benchmark-json out.json   # the published shapes

Each (suite, case, provider, mode) is one benchmark; providers that cannot run here are skipped
with the reason the runner records. pytest-benchmark reports wall-clock statistics; peak memory
and the comparison against the reference come from ``python -m benchmarks``.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch._functorch.config

from benchmarks import common
from benchmarks.__main__ import SUITES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("ATTENSCRIBBLE_BENCH_FULL", "0") != "1"


def _params():
    import importlib

    out = []
    for name, module in SUITES.items():
        suite = importlib.import_module(module).SUITE
        for case in suite.cases(QUICK, DEVICE.type):
            label = common.case_label(dict(case, suite=name, provider="", mode=""))
            for provider in suite.providers(DEVICE.type):
                for mode in suite.modes:
                    out.append(pytest.param(suite, case, provider, mode, id=f"{name}-{label}-{provider}-{mode}"))
    return out


@pytest.mark.parametrize("suite,case,provider,mode", _params())
def test_benchmark(benchmark, suite, case, provider, mode):
    try:
        work = suite.build(provider, case, DEVICE)
    except common.Unavailable as exc:
        pytest.skip(str(exc))
    if mode not in work.modes:
        pytest.skip(f"this workload is timed in the modes {tuple(work.modes)} only")
    forward, backward, full, _ = common.steps(work)

    def synced(fn):
        def run():
            fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
        return run

    benchmark.extra_info.update(common.environment(DEVICE), provider=provider, mode=mode, **{
        k: v for k, v in case.items() if isinstance(v, (int, float, str))})
    with work.context() if work.context is not None else contextlib.nullcontext():
        if mode == "backward":
            # replaying one graph's backward: compiled backwards must not donate their buffers
            with torch._functorch.config.patch(donated_buffer=False):
                forward()
                benchmark.pedantic(synced(backward), rounds=3 if QUICK else 10, warmup_rounds=1)
        else:
            benchmark.pedantic(synced(forward if mode == "forward" else full), rounds=3 if QUICK else 10,
                               warmup_rounds=1)
    assert benchmark.stats.stats.median > 0
