#!/usr/bin/env bash
# One call on the lent GPU machine (no internet; its own torch, Triton, nvcc and pytest): build the
# extension with its CUDA sources, run the GPU tests, compute-sanitizer on small cases, the
# benchmarks; everything under $OUT (at most 8 files come back: one log, the junit report, one
# JSON per benchmark suite).
#
#   device run:  bash scripts/gpu_session.sh            (timeout ~540 s)
#   knobs:       QUICK=1 (small benchmark shapes), SUITES="masked_crf attentive_similarity ..."
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
exec > >(tee -a "$LOG") 2>&1
step() { printf '\n== %s (%ss) ==\n' "$1" "$SECONDS"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build (FORCE_CUDA=1, sm_90)"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
python setup.py build_ext --inplace -q || { echo "BUILD FAILED"; exit 1; }
python -c "import attenscribble_ops as ao; print(ao.explain())"

step "GPU tests"
timeout 240 python -m pytest -q -x -m "not slow" -p no:cacheprovider --junitxml="$OUT/junit.xml" \
    tests/test_masked_crf.py tests/test_masked_crf_cuda.py tests/test_masked_crf_ops.py \
    $(ls tests/test_attentive_similarity*.py tests/test_spatial_attention*.py 2>/dev/null) \
    tests/test_compile.py tests/test_backends.py tests/test_determinism.py tests/test_int64_offsets.py \
    tests/test_autocast.py
echo "pytest exit: $?"

step "compute-sanitizer"
for tool in memcheck racecheck; do
    timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 9 python scripts/sanitize_cases.py \
        > "$OUT/.sanitizer-$tool.txt" 2>&1
    echo "$tool exit: $?"
    tail -n 15 "$OUT/.sanitizer-$tool.txt"
done
rm -f "$OUT"/.sanitizer-*.txt

step "benchmarks"
for suite in ${SUITES:-masked_crf attentive_similarity attention train_step}; do
    timeout 200 python -m benchmarks --suite "$suite" --device cuda --no-plots --json-only --out "$OUT" \
        ${QUICK:+--quick}
    echo "$suite exit: $?"
done
step "done"
