#!/usr/bin/env bash
# Runs test_gpu_backend as SHARDS processes side by side on one GPU (FP4MOE_GPU_SHARD=i/n): the
# cases' time goes to the host (random layers, quantisation, the CPU backend and the float64
# reference), which one process spends on one core. Each case's inputs depend on the seed and
# its index only, so every shard takes the one seed and the split changes no output.
# Usage: scripts/gpu-tests.sh BINARY LOG [SHARDS]   (SHARDS default GPU_TEST_SHARDS or 8)
# The environment reaches every shard (FP4MOE_GPU_FILTER, FP4MOE_CUDA_*, FP4MOE_TEST_SEED);
# GPU_TEST_TIMEOUT (seconds, default 540) bounds each shard. LOG gets the seed line, the case
# lines in list order, every other line of the shards and the summed counts (the shards' own
# logs are removed after the merge: the device returns only a few files).
# Exit status 0 only when every shard finished and no check failed.
set -u -o pipefail
bin=$1
log=$2
n=${3:-${GPU_TEST_SHARDS:-8}}
seed=${FP4MOE_TEST_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
pids=()
for i in $(seq 0 $((n - 1))); do
  FP4MOE_TEST_SEED=$seed FP4MOE_GPU_SHARD=$i/$n OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
    OMP_WAIT_POLICY=passive timeout "${GPU_TEST_TIMEOUT:-540}" "$bin" > "$log.$i" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  r=$?
  if [ $r -ne 0 ]; then
    rc=1
    [ $r -eq 124 ] && echo "shard $i/$n: timed out after ${GPU_TEST_TIMEOUT:-540} s" >> "$log.$i"
  fi
done
shard_logs=()
for i in $(seq 0 $((n - 1))); do shard_logs+=("$log.$i"); done
{
  grep -h -m1 '^test_gpu_backend: seed' "$log.0"
  grep -h -m1 '^device:' "$log.0"
  grep -h '^  #[0-9]' "${shard_logs[@]}" | sort
  grep -h -v '^  #[0-9]\|^test_gpu_backend: seed\|^device:\|passed, .* failed' "${shard_logs[@]}"
  grep -h 'passed, .* failed' "${shard_logs[@]}" | awk -v n="$n" '{p += $(NF - 3); f += $(NF - 1); k++}
    END {print "test_gpu_backend: " p " passed, " f " failed (" k " of " n " shards reported)"}'
} > "$log"
# a shard that did not report (crash, timeout) fails the run even without a failed check
grep -q "($n of $n shards reported)" "$log" || rc=1
rm -f "${shard_logs[@]}"
exit $rc
