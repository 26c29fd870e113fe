#!/usr/bin/env bash
# Compile-time variants side by side on the GPU machine in one call: each VARIANT is a set of
# nvcc flags (e.g. "-DWT_DEPTH=3", or "base" for none), optionally followed by "@" and
# environment settings the library reads, comma-separated ("base@FP4MOE_CUDA_DECODE_WARP_TILE=0");
# every variant is built into its own folder (the fp4moe tool only), then `fp4moe bench` runs on
# each in turn, VAR_ROUNDS rounds, and a table of the median-of-rounds times (ms) is printed
# last. Logs in $OUT (each variant's whole bench output in bench-raw<j>.log: kernels' own prints too).
#   VARIANTS="base|-DFC2_WT_BLOCKS_1PART=8|..." VAR_PRESETS=... VAR_TOKENS=1,4,16 VAR_DTYPES=bf16
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
. scripts/gpu-deps.sh > /dev/null 2>&1
IFS='|' read -r -a variants <<< "${VARIANTS:-base}"
i=0
for v in "${variants[@]}"; do
  flags=${v%%@*}; [ "$flags" = base ] && flags=
  ( gpu_build . build-var$i "$OUT/build$i.log" 8 "$flags" fp4moe_cli fp4moe \
    || echo "variant $i ($v): build failed" ) &
  i=$((i + 1))
done
wait
P="--backend cuda --preset ${VAR_PRESETS:-qwen3-30b-a3b,nemotron3-nano-30b-a3b,deepseek-v3} --tokens ${VAR_TOKENS:-1,4,16}"
for dtype in ${VAR_DTYPES:-bf16}; do
  for round in $(seq 1 ${VAR_ROUNDS:-2}); do
    for j in $(seq 0 $((i - 1))); do
      v=${variants[$j]}; settings=; [[ "$v" == *@* ]] && settings=$(echo "${v#*@}" | tr ',' ' ')
      env $settings build-var$j/fp4moe bench $P --dtype $dtype 2>&1 | tee -a "$OUT/bench-raw$j.log" \
        | awk -v tag="$j $dtype r$round" '$2 ~ /^[0-9]+$/ {print tag, $1, $2, $3, $7}' >> "$OUT/bench.txt"
    done
  done
done
for j in $(seq 0 $((i - 1))); do echo "variant $j: ${variants[$j]}"; done
python3 - "$OUT/bench.txt" <<'PY'
import sys, collections, statistics
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    v, dtype, rnd, preset, t, ms, ratio = line.split()
    d[(dtype, preset, int(t), int(v))].append(float(ms))
keys = sorted({k[:3] for k in d})
nv = max(k[3] for k in d) + 1
print("dtype preset T " + " ".join("v%d" % j for j in range(nv)))
for k in keys:
    print(k[0], k[1][:12], k[2], " ".join("%.4f" % statistics.median(d.get(k + (j,), [0])) for j in range(nv)))
PY
