#!/usr/bin/env bash
# Measurement only (results are wrong on purpose): the prefill layer's time with parts of the
# grouped GEMM's work removed, to see what bounds it. Variants are copies of this tree with one
# edit each, built side by side (the CLI only), benched alternately; then Nsight Compute on the
# unedited build: per-kernel times and the FC1 GEMM's stall sampling. The device returns at most
# 8 files: builds log to /tmp (a failed one is printed), the rest goes to 4 files in $OUT.
# Usage (one device call, carry [".deb"]): bash scripts/prefill-ablate.sh; docs/PERF.md, prefill v9.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
ls .deb/*.deb > /dev/null 2>&1 || { echo "prefill-ablate: carry .deb (the cJSON/zlib packages)"; exit 1; }
. scripts/gpu-deps.sh # sets `extra` and LD_LIBRARY_PATH
VARIANTS=${ABL_VARIANTS:-base nodecode nomma noepi noload}
for v in $VARIANTS; do
  d=/tmp/abl/$v
  rm -rf "$d" && mkdir -p "$d"
  tar --exclude='./build*' --exclude=./.git --exclude=./out -cf - . | tar -xf - -C "$d"
  python3 scripts/prefill_ablate_patch.py "$v" "$d/src/cuda/cuda_grouped_gemm.cu" || exit 1
  (gpu_build "$d" "$d/build" "/tmp/abl/build-$v.log" 4 "" fp4moe_cli \
   || { echo "build $v failed"; tail -20 "/tmp/abl/build-$v.log"; }) &
done
wait
B="--backend cuda --dtype bf16 --repeat 50"
for round in 1 2; do
  for v in $VARIANTS; do
    [ -x /tmp/abl/$v/build/fp4moe ] || continue
    for spec in "qwen3-30b-a3b 1024,8192" "deepseek-v3 8192"; do
      set -- $spec
      /tmp/abl/$v/build/fp4moe bench $B --preset "$1" --tokens "$2" 2>&1 \
        | awk -v v=$v -v r=$round '$2 ~ /^[0-9]+$/ {print v, r, $1, $2, $3}' >> "$OUT/ablate.txt"
    done
  done
done
BIN=/tmp/abl/base/build/fp4moe
for t in 1024 8192; do
  echo "== per-kernel us, qwen3 T=$t (ncu, base clocks)"
  ncu --metrics gpu__time_duration.sum -k "regex:route_kernel|prefill_|grouped_gemm|finalize_kernel|front" \
    --launch-skip 16 --launch-count 14 "$BIN" bench --backend cuda --dtype bf16 --repeat 1 \
    --preset qwen3-30b-a3b --tokens $t 2>&1 | grep -E "^  [a-zA-Z_0-9<>, ]+\(|gpu__time_duration" | paste - - \
    | sed -E 's/\(cuda_plan_view.*Device 0, CC 9.0//' | awk '{n=$1; if (n=="void") n=$2; print n, $NF}' \
    | tee -a "$OUT/kernels.log"
done
echo "== FC1 GEMM stall sampling, qwen3 T=8192"
ncu -k "regex:grouped_gemm_kernel" --launch-skip 2 --launch-count 1 --section SourceCounters \
  --section WarpStateStats --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
  --print-details all "$BIN" bench --backend cuda --dtype bf16 --repeat 1 --preset qwen3-30b-a3b --tokens 8192 \
  > "$OUT/stalls-fc1.log" 2>&1
grep -E "Duration|Stall|Warp Cycles|Issue|Pipe|Throughput|Occupancy|Registers|Active Warps" "$OUT/stalls-fc1.log" | head -50
echo "== ablation (ms, two rounds)"
python3 - "$OUT/ablate.txt" <<'PY'
import sys, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    v, r, p, t, ms = line.split()
    d[(p, int(t), v)].append(float(ms))
vs = []
for k in d:
    if k[2] not in vs: vs.append(k[2])
print(f"{'preset':16s} {'T':>5s} " + " ".join(f"{v:>13s}" for v in vs))
for p, t in sorted({(k[0], k[1]) for k in d}):
    print(f"{p[:16]:16s} {t:5d} " + " ".join(f"{'/'.join(f'{x:.3f}' for x in d[(p, t, v)]):>13s}" for v in vs))
PY
