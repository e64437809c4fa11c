# Fuzzing: libFuzzer harnesses of every reader of untrusted files
# (tests/fuzz/fuzz_*.c, built by `make fuzz` into build/fuzz/ with clang,
# AddressSanitizer and UBSan), run for a short while each from the seed
# corpora of tests/fuzz/corpus/, and the saved reproducers of past findings.
#
# Time: each harness runs FUZZ_SECONDS (default 60 s), two at a time (one per
# core of a 2-core CI machine): 8 harnesses take about 4 minutes. Longer runs:
# `tests/fuzz/run_smoke.sh NAME SECONDS`.
#
# The HDF5 harnesses fuzz the stored values of their seeds (data mode, see
# tests/fuzz/fuzz_common.h): fuzzing HDF5's own metadata (FUZZ_HDF5_MODE=raw)
# stops within seconds on defects of libhdf5 1.10 that the reproducers below
# already pin down.
#
# Without clang and libFuzzer (`make deps` installs them) the suite says so
# and runs nothing.
FUZZ_SECONDS=${FUZZ_SECONDS:-60}

fuzz_toolchain() {
  command -v "${FUZZ_CC:-clang}" >/dev/null 2>&1 &&
    printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { return 0; }\n' |
    "${FUZZ_CC:-clang}" -fsanitize=fuzzer -x c - -o /dev/null >/dev/null 2>&1
}

# fuzz_pair A B: the smokes of harnesses A and B side by side; fails if either does.
fuzz_pair() {
  tests/fuzz/run_smoke.sh "$1" "$FUZZ_SECONDS" > "$TEST_TMP/$1.log" 2>&1 &
  local pid=$!
  tests/fuzz/run_smoke.sh "$2" "$FUZZ_SECONDS" > "$TEST_TMP/$2.log" 2>&1
  local rb=$?
  wait $pid
  local ra=$?
  cat "$TEST_TMP/$1.log" "$TEST_TMP/$2.log"
  [ $ra -eq 0 ] && [ $rb -eq 0 ]
}
export -f fuzz_pair
export FUZZ_SECONDS

# fuzz_crasher FILE: the harness of FILE's target (its name up to the first
# '-') reads it in raw mode, without the filter of known heap defects: passes
# once the reader refuses the file cleanly.
fuzz_crasher() {
  local f=$1 target
  target=$(basename "$f")
  target=${target%%-*}
  FUZZ_HDF5_MODE=raw FUZZ_KEEP_BAD_GHEAP=1 ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
    "build/fuzz/fuzz_$target" -timeout=10 "$f"
}
export -f fuzz_crasher

if fuzz_toolchain; then
  run fuzz.build 1200 env MAKEFLAGS= make -j"$(nproc)" --no-print-directory fuzz
  run fuzz.smoke_shard+h5ad $((4 * FUZZ_SECONDS + 120)) bash -c 'fuzz_pair shard h5ad'
  run fuzz.smoke_10x_h5+mtx $((4 * FUZZ_SECONDS + 120)) bash -c 'fuzz_pair 10x_h5 mtx'
  run fuzz.smoke_checkpoint+config $((4 * FUZZ_SECONDS + 120)) bash -c 'fuzz_pair checkpoint config'
  run fuzz.smoke_manifest+vocab $((4 * FUZZ_SECONDS + 120)) bash -c 'fuzz_pair manifest vocab'
  for f in tests/fuzz/crashers/*-*; do
    run "fuzz.crasher.$(basename "$f")" 120 bash -c 'fuzz_crasher "$0"' "$f"
  done
else
  echo "fuzz: not run: clang with libFuzzer not found (make deps installs clang and libclang-rt-14-dev)"
fi

# The same reproducers through the release programs (no clang needed): a clean
# refusal naming the file, exit status 1, no signal, no hang.
fuzz_refused() {
  local f=$1
  shift
  timeout -k 5 30 "$@" > "$TEST_TMP/out.txt" 2>&1
  local rc=$?
  cat "$TEST_TMP/out.txt"
  if [ $rc -ne 1 ]; then
    echo "expected exit status 1 (a refusal), got $rc$([ $rc -eq 124 ] && echo ': a hang')$([ $rc -gt 128 ] && echo ": signal $((rc - 128))")"
    return 1
  fi
  grep -q -- "$f" "$TEST_TMP/out.txt" || { echo "the message does not name $f"; return 1; }
}
export -f fuzz_refused
for f in tests/fuzz/crashers/shard-*; do
  run "fuzz.refused.inspect.$(basename "$f")" 120 bash -c 'fuzz_refused "$0" "$BIN/perfcell-inspect" "$0" --verify' "$f"
done
