#!/usr/bin/env bash
# Run one libFuzzer harness for a while:
#
#   tests/fuzz/run_smoke.sh NAME SECONDS [libFuzzer options...]
#
# NAME is a harness of build/fuzz/ without its fuzz_ prefix (shard, h5ad,
# 10x_h5, mtx, checkpoint, config, manifest, vocab; `make fuzz` builds them).
# The seeds of tests/fuzz/corpus/NAME/ are copied to a scratch corpus (the
# tracked corpus is never modified) and the harness runs for SECONDS with a
# 10 s limit per input and 2 GiB of memory. Prints the executions run and
# exits non-zero on any crash, timeout or out-of-memory; the input at fault is
# kept in the scratch folder ($TEST_TMP, or a temporary folder) and its path
# printed. Reproduce with:
#   FUZZ_TEMPLATES=tests/fuzz/corpus/NAME build/fuzz/fuzz_NAME FILE
#
# The HDF5 harnesses (shard, h5ad, 10x_h5, checkpoint) fuzz the stored values
# of their seeds by default; FUZZ_HDF5_MODE=raw fuzzes every byte of the file,
# HDF5's own metadata included (tests/fuzz/fuzz_common.h explains both).
set -u
cd "$(dirname "$0")/../.."
if [ $# -lt 2 ]; then
  echo "usage: $0 NAME SECONDS [libFuzzer options...]" >&2
  exit 2
fi
name=$1 seconds=$2
shift 2
fuzzer=build/fuzz/fuzz_$name
seeds=tests/fuzz/corpus/$name
if [ ! -x "$fuzzer" ]; then
  echo "$fuzzer is missing: run 'make fuzz' (needs clang with libFuzzer)" >&2
  exit 2
fi
if [ ! -d "$seeds" ]; then
  echo "no seed corpus $seeds" >&2
  exit 2
fi
scratch=${TEST_TMP:-}
if [ -z "$scratch" ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
fi
work=$scratch/fuzz-$name
rm -rf "$work"
mkdir -p "$work/corpus" "$work/artifacts" "$work/tmp"
cp "$seeds"/* "$work/corpus/"

# Leak checks stay on (HDF5's own leaks are suppressed inside the harnesses);
# the harnesses' temporary files go to a folder of their own.
# allocator_may_return_null: an impossible allocation returns NULL as in a
# release build (HDF5 then reports an error; our xmalloc dies, which the
# harnesses turn into a crash).
export ASAN_OPTIONS=${FUZZ_ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:allocator_may_return_null=1}
export FUZZ_TEMPLATES=$PWD/$seeds
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TMPDIR=$work/tmp
log=$work/fuzz.log
echo "fuzz_$name: $seconds s, corpus $(ls "$seeds" | wc -l) seeds from $seeds${FUZZ_HDF5_MODE:+, HDF5 mode $FUZZ_HDF5_MODE}"
"$fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$work/artifacts/" "$@" "$work/corpus" >"$log" 2>&1
rc=$?
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
# (-fork=N runs print no final stats: take the last progress line's count)
[ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9][0-9]*\)[:[:space:]].*/\1/p' "$log" | tail -n 1)
grep -E '^(INFO: Seed|#[0-9]+ +DONE|stat::)' "$log"
echo "fuzz_$name: ${execs:-?} executions in $seconds s, corpus now $(ls "$work/corpus" | wc -l) inputs, exit $rc"
found=$(ls "$work/artifacts")
if [ "$rc" -ne 0 ] || [ -n "$found" ]; then
  echo "fuzz_$name: FAILED: a crash, timeout or out-of-memory (exit $rc)"
  grep -E -A40 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error|^fuzz: |ALARM' "$log" | head -n 80
  for f in $found; do echo "  input kept: $work/artifacts/$f"; done
  exit 1
fi
