#!/usr/bin/env bash
# A/B of two trees on the GPU machine in one call: this working tree ("b") and another tree
# given as a tarball ("a", made here with `git archive REV -o build-ab/a.tar` and carried with
# the call: carry ["build-ab", ".deb"]). Both are built side by side; the GPU tests run on both
# with one seed (decode cases only by default: GPU_TEST_FILTER=!prefill; "b" under each setting of
# AB_TEST_ENV, logs tests-b0.log, tests-b1.log, ...) and their per-case output hashes are
# compared; then `fp4moe bench` runs alternately on both, FP32 and BF16 hidden states,
# under each setting of AB_KNOBS (environment settings the library reads, e.g. AB_KNOBS="FP4MOE_CUDA_TILE_TOKENS=64"). Logs in $OUT.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/ab-a
# (no build-ab/a.tar: "b" alone, each knob against b's default. The tests of "a" run through
# scripts/gpu-tests.sh: "a" must know FP4MOE_GPU_SHARD, i.e. be main of session 6 or later)
HAVE_A=0
[ -f build-ab/a.tar ] && HAVE_A=1
if [ $HAVE_A = 1 ]; then
  tar -xf build-ab/a.tar -C /tmp/ab-a && cp -r .deb /tmp/ab-a/ 2>/dev/null
  # build only (the --stalls mode builds, then profiles a preset that does not exist)
  (cd /tmp/ab-a && OUT=$OUT/a GPU_CHECK_SKIP_TESTS=1 bash scripts/gpu-check.sh --stalls none 1 > /dev/null 2>&1) &
fi
OUT=$OUT/b GPU_CHECK_SKIP_TESTS=1 bash scripts/gpu-check.sh --stalls none 1 > /dev/null 2>&1
wait
lib=$(dirname "$(find /tmp/fp4moe-deps -name 'libcjson.so*' | head -1)")
export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
A=/tmp/ab-a/build-gpu B=build-gpu
ls "$B/test_gpu_backend" > /dev/null || { tail -20 "$OUT"/*/build.log; exit 1; }
[ $HAVE_A = 1 ] || A=$B
SEED=${AB_SEED:-12345}
# AB_TEST_ENV: "b"'s tests once under each of these settings (a comma-joined item sets several,
# the item "b" a run without; default: one run without), each compared with "a"'s. The seed and
# filter stay the script's.
i=0
for v in $([ $HAVE_A = 1 ] && echo a) ${AB_TEST_ENV:-b}; do
  [ "${GPU_TEST_FILTER:-}" = none ] && break
  bin=$B tag=b$i settings=$v
  if [ $v = a ]; then bin=$A tag=a settings=; elif [ $v = b ]; then settings=; fi
  [ $v = a ] || i=$((i + 1))
  env $(echo "$settings" | tr ',' ' ') FP4MOE_TEST_SEED=$SEED FP4MOE_GPU_FILTER=${GPU_TEST_FILTER:-!prefill} \
    GPU_TEST_TIMEOUT=${AB_TEST_TIMEOUT:-240} bash scripts/gpu-tests.sh "$bin/test_gpu_backend" "$OUT/tests-$tag.log"
  echo "tests $tag${settings:+ ($settings)}: rc=$? $(grep -E 'passed' "$OUT/tests-$tag.log" | tail -1)"
  grep -E "check failed" "$OUT/tests-$tag.log" | head -5
  # cases both ran (same index #NNN): their output hashes must agree
  if [ $v != a ] && [ -f "$OUT/tests-a.log" ]; then
    bash scripts/compare-hashes.sh "$OUT/tests-a.log" "$OUT/tests-$tag.log"
  fi
done
# GPU_TEST_HANG: a case name run alone under each knob with a short timeout (hang diagnosis)
if [ -n "${GPU_TEST_HANG:-}" ]; then
  for knob in "" ${AB_KNOBS:-}; do
    env $(echo "$knob" | tr ',' ' ') FP4MOE_TEST_SEED=$SEED FP4MOE_GPU_FILTER="$GPU_TEST_HANG" timeout 30 \
      "$B/test_gpu_backend" > "$OUT/hang.log" 2>&1
    echo "hang check '${GPU_TEST_HANG}' knob '${knob:-default}': rc=$? $(tail -1 "$OUT/hang.log")"
  done
fi
# benches: "a" once per round and dtype; "b" under each knob (a knob item may join several
# settings with commas, e.g. FP4MOE_CUDA_TILE_TOKENS=64,FP4MOE_CUDA_GEMM_ROWS=256)
P="--backend cuda --preset ${AB_PRESETS:-qwen3-30b-a3b,nemotron3-nano-30b-a3b,deepseek-v3} --tokens ${AB_TOKENS:-1,4,16}"
for dtype in ${AB_DTYPES:-f32 bf16}; do
  for round in $(seq 1 ${AB_ROUNDS:-2}); do
    [ $HAVE_A = 1 ] && "$A/fp4moe" bench $P --dtype $dtype 2>&1 \
      | awk -v tag="a $dtype default r$round" '$2 ~ /^[0-9]+$/ {print tag, $1, $2, $3, $7}' >> "$OUT/bench.txt"
    for knob in "" ${AB_KNOBS:-}; do
      env $(echo "$knob" | tr ',' ' ') "$B/fp4moe" bench $P --dtype $dtype 2>&1 \
        | awk -v tag="b $dtype ${knob:-default} r$round" '$2 ~ /^[0-9]+$/ {print tag, $1, $2, $3, $7}' >> "$OUT/bench.txt"
    done
  done
done
# summary: each (knob, dtype, preset, T): both rounds of a (default) and of b under the knob
python3 - "$OUT/bench.txt" <<'PY'
import sys, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    v, dt, knob, r, preset, t, ms, ratio = line.split()
    d[(knob, dt, preset, int(t), v)].append(float(ms))
keys = sorted({k[:4] for k in d if k[4] == 'b'})
print(f"{'knob':28s} {'dtype':5s} {'preset':24s} {'T':>4s} {'a ms':>14s} {'b ms':>14s} {'b/a':>6s}")
for k in keys:
    a = d.get(('default',) + k[1:] + ('a',), []) or d.get(('default',) + k[1:] + ('b',), [])
    b = d.get(k + ('b',), [])
    if a and b:
        print(f"{k[0].replace('FP4MOE_CUDA_', '')[-28:]:28s} {k[1]:5s} {k[2]:24s} {k[3]:4d} {'/'.join(f'{x:.3f}' for x in a):>14s} "
              f"{'/'.join(f'{x:.3f}' for x in b):>14s} {min(b) / min(a):6.3f}")
PY
