#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer (`make test-sanitize`).
#
# A copy of the package under build/sanitize gets its own extension, built with
# ATTENSCRIBBLE_SANITIZE=1 (CPU sources, -O1 -g, setup.py), and the test suite runs from there with
# the sanitizers' runtimes preloaded: every test that can call the compiled kernels (the examples'
# trainings and the two-process DDP test included). The tests' tensors are each their own
# allocation, so a kernel reading or writing a byte outside one, a signed overflow in its index
# arithmetic, or any other report ends the run: exit 86 (AddressSanitizer) or 87
# (UndefinedBehaviorSanitizer), the report on stderr. Arguments go to pytest; SANITIZE_TESTS
# (default: tests) picks the files, e.g. SANITIZE_TESTS=tests/test_properties.py with
# ATTENSCRIBBLE_HYPOTHESIS_EXAMPLES=3000 for thousands of random shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, still the virtual environment's
CXX=${CXX:-c++}
DIR=build/sanitize

mkdir -p "$DIR"
# Fresh sources with their own times: ninja (under $DIR/build) recompiles only what changed.
rm -rf "$DIR/attenscribble_ops" "$DIR/tests" "$DIR/csrc" "$DIR/scripts" "$DIR/examples" "$DIR/README.md"
tar -cf - --exclude='*.so' --exclude=__pycache__ \
    attenscribble_ops csrc tests scripts examples setup.py pyproject.toml README.md |
  tar -xf - -C "$DIR"
cd "$DIR"
ATTENSCRIBBLE_SANITIZE=1 FORCE_ONLY_CPU=1 "$PY" setup.py --quiet build_ext --inplace > build.log 2>&1 || {
  tail -40 build.log; exit 1; }

LD_PRELOAD="$(realpath "$($CXX -print-file-name=libasan.so)") $(realpath "$($CXX -print-file-name=libubsan.so)")"
export LD_PRELOAD
# leaks: the interpreter's own, not the kernels'
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:exitcode=86
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=87
export ATTENSCRIBBLE_TRITON_MEMCHECK=0

# `python -m` puts this directory first on sys.path: the copy, not the installed package, is tested.
"$PY" - <<'EOF'
import os
import attenscribble_ops._extension as extension
here = os.path.join(os.getcwd(), "attenscribble_ops")
assert extension.loaded(), extension.load_error()
assert os.path.dirname(extension._C.__file__) == here, (extension._C.__file__, here)
print(f"sanitized extension: {extension._C.__file__}", flush=True)
EOF

# --capture=sys: a report written to file descriptor 2 as the process ends reaches the terminal
# Not here: the Triton interpreter's tests, the sanitizers' own (test_sanitizers.py), nvcc (which
# crashes with the runtimes preloaded) and the benchmarks' formatting.
exec "$PY" -m pytest ${SANITIZE_TESTS:-tests} -m "not slow" --capture=sys -p no:cacheprovider \
  -k "not triton and not sanitizers and not compiles_with_nvcc" --ignore=tests/test_benchmarks.py "$@"
