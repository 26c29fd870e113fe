#!/usr/bin/env bash
# Guards the prefill GEMM's pipelining (needs nvcc, no GPU): assembles cuda_grouped_gemm.cu for
# sm_90a with ptxas' report and fails if ptxas serialised any wgmma (advisories C7510-C7520:
# a branch between the MMAs of the main loop, registers it cannot spare, ...). Such a kernel
# still computes the right result but waits for every MMA, ~1.5x slower (docs/PERF.md).
# Usage: scripts/check-wgmma-async.sh [nvcc]
set -u -o pipefail
cd "$(dirname "$0")/.."
NVCC=${1:-nvcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if ! "$NVCC" -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a -Iinclude -Isrc --expt-relaxed-constexpr \
    -Xptxas -v -cubin -o "$out/gemm.cubin" src/cuda/cuda_grouped_gemm.cu > "$out/ptxas.log" 2>&1; then
  cat "$out/ptxas.log"
  echo "check-wgmma-async: the grouped GEMM did not compile"
  exit 1
fi
if grep -E "C75(1[0-9]|20)" "$out/ptxas.log"; then
  echo "check-wgmma-async: ptxas serialised wgmma in the kernels above"
  exit 1
fi
echo "check-wgmma-async: $(grep -c 'Compiling entry' "$out/ptxas.log") kernels, no wgmma serialised"
