#!/bin/sh
# One device-tool call: build, run the whole test suite (cuda and slow tests
# included) and the given benchmark files, leaving logs and CSVs under $OUT.
#   sh bench/gpu/run.sh [test] [bench/<x>_bench_test.exs ...]
# Needs the carried .gpu/ (../shared/gpu/prepare.sh). Benchmark rows go to
# $OUT/results/*.csv (MAMBEX_RESULTS), to be appended to bench/results/.
set -u
eval "$(sh .gpu/env.sh)"
export MIX_ENV=test MAMBEX_RESULTS="$OUT/results"
# the device copy's .git may lag: pass MAMBEX_COMMIT=<sha> in the command
# (written into the CSVs' commit column)
mkdir -p "$OUT/results"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null
mix compile > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
tail -2 "$OUT/build.log"
for arg in "$@"; do
  case "$arg" in
    test)
      mix test --include cuda --include slow > "$OUT/test_gpu.log" 2>&1
      echo "test rc=$?"; grep -E "tests,|failure" "$OUT/test_gpu.log" | tail -5 ;;
    test/*)
      mix test --include cuda --include slow "$arg" >> "$OUT/test_gpu_files.log" 2>&1
      echo "$arg rc=$?"; grep -E "tests,|failure" "$OUT/test_gpu_files.log" | tail -3 ;;
    *)
      MAMBEX_BENCH=1 mix test "$arg" >> "$OUT/bench_gpu.log" 2>&1
      echo "$arg rc=$?" ;;
  esac
done
# only a few files come back from $OUT: pack the result CSVs
tar -C "$OUT" -czf "$OUT/results.tgz" results && rm -rf "$OUT/results"
