#!/usr/bin/env bash
# Runs every perfcell test. One line per test (PASS/FAIL and seconds); the log
# of each test is kept in build/test-logs/. Ends with "N passed, N failed" and
# exits non-zero if any test failed.
#
#   bash tests/run.sh            every test
#   bash tests/run.sh PATTERN    only tests whose name contains PATTERN
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
export BIN=${BIN:-bin} TBIN=${TBIN:-build/release/tests} PYTHON=${PYTHON:-/usr/bin/python3}
export MODE=${MODE:-release}
export SHARED=${SHARED:-$ROOT/../shared}
export DATA=$SHARED/data
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
export HDF5_PLUGIN_PATH=$ROOT/lib/hdf5-plugin
# Sanitizer builds: Open MPI's own allocations are reported as leaks; the
# tests check our memory errors, not the MPI library's.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TMPROOT=${TMPROOT:-$ROOT/build/test-tmp}
LOGS=${LOGS:-$ROOT/build/test-logs}
rm -rf "$LOGS" "$TMPROOT"
mkdir -p "$LOGS" "$TMPROOT"
FILTER=${1:-}

passed=0
failed=0
failed_names=()

elapsed() {
  local ms=$((($(date +%s%N) - $1) / 1000000))
  printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

# run NAME TIMEOUT_SECONDS COMMAND...
run() {
  local name=$1 limit=$2
  shift 2
  [ -n "$FILTER" ] && [[ "$name" != *"$FILTER"* ]] && return 0
  local t0=$(date +%s%N)
  local dir="$TMPROOT/$name"
  mkdir -p "$dir"
  if TEST_TMP="$dir" timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
    passed=$((passed + 1))
    printf 'PASS %-44s %6ss\n' "$name" "$(elapsed "$t0")"
  else
    local rc=$?
    failed=$((failed + 1))
    failed_names+=("$name")
    printf 'FAIL %-44s %6ss (exit %d)\n' "$name" "$(elapsed "$t0")" "$rc"
    sed 's/^/    | /' "$LOGS/$name.log" | tail -n 30
  fi
}

MPIRUN="mpirun --oversubscribe --bind-to none"
export MPIRUN

for f in tests/suite_*.sh; do
  # shellcheck source=/dev/null
  . "$f"
done

echo
[ $failed -gt 0 ] && echo "failed: ${failed_names[*]}"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
