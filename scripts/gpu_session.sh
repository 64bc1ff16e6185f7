#!/usr/bin/env bash
# One call on the lent GPU machine (no internet; its own torch, Triton, nvcc and pytest): build the
# extension with its CUDA sources, run the GPU tests, compute-sanitizer on small cases, the
# benchmarks; everything under $OUT (at most 8 files come back: one log, the junit report, one
# JSON per benchmark suite).
#
#   device run:  bash scripts/gpu_session.sh            (run's timeout_s: DEADLINE + 30)
#   knobs:       DEADLINE=530 (seconds: every step's time limit is cut to what is left of it),
#                STEPS="tests sanitizer bench" (a second call on the warm machine: STEPS=bench),
#                QUICK=1 (small benchmark shapes), SUITES="train_step masked_crf ..." (in this order)
# A benchmark suite stopped by its limit leaves the rows it measured in <suite>-<card>.partial.json.
set -u
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

step "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build (FORCE_CUDA=1, sm_90)"
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
python setup.py build_ext --inplace -q || { echo "BUILD FAILED"; exit 1; }
python -c "import attenscribble_ops as ao; print(ao.explain())"

t=$(limit 240 120)
if wants tests && (( t > 0 )); then
step "GPU tests"
timeout "$t" python -m pytest -q -x -m "not slow" -p no:cacheprovider --junitxml="$OUT/junit.xml" \
    tests/test_masked_crf.py tests/test_masked_crf_cuda.py tests/test_masked_crf_ops.py \
    $(ls tests/test_attentive_similarity*.py tests/test_spatial_attention*.py 2>/dev/null) \
    tests/test_compile.py tests/test_backends.py tests/test_determinism.py tests/test_int64_offsets.py \
    tests/test_autocast.py
echo "pytest exit: $?"
fi

if wants sanitizer; then
step "compute-sanitizer"
for tool in memcheck racecheck; do
    t=$(limit 120 90)
    (( t > 0 )) || { echo "$tool: no time left"; continue; }
    timeout "$t" compute-sanitizer --tool "$tool" --error-exitcode 9 python scripts/sanitize_cases.py \
        > "$OUT/.sanitizer-$tool.txt" 2>&1
    echo "$tool exit: $?"
    tail -n 15 "$OUT/.sanitizer-$tool.txt"
done
rm -f "$OUT"/.sanitizer-*.txt
fi

if wants bench; then
step "benchmarks"
for suite in ${SUITES:-train_step masked_crf attentive_similarity attention}; do
    t=$(limit 200)
    (( t > 0 )) || { echo "$suite: no time left"; continue; }
    timeout "$t" python -m benchmarks --suite "$suite" --device cuda --no-plots --json-only --out "$OUT" \
        ${QUICK:+--quick}
    echo "$suite exit: $?"
done
fi
step "done"
