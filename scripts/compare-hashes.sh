#!/usr/bin/env bash
# The per-case output hashes of two test_gpu_backend logs (scripts/gpu-tests.sh, one seed):
# cases both ran (same index #NNN) must print the same hash (the last field) exactly when their
# output bits agree. Prints each differing case's index, then the counts.
# Usage: scripts/compare-hashes.sh A.log B.log
join <(grep -E '^  #[0-9]+ .* out [0-9a-f]{16}$' "$1" | awk '{print $1, $NF}') \
     <(grep -E '^  #[0-9]+ .* out [0-9a-f]{16}$' "$2" | awk '{print $1, $NF}') \
  | awk '{n++; if ($2 != $3) {d++; print "  differs: " $1}} END {print "output hashes: " n+0 " compared, " d+0 " differ"}'
