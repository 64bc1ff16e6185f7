#!/usr/bin/env bash
# One call on the lent GPU machine (no internet; its own torch, Triton, nvcc and pytest): load or
# build the extension with its CUDA sources, run the GPU tests, compute-sanitizer on small cases, the
# benchmarks; everything under $OUT (at most 8 files come back: one log, the junit report, one
# JSON per benchmark suite).
#
#   device run:  bash scripts/gpu_session.sh            (run's timeout_s: DEADLINE + 30 or 40)
#   knobs:       DEADLINE=530 (seconds: every step's time limit is cut to what is left of it),
#                STEPS="tests sanitizer bench" (a second call on the warm machine: STEPS=bench).
#                With 900 s of device time per session, the machine's start (1-2 min) included,
#                make one call: DEADLINE=700 leaves the benchmarks about 240 s after the tests
#                (200 + 90 s at most) and the sanitizer (2 x 75 s at most),
#                QUICK=1 (small benchmark shapes), SUITES="train_step masked_crf ..." (in this order),
#                SUITE_CAP=200 (seconds per benchmark suite at most),
#                SKIP_PROVIDERS="reference-compile" (the default: its compiles take the longest;
#                SKIP_PROVIDERS= keeps all), PROVIDERS="..." (only these), NPROC=8 (pytest-xdist
#                workers, where it is installed), ATTENSCRIBBLE_GIT_REVISION (the tree there has no .git),
#                ATTENSCRIBBLE_TRITON_ATTENTION_TILES="64x32x4,64x32x4,32x32x8x1" (the Triton attention's
#                forward, dq and dk/dv tiles for a tuning run, e.g. STEPS=bench SUITES=attention
#                PROVIDERS=triton; its rows record them)
# A benchmark suite stopped by its limit leaves the rows it measured in <suite>-<card>.partial.json.
#
# Device time is short, so the extension can be built beforehand on the development machine against
# the GPU machine's stack (Python 3.12, torch 2.11.0+cu130) and carried in device_carry/:
#   FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=/usr/local/cuda python3.12 setup.py build_ext --inplace
#   mkdir -p device_carry && cp attenscribble_ops/_C.cpython-312-*.so device_carry/   (run's carry: device_carry)
#   bash scripts/gpu_session.sh --sources-hash > device_carry/sources.sha256
# It is used only if it was built from the sources of this tree (that hash of csrc/ and setup.py)
# and loads there with its CUDA kernels; otherwise the script builds (a stale build would load and
# test the old kernels).
set -u
# one hash of every file the extension is built from (run in the repository root, as the device runs it)
sources_hash() { find csrc setup.py -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1; }
if [[ "${1:-}" == "--sources-hash" ]]; then sources_hash; exit 0; fi
OUT=${OUT:-$PWD/gpu_out}
DEADLINE=${DEADLINE:-530}
STEPS=${STEPS:-tests sanitizer bench}
mkdir -p "$OUT"
LOG="$OUT/session.log"
exec > >(tee -a "$LOG") 2>&1
step() { printf '\n== %s (%ss of %ss) ==\n' "$1" "$SECONDS" "$DEADLINE"; }
# limit CAP [RESERVE]: CAP seconds, or what is left before DEADLINE minus RESERVE if less (0: none)
limit() {
    local left=$(( DEADLINE - SECONDS - ${2:-0} ))
    local cap=$(( $1 < left ? $1 : left ))
    echo $(( cap < 10 ? 0 : cap ))
}
wants() { [[ " $STEPS " == *" $1 "* ]]; }
# the Python that holds torch (on the GPU machine: python3, /opt/torch/.venv)
PY=python3
"$PY" -c "import torch" 2> /dev/null || PY=python

step "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "extension"
built=0
for so in device_carry/_C.*.so; do
    [[ -f "$so" ]] || continue
    if [[ "$(cat device_carry/sources.sha256 2> /dev/null)" != "$(sources_hash)" ]]; then
        echo "the prebuilt $so was not built from these sources (device_carry/sources.sha256): building"
        continue
    fi
    cp "$so" attenscribble_ops/
    if "$PY" -c "import sys, attenscribble_ops._extension as e; print(e.load_error() or 'loaded'); sys.exit(0 if e.with_cuda() else 1)"; then
        echo "using the prebuilt $so"; built=1
    else
        echo "the prebuilt $so does not load with CUDA kernels here: building"; rm -f "attenscribble_ops/$(basename "$so")"
    fi
done
if (( ! built )); then
# torch takes CUDA_HOME from the nvcc on PATH: a wrapper script there (/usr/local/bin/nvcc, as on the
# development machine) gives /usr/local, without libcudart. Take the toolkit that has the headers.
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc > /dev/null; then
    nvcc_dir=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    for d in "$nvcc_dir" /usr/local/cuda; do
        [[ -f "$d/include/cuda_runtime.h" ]] && { export CUDA_HOME=$d; break; }
    done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}; $("${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -n 1)"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
"$PY" setup.py build_ext --inplace -q || { echo "BUILD FAILED"; exit 1; }
fi
"$PY" -c "import attenscribble_ops as ao; print(ao.explain())"

if wants tests; then
step "GPU tests"
xdist=""
"$PY" -c "import xdist" 2> /dev/null && xdist="-n ${NPROC:-8}"
t=$(limit 200 150)
# SIGINT first at the limit: pytest then still prints its summary of failures and writes the report
if (( t > 0 )); then
    OMP_NUM_THREADS=2 timeout -s INT -k 20 "$t" "$PY" -m pytest -q $xdist --maxfail=25 -rfE --tb=short -m "not slow" \
        -p no:cacheprovider --junitxml="$OUT/junit.xml" \
        tests/test_masked_crf.py tests/test_masked_crf_cuda.py tests/test_masked_crf_ops.py \
        $(ls tests/test_attentive_similarity*.py tests/test_spatial_attention*.py 2>/dev/null) \
        tests/test_compile.py tests/test_backends.py tests/test_determinism.py tests/test_autocast.py \
        tests/test_double_backward.py tests/test_func_transforms.py tests/test_autograd_modes.py \
        tests/test_triton_sm90.py::test_transposed_split_product_rounds_as_the_forward
    echo "pytest exit: $?"
else
    echo "GPU tests: no time left"
fi
# apart and serial: each of these holds about 40 GiB of the GPU
t=$(limit 90 150)
if (( t > 0 )); then
    timeout -s INT -k 20 "$t" "$PY" -m pytest -q -rfE --tb=short -m "not slow" -p no:cacheprovider \
        tests/test_int64_offsets.py
    echo "pytest (int64 offsets) exit: $?"
else
    echo "int64 tests: no time left"
fi
fi

if wants sanitizer; then
step "compute-sanitizer"
for tool in memcheck racecheck; do
    t=$(limit 75 60)
    (( t > 0 )) || { echo "$tool: no time left"; continue; }
    # without torch's caching allocator every tensor is its own allocation, so memcheck sees its bounds
    # (scripts/ is not the package's folder: PYTHONPATH names the in-place build)
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 15 "$t" compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "$PY" scripts/sanitize_cases.py \
        > "$OUT/.sanitizer-$tool.txt" 2>&1
    echo "$tool exit: $?"
    tail -n 15 "$OUT/.sanitizer-$tool.txt"
done
rm -f "$OUT"/.sanitizer-*.txt
fi

if wants bench; then
step "benchmarks"
skip=${SKIP_PROVIDERS-reference-compile}
for suite in ${SUITES:-train_step masked_crf attentive_similarity attention}; do
    t=$(limit "${SUITE_CAP:-200}")
    (( t > 0 )) || { echo "$suite: no time left"; continue; }
    timeout -k 15 "$t" "$PY" -m benchmarks --suite "$suite" --device cuda --no-plots --json-only --out "$OUT" \
        ${QUICK:+--quick} ${PROVIDERS:+--providers $PROVIDERS} \
        ${skip:+--skip-providers $skip}
    echo "$suite exit: $?"
done
fi
step "done"
