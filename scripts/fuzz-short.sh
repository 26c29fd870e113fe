#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/fuzz_*.c) with clang and runs each for a short while on its
# seed corpus. New inputs go to a scratch corpus in the build directory, so the checked-in seeds
# stay small; crashes are written there too and make the script fail.
#   FUZZ_SECONDS   seconds per target (default 20)
#   FUZZ_BUILD_DIR build directory (default build-fuzz in the repository)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}
seconds=${FUZZ_SECONDS:-20}
jobs=$(nproc 2>/dev/null || echo 2)

cmake -S "$root" -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DFP4MOE_FUZZ=ON -DFP4MOE_CUDA=OFF >/dev/null

targets=()
for source in "$root"/fuzz/fuzz_*.c; do
    targets+=("$(basename "$source" .c)")
done
cmake --build "$build" -j"$jobs" --target "${targets[@]}"

status=0
for target in "${targets[@]}"; do
    scratch="$build/fuzz-work/$target"
    mkdir -p "$scratch/corpus" "$scratch/artifacts"
    dict="$root/fuzz/${target#fuzz_}.dict"
    dict_option=()
    [[ -f "$dict" ]] && dict_option=(-dict="$dict")
    echo "== $target: ${seconds}s"
    if ! "$build/$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
            -print_final_stats=1 "${dict_option[@]}" -artifact_prefix="$scratch/artifacts/" \
            "$scratch/corpus" "$root/fuzz/corpus/$target" 2>"$scratch/log"; then
        echo "!! $target failed; log: $scratch/log, inputs: $scratch/artifacts/"
        tail -n 40 "$scratch/log"
        status=1
    else
        grep -E '^stat::number_of_executed_units|^Done' "$scratch/log" || true
    fi
done
exit $status
