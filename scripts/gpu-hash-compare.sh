#!/usr/bin/env bash
# The GPU test cases under two settings of the library, one seed, and their per-case output
# hashes compared: which cases compute the same bits either way (e.g. a new kernel against the
# path it replaces). Builds test_gpu_backend, then runs scripts/gpu-tests.sh twice; with
# HASH_SANITIZE=1 also memcheck and racecheck on the cases matching HASH_FILTER under B.
#   HASH_A="FP4MOE_CUDA_DECODE_TOKEN_FINALIZE=0" HASH_B="FP4MOE_CUDA_DECODE_TOKEN_FINALIZE=1" \
#   HASH_FILTER='!prefill' bash scripts/gpu-hash-compare.sh
# Prints the differing cases and a count last; logs in $OUT.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
. scripts/gpu-deps.sh > /dev/null 2>&1
gpu_build . build-gpu "$OUT/build.log" 16 "" test_gpu_backend || { tail -30 "$OUT/build.log"; exit 1; }
seed=${FP4MOE_TEST_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
rc=0
for side in A B; do
  [ $side = A ] && knobs=${HASH_A:-} || knobs=${HASH_B:-}
  echo "== $side: ${knobs:-(defaults)}"
  env $knobs FP4MOE_TEST_SEED=$seed FP4MOE_GPU_FILTER="${HASH_FILTER:-!prefill}" \
    bash scripts/gpu-tests.sh build-gpu/test_gpu_backend "$OUT/tests-$side.log" || rc=1
  grep -E "check failed|passed" "$OUT/tests-$side.log" | tail -4
done
if [ "${HASH_SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    env ${HASH_B:-} FP4MOE_TEST_SEED=$seed FP4MOE_GPU_FILTER="${HASH_SANITIZE_FILTER:-${HASH_FILTER:-!prefill}}" \
      timeout 300 compute-sanitizer --tool $tool --error-exitcode 3 build-gpu/test_gpu_backend \
      > "$OUT/sanitizer-$tool.log" 2>&1
    r=$?
    [ $r -ne 0 ] && rc=1
    echo "$tool: rc=$r $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer-$tool.log" | tail -1)" \
      "$(grep -E 'passed' "$OUT/sanitizer-$tool.log" | tail -1)"
  done
fi
bash scripts/compare-hashes.sh "$OUT/tests-A.log" "$OUT/tests-B.log"
exit $rc
