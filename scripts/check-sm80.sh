#!/usr/bin/env bash
# The CUDA sources compile for sm_80 too (the mma.sync prefill kernels and the decode path are
# the code of GPUs without wgmma; the sm_90a instructions sit behind FP4MOE_WGMMA). CI runs this
# where nvcc exists; a compile check only, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc > /dev/null || { echo "check-sm80: no nvcc, skipped"; exit 0; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in src/cuda/*.cu; do
  nvcc -arch=sm_80 -O3 -c "$f" -Isrc -Iinclude -Isrc/cuda -o "$out/$(basename "$f").o"
done
echo "check-sm80: $(ls src/cuda/*.cu | wc -l) CUDA sources compile for sm_80"
