"""The CUDA kernels' device code under AddressSanitizer and UndefinedBehaviorSanitizer, without a
GPU: the host emulations of tests/cuda_emulation (the masked CRF's block program, the similarity
loss's window rows) built with -fsanitize=address,undefined and run on the emulation tests' cases
in a child process with the sanitizers' runtimes preloaded. Their buffers are torch tensors, each
its own allocation of exactly its size, so a read or a write one byte past one, or before it, ends
the child with the sanitizer's report; so does undefined behaviour (a signed overflow in index
arithmetic, a shift too far, a misaligned access). compute-sanitizer runs the compiled kernels
themselves on the GPU machine (scripts/gpu_session.sh)."""
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import SANITIZE_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runtimes():
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    libraries = []
    for name in ("libasan.so", "libubsan.so"):
        path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True,
                              text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            pytest.skip(f"the compiler has no {name}")
        libraries.append(os.path.realpath(path))
    return compiler, libraries


def _sanitized_env(libraries):
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=" ".join(libraries),
        # leaks: the interpreter's own, not the emulation's; every report ends the process
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87",
        ATTENSCRIBBLE_EMULATION_SANITIZE="1",
        ATTENSCRIBBLE_TRITON_MEMCHECK="0",
    )
    return env


def _run(args, env, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_sanitizers_catch_a_read_one_element_past_a_tensor(tmp_path):
    """The set-up itself: a function reading x[n] of an n-element tensor, built with the same flags
    and called the same way, is stopped by AddressSanitizer (heap-buffer-overflow), and one whose
    index arithmetic overflows by UndefinedBehaviorSanitizer."""
    compiler, libraries = _runtimes()
    source = tmp_path / "faulty.cpp"
    source.write_text(textwrap.dedent("""\
        #include <cstdint>
        extern "C" double read_at(const double* x, int64_t i) { return x[i]; }
        extern "C" int scaled(int a, int b) { return a * b; }
        """))
    library = tmp_path / "faulty.so"
    subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", *SANITIZE_FLAGS, str(source), "-o",
                    str(library)], check=True)
    script = textwrap.dedent(f"""\
        import ctypes, sys, torch
        lib = ctypes.CDLL({str(library)!r})
        lib.read_at.restype = ctypes.c_double
        x = torch.arange(5, dtype=torch.float64)
        assert lib.read_at(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(4)) == 4.0
        print("in bounds", flush=True)
        if sys.argv[1] == "past":
            lib.read_at(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(5))
        else:
            lib.scaled(1 << 20, 1 << 12)
        print("not stopped", flush=True)
        """)
    env = _sanitized_env(libraries)
    past = _run(["-c", script, "past"], env, timeout=120)
    assert past.returncode == 86, past.stdout + past.stderr[-3000:]
    assert "in bounds" in past.stdout and "not stopped" not in past.stdout
    assert "heap-buffer-overflow" in past.stderr
    assert re.search(r"0 bytes (after|to the right of) 40-byte region", past.stderr), past.stderr[-3000:]
    overflow = _run(["-c", script, "overflow"], env, timeout=120)
    assert overflow.returncode == 87, overflow.stdout + overflow.stderr[-3000:]
    assert "signed integer overflow" in overflow.stderr


def test_cuda_device_code_runs_clean_under_the_sanitizers():
    """Every case of the two emulations (tests/test_masked_crf_cuda.py; the window-row cases of
    tests/test_attentive_similarity_ops.py), their borders, bands, masks, 3-D volumes and
    windows larger than the grid included: no report, and every case passes as without the
    sanitizers."""
    _, libraries = _runtimes()
    result = _run(["-m", "pytest", "-q", "--capture=sys", "-p", "no:cacheprovider", "-p", "no:randomly",
                   "tests/test_masked_crf_cuda.py",
                   "tests/test_attentive_similarity_ops.py::test_cuda_window_rows_dim_major_match_the_cpu_kernel"],
                  _sanitized_env(libraries))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "AddressSanitizer" not in output and "runtime error" not in output, output[-6000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


EXP_PROBE = r"""
#include <cmath>
#include <cstdio>
#include <limits>
#include "fast_math.h"

int main() {
  double worst = 0.0;
  for (int i = -870000; i <= 880000; ++i) {
    const float x = static_cast<float>(i) * 1e-4f;
    const double want = std::exp(static_cast<double>(x));
    const double error = std::fabs(attenscribble_ops::exp_f32(x) - want) / want;
    worst = error > worst ? error : worst;
  }
  std::printf("worst %.6e\n", worst);
  const float inf = std::numeric_limits<float>::infinity();
  const float special[] = {-inf, -1e30f, -3e9f, -100.0f, -87.5f, inf, 1e30f, 100.0f,
                           std::numeric_limits<float>::quiet_NaN()};
  for (float x : special) std::printf("%g %a\n", x, attenscribble_ops::exp_f32(x));
  return 0;
}
"""


def test_the_fast_exp_under_undefined_behavior_sanitizer(tmp_path):
    """csrc/fast_math.h's exp_f32, the C++ kernels' fp32 exponential, built as a program with
    UndefinedBehaviorSanitizer (every report fatal): within 2^-22 relative of exp over [-87, 88],
    0 below, clamped to e^88 above, NaN kept; and no undefined behaviour on the way. Before, the
    product forming 2^k's exponent bits overflowed int for inputs below about -266 (logits far
    below their row's maximum), and the conversion of k was undefined below about -1.5e9."""
    compiler, _ = _runtimes()
    source = tmp_path / "exp_probe.cpp"
    source.write_text(EXP_PROBE)
    program = tmp_path / "exp_probe"
    subprocess.run([compiler, "-std=c++20", "-O1", "-ffp-contract=off", "-fsanitize=undefined",
                    "-fno-sanitize-recover=undefined", "-fno-wrapv", f"-I{os.path.join(ROOT, 'csrc')}",
                    str(source), "-o", str(program)], check=True)
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"))
    assert result.returncode == 0 and "runtime error" not in result.stderr, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert float(lines[0].split()[1]) < 2.0 ** -22, lines[0]
    values = [float.fromhex(line.split()[1]) for line in lines[1:]]
    assert values[:5] == [0.0] * 5
    e88 = float.fromhex(lines[6].split()[1])
    assert values[5] == values[6] == values[7] == e88 and abs(e88 / math.exp(88.0) - 1) < 2.0 ** -22
    assert math.isnan(values[8])
