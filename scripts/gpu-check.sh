#!/usr/bin/env bash
# One call on the GPU machine: configure and build the CUDA backend (sm_90), run the GPU tests,
# benchmark the decode path with `fp4moe bench --backend cuda`, run the PyTorch BF16 baseline
# of the same layers, and print a short table last. Logs go to $OUT (or ./out).
#
# The device image has CMake, the CUDA toolkit and PyTorch but no cJSON: carry the Debian
# packages in .deb/ (apt-get download libcjson-dev libcjson1 zlib1g-dev), which
# scripts/gpu-deps.sh unpacks into a private prefix. Usage there: bash scripts/gpu-check.sh [--sanitize|--profile] [presets] [tokens]
# (--sanitize: build, then the GPU tests' quick subset under compute-sanitizer's four tools;
#  --ep: build and run only the expert-parallel NCCL test and benchmark, one rank per GPU;
#  --large: build and run only tests/test_large_sizes.c on the CUDA backend;
#  --prefill: build, GPU tests, then the prefill benchmark (BF16 hidden states) beside the
#  PyTorch baseline and the cuBLAS BF16 GEMM rate, and the decode/prefill crossover)
# (--profile: build, then per-kernel times of the bench's graph replays under Nsight Compute;
#  --stalls: speed-of-light and warp-state sections per kernel, first preset and T).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PROFILE=0
SANITIZE=0
EP_ONLY=0
LARGE_ONLY=0
if [ "${1:-}" = "--sanitize" ]; then SANITIZE=1; shift; fi
if [ "${1:-}" = "--ep" ]; then EP_ONLY=1; shift; fi
if [ "${1:-}" = "--large" ]; then LARGE_ONLY=1; shift; fi
PREFILL=0
if [ "${1:-}" = "--prefill" ]; then PREFILL=1; shift; fi
if [ "${1:-}" = "--profile" ]; then PROFILE=1; shift; fi
if [ "${1:-}" = "--stalls" ]; then PROFILE=2; shift; fi
if [ "${1:-}" = "--prefill-profile" ]; then PROFILE=3; shift; fi
PRESETS=${1:-qwen3-30b-a3b,nemotron3-nano-30b-a3b,deepseek-v3}
TOKENS=${2:-1,4,16}
# GPU_CHECK_BUILD / GPU_CHECK_CUDA_FLAGS: another build folder with extra nvcc flags (variants
# measured side by side, e.g. GPU_CHECK_CUDA_FLAGS="-DFC1_DEPTH=3 -DFC1_MIN_BLOCKS=3")
BUILD=${GPU_CHECK_BUILD:-build-gpu}
# cJSON / zlib from the carried .deb/ (sets `extra` and LD_LIBRARY_PATH)
. scripts/gpu-deps.sh

# NCCL for the EP transport: the toolkit's if it has one, else PyTorch's nvidia-nccl wheel.
if ! ls /usr/local/cuda/lib*/libnccl.so /usr/lib/x86_64-linux-gnu/libnccl.so > /dev/null 2>&1; then
  nccl=$(python3 -c "import nvidia.nccl as m; print(list(m.__path__)[0])" 2>/dev/null)
  if [ -n "$nccl" ] && [ -f "$nccl/include/nccl.h" ]; then
    mkdir -p /tmp/nccl/lib
    ln -sf "$nccl/include" /tmp/nccl/include
    ln -sf "$(ls "$nccl"/lib/libnccl.so* | head -1)" /tmp/nccl/lib/libnccl.so
    extra+=(-DNCCL_ROOT=/tmp/nccl)
    export LD_LIBRARY_PATH="$nccl/lib:${LD_LIBRARY_PATH:-}"
  fi
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/device.txt"
echo "== configure + build"
targets="fp4moe_cli fp4moe test_gpu_backend test_ep_nccl test_large_sizes"
[ $EP_ONLY = 1 ] && targets="test_ep_nccl ep_nccl_bench"
[ $LARGE_ONLY = 1 ] && targets=test_large_sizes
gpu_build . "$BUILD" "$OUT/build.log" 16 "${GPU_CHECK_CUDA_FLAGS:-}" $targets
if [ $? -ne 0 ]; then
  tail -40 "$OUT/build.log"
  exit 1
fi

if [ $LARGE_ONLY = 1 ]; then
  FP4MOE_TEST_BACKEND=cuda "./$BUILD/test_large_sizes" 2>&1 | tee "$OUT/large-sizes.log"
  exit "${PIPESTATUS[0]}"
fi

if [ $EP_ONLY = 1 ]; then
  "./$BUILD/test_ep_nccl" 2>&1 | tee "$OUT/ep-nccl.log"
  rc=${PIPESTATUS[0]}
  echo "== EP benchmark (deepseek-v3: dispatch + experts + combine vs one GPU)"
  "./$BUILD/ep_nccl_bench" --preset deepseek-v3 --tokens "${EP_TOKENS:-16,128,1024,4096}" --repeat 10 \
    2>&1 | tee "$OUT/ep-bench.log"
  exit $rc
fi

if [ $SANITIZE = 1 ]; then
  # memcheck, racecheck, initcheck, synccheck on every 5th GPU test case; a tool's errors make
  # the test exit 3.
  rc=0
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
    FP4MOE_GPU_QUICK=1 timeout 130 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "./$BUILD/test_gpu_backend" > "$OUT/sanitizer-$tool.log" 2>&1
    r=$?
    [ $r -ne 0 ] && rc=1
    echo "$tool: rc=$r $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer-$tool.log" | tail -1)" \
      "$(grep -E 'passed' "$OUT/sanitizer-$tool.log" | tail -1)"
  done
  exit $rc
fi

if [ $PROFILE = 3 ]; then
  # prefill: per-kernel times of one call, then the grouped GEMMs' limiters (BF16 inputs)
  P=${1:-qwen3-30b-a3b}
  T=${2:-8192}
  KERNELS="regex:route_kernel|prefill_|grouped_gemm|finalize_kernel"
  ncu --metrics gpu__time_duration.sum -k "$KERNELS" --launch-skip 16 --launch-count 14 \
    "./$BUILD/fp4moe" bench --backend cuda --dtype bf16 --repeat 1 --preset "$P" --tokens "$T" 2>&1 \
    | grep -E "^  [a-zA-Z_0-9<>, ]+\(|gpu__time_duration" | paste - - \
    | sed -E 's/\(cuda_plan_view.*Device 0, CC 9.0//' | awk '{n=$1; if (n=="void") n=$2; print n, $NF}' | tee "$OUT/prefill-kernels.log"
  M="smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"
  for r in long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle not_selected \
           selected no_instruction dispatch_stall lg_throttle branch_resolving membar sleeping math_pipe_throttle; do
    M="$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
  done
  M="$M,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"
  M="$M,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
  M="$M,sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_bytes.sum.per_second,dram__bytes.sum.per_second"
  M="$M,smsp__inst_executed.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum"
  M="$M,lts__t_sectors_srcunit_tex_op_read.sum,smsp__cycles_active.avg"
  M="$M,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed"
  M="$M,l1tex__throughput.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active"
  ncu -k "regex:grouped_gemm" --launch-skip 2 --launch-count 2 --metrics "$M" \
    "./$BUILD/fp4moe" bench --backend cuda --dtype bf16 --repeat 1 --preset "$P" --tokens "$T" 2>&1 \
    | tee "$OUT/prefill-gemm.log" | grep -E "grouped_gemm|__" \
    | sed -E 's/smsp__average_warps_issue_stalled_//;s/\(cuda_plan_view.*//;s/_per_issue_active.ratio//' \
    | awk '$NF != "0" && $NF != "0.00"' | head -60
  exit 0
fi
if [ $PROFILE = 2 ]; then
  # where the warps of each kernel wait (Nsight Compute source counters), first preset/T given
  for k in front_kernel fc1_kernel fc2_kernel fc2_token_kernel finalize_kernel; do
    echo "=== $k"
    ncu -k "regex:$k" --launch-skip 5 --launch-count 1 --section SourceCounters \
      --section WarpStateStats --section SpeedOfLight "./$BUILD/fp4moe" bench --backend cuda \
      --preset "${PRESETS%%,*}" --tokens "${TOKENS%%,*}" 2>&1 | tee -a "$OUT/stalls.log" \
      | grep -E "Duration|Stall|Warp Cycles|Issued Ipc|Location|\.cu:|Throughput" | head -40
  done
  exit 0
fi
if [ $PROFILE = 1 ]; then
  for p in ${PRESETS//,/ }; do
    for t in ${TOKENS//,/ }; do
      echo "== $p T=$t"
      ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum \
        -k "regex:front_kernel|fc1_kernel|fc2_|finalize_kernel" \
        --launch-skip 60 --launch-count 10 \
        "./$BUILD/fp4moe" bench --backend cuda --dtype "${GPU_CHECK_DTYPE:-f32}" --preset "$p" --tokens "$t" 2>&1 \
        | grep -E "^  (void )?[a-z_0-9]+(<[^>]*>)?\(|gpu__time_duration" | paste - - \
        | sed -E 's/^ *(void )?([a-z_0-9]+(<[^>]*>)?).*gpu__time_duration.sum +([a-z]+) +([0-9.,]+).*$/\2 \4 \5/' \
        | tee -a "$OUT/profile.log"
    done
  done
  exit 0
fi

# the expert kernels' SASS: tensor-core MMAs and 16-byte loads expected
obj=$(find "$BUILD" -name 'cuda_experts.cu.o' | head -1)
if [ -n "$obj" ] && command -v cuobjdump > /dev/null; then
  cuobjdump --dump-sass "$obj" > "$OUT/experts.sass" 2>&1
  echo "SASS of cuda_experts: $(grep -c HMMA "$OUT/experts.sass") HMMA, $(grep -c 'LDG.E.128' "$OUT/experts.sass") LDG.E.128, $(grep -c 'LDL\|STL' "$OUT/experts.sass") local-memory ops"
fi

# GPU_CHECK_SKIP_TESTS=1: benchmarks only (after a call that ran the tests on the same tree)
SKIP=${GPU_CHECK_SKIP_TESTS:-0}
tests_rc=0
if [ "$SKIP" != 1 ]; then
echo "== GPU tests${GPU_TEST_FILTER:+ (cases matching $GPU_TEST_FILTER)}"
# GPU_TEST_FILTER=prefill: only the cases whose name contains it (FP4MOE_GPU_FILTER)
# (GPU_TEST_SHARDS processes side by side, default 8: scripts/gpu-tests.sh)
FP4MOE_GPU_FILTER=${GPU_TEST_FILTER:-} bash scripts/gpu-tests.sh "./$BUILD/test_gpu_backend" "$OUT/gpu-tests.log"
tests_rc=$?
grep -E "check failed|passed" "$OUT/gpu-tests.log" | tail -25

# The cases again under settings of the library ("KNOB=value KNOB2=value"), cases matching
# FILTER, each shard bounded by TIMEOUT seconds.
tests_under() { # "KNOB=value ..." FILTER LOG TITLE TIMEOUT
  echo "== GPU tests, $4 ($1)"
  env $1 FP4MOE_GPU_FILTER="$2" GPU_TEST_TIMEOUT="$5" bash scripts/gpu-tests.sh \
    "./$BUILD/test_gpu_backend" "$OUT/$3" || tests_rc=1
  grep -E "check failed|passed|timed out" "$OUT/$3" | tail -8
}
# the decode GEMVs run a block or a warp per tile by T and H, one-token chunks FC2 and the
# finalize as one kernel or two by H and K, and FC1 writes the FC2 inputs at T = 1: the decode
# cases again with every kernel of one kind
tests_under "FP4MOE_CUDA_DECODE_WARP_TILE=0 FP4MOE_CUDA_DECODE_TOKEN_FINALIZE=0 FP4MOE_CUDA_DECODE_FC2_DIRECT=0" \
  '!prefill' gpu-tests-warp-tile0.log "decode cases, block per tile, finalize kernel at T = 1, FC2-input kernel" 200
tests_under "FP4MOE_CUDA_DECODE_WARP_TILE=1 FP4MOE_CUDA_DECODE_TOKEN_FINALIZE=1 FP4MOE_CUDA_DECODE_FC2_DIRECT=1" \
  '!prefill' gpu-tests-warp-tile1.log "decode cases, warp per tile, FC2 + finalize kernel at T = 1, FC2 inputs by FC1" 200
tests_under FP4MOE_CUDA_MMA_SYNC=1 prefill gpu-tests-mma.log "prefill cases on the mma.sync kernels (GPUs without wgmma)" \
  "${GPU_TEST_TIMEOUT:-540}"
tests_under FP4MOE_CUDA_GEMM_ROWS=256 prefill gpu-tests-rows256.log "prefill cases on the 256-row wgmma kernels" \
  "${GPU_TEST_TIMEOUT:-540}"
fi

if [ $PREFILL = 1 ]; then
  P=${1:-qwen3-30b-a3b,deepseek-v3}
  T=${2:-32,64,256,1024,4096,8192}
  echo "== fp4moe bench (cuda, BF16 hidden states; T <= 128, the default decode_threshold, on the decode path)"
  "./$BUILD/fp4moe" bench --backend cuda --dtype bf16 --preset "$P" --tokens "$T" --repeat 50 2>&1 \
    | tee "$OUT/bench-prefill.log"
  for knob in ${PREFILL_KNOBS:-}; do # e.g. PREFILL_KNOBS="FP4MOE_CUDA_GEMM_ROWS=256 FP4MOE_CUDA_TILE_TOKENS=256"
    echo "== prefill with $knob"
    env "$knob" "./$BUILD/fp4moe" bench --backend cuda --dtype bf16 --preset "$P" \
      --tokens 1024,4096,8192 --repeat 50 2>&1 | grep -E "^(qwen3|deepseek)"
  done
  echo "== crossover: decode path (threshold 4096) vs prefill path (threshold 0), BF16"
  for th in 4096 0; do
    "./$BUILD/fp4moe" bench --backend cuda --dtype bf16 --threshold $th --preset "$P" \
      --tokens 16,32,64,96,128,192,256 2>&1 | tee -a "$OUT/crossover.log" | grep -E "^(qwen3|deepseek)"
  done
  echo "== PyTorch BF16 baseline + cuBLAS BF16 rate"
  PYTHONUNBUFFERED=1 python3 bench/torch_moe_baseline.py --cublas --preset "$P" --tokens "$T" \
    --repeat 20 2>&1 | tee "$OUT/torch-prefill.log"
  exit $tests_rc
fi

if [ "$SKIP" != 1 ]; then
echo "== Python binding on CUDA tensors (graph capture, torch.compile, C API bits)"
FP4MOE_LIBRARY="$BUILD/libfp4moe.so" PYTHONUNBUFFERED=1 python3 tests/gpu/test_torch_cuda.py \
  > "$OUT/torch-tests.log" 2>&1 || tests_rc=1
tail -12 "$OUT/torch-tests.log"

echo "== expert parallelism over NCCL (communicator of size 1)"
"./$BUILD/test_ep_nccl" > "$OUT/ep-nccl.log" 2>&1 || tests_rc=1
grep -E "check failed|passed|skipped" "$OUT/ep-nccl.log" | tail -8

echo "== 64-bit sizes on the GPU (T*k*H and FC1 bytes past 2^31)"
FP4MOE_TEST_BACKEND=cuda "./$BUILD/test_large_sizes" > "$OUT/large-sizes.log" 2>&1 || tests_rc=1
grep -E "check failed|passed" "$OUT/large-sizes.log" | tail -5
echo "== repeatability: 100 graph replays of every 5th case, each equal to the direct call bit for bit"
FP4MOE_GPU_QUICK=1 FP4MOE_GPU_REPEAT=100 timeout 240 "./$BUILD/test_gpu_backend" > "$OUT/repeat.log" 2>&1 \
  || tests_rc=1
grep -E "check failed|passed" "$OUT/repeat.log" | tail -5
fi
if [ "${GPU_CHECK_TESTS_ONLY:-0}" = 1 ]; then exit $tests_rc; fi

echo "== fp4moe bench (cuda)"
# GPU_CHECK_DTYPE=bf16: the hidden states of the decode bench (default f32; PyTorch runs BF16)
"./$BUILD/fp4moe" bench --backend cuda --dtype "${GPU_CHECK_DTYPE:-f32}" --preset "$PRESETS" --tokens "$TOKENS" \
  2>&1 | tee "$OUT/bench.log"

[ "${GPU_CHECK_NO_TORCH:-0}" = 1 ] && exit $tests_rc # GPU_CHECK_NO_TORCH=1: fp4moe bench only
echo "== PyTorch BF16 baseline"
PYTHONUNBUFFERED=1 python3 bench/torch_moe_baseline.py --preset "$PRESETS" --tokens "$TOKENS" \
  2>&1 | tee "$OUT/torch.log"

echo "== summary (GPU tests rc=$tests_rc)"
python3 - "$OUT/bench.log" "$OUT/torch.log" <<'PY'
import sys
bench, torch_ms = {}, {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 9 and f[1].isdigit():
        bench[(f[0], int(f[1]))] = f
for line in open(sys.argv[2]):
    f = line.split()
    if len(f) >= 3 and f[1].isdigit():
        try:
            torch_ms[(f[0], int(f[1]))] = float(f[2])
        except ValueError:
            pass
print(f"{'preset':24s} {'T':>4s} {'fp4moe_ms':>10s} {'floor_ms':>9s} {'ratio':>6s} {'GB/s':>7s} {'torch_ms':>9s} {'speedup':>8s}")
for key, f in bench.items():
    t = torch_ms.get(key)
    ms = float(f[2])
    print(f"{key[0]:24s} {key[1]:4d} {ms:10.4f} {float(f[5]):9.4f} {float(f[6]):6.2f} {float(f[7]):7.0f} "
          f"{(t if t else float('nan')):9.4f} {((t / ms) if t else float('nan')):8.1f}")
PY
exit $tests_rc
