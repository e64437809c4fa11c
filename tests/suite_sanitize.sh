# Sanitizers and valgrind.
#
# AddressSanitizer + UBSan: the C unit tests, a 2-rank shard build, the
# shard reader's unit test on those shards, perfcell-inspect --verify and a
# 2-rank, 2-step pretraining, all with the DEBUG=1 programs. In a release
# test run (`make test`) the suite builds them first (build/debug/); in a
# `make test DEBUG=1` run $BIN and $TBIN already are them. Leak detection is
# on for the single-process unit tests and off under mpirun (Open MPI's own
# allocations would be reported as leaks).
#
# Valgrind (memcheck): perfcell-shard vocab and build, perfcell-inspect
# --verify and a single-process pretraining of 2 steps with a model of width
# 8, on the 10x chr21 data set (507 cells). The programs are built with
# `make VALGRIND=1` (build/valgrind/: -O0, no AVX-512, which valgrind cannot
# decode). Any memory error, and any definite leak outside Open MPI's init and
# finalize (tests/valgrind.supp), fails.
#
# About 3 minutes once built; the builds take a few minutes more on 2 cores
# the first time.

if [ "$MODE" = debug ]; then
  SAN_BIN=$BIN SAN_TBIN=$TBIN
else
  SAN_BIN=build/debug/bin SAN_TBIN=build/debug/tests
fi
SAN_UNITS="test_common test_checkpoint test_layers test_model test_inputs"
SAN_MPI_UNITS="test_contrastive"
export SAN_BIN SAN_TBIN
export VG_BIN=build/valgrind/bin

if [ "$MODE" != debug ]; then
  run sanitize.build_asan 1800 env MAKEFLAGS= make -j"$(nproc)" --no-print-directory DEBUG=1 all \
    $(for t in $SAN_UNITS $SAN_MPI_UNITS test_stream; do echo "build/debug/tests/$t"; done)
fi
# The unit tests with leak detection on (libraries' own leaks: tests/lsan.supp).
for t in $SAN_UNITS; do
  run "sanitize.asan.$t" 600 env ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
    LSAN_OPTIONS=suppressions=tests/lsan.supp:print_suppressions=0 "$SAN_TBIN/$t"
done
for t in $SAN_MPI_UNITS; do
  run "sanitize.asan.${t}_np2" 600 env ASAN_OPTIONS=detect_leaks=0 $MPIRUN -np 2 "$SAN_TBIN/$t"
done

# san_shards: print the folder of pbmc3k shards written by the ASan
# perfcell-shard on 2 ranks, building it first if needed.
san_shards() {
  local dir=$TMPROOT/sanitize-pbmc3k in=$DATA/pbmc3k/pbmc3k_counts.h5ad
  if [ ! -f "$dir/manifest.tsv" ]; then
    rm -rf "$dir" "$dir.vocab.tsv"
    "$SAN_BIN/perfcell-shard" vocab "$in" --out "$dir.vocab.tsv" --quiet >&2 &&
      $MPIRUN -np 2 "$SAN_BIN/perfcell-shard" build "$in" --vocab "$dir.vocab.tsv" --out "$dir" \
        --shard-cells 1000 --label-key celltype --quiet >&2 || return 1
  fi
  echo "$dir"
}
export -f san_shards

run sanitize.asan.shard_build_np2 600 bash -c 'd=$(san_shards) && test -f "$d/manifest.tsv"'
run sanitize.asan.test_stream_unit 600 bash -c 'd=$(san_shards) && "$SAN_TBIN/test_stream" unit "$d"'
# The epoch rule's property test, fewer combinations (unlabelled folders, pieces).
run sanitize.asan.test_stream_epochs 600 bash -c \
  'dirs=$(epoch_layouts $TEST_TMP) && "$SAN_TBIN/test_stream" epochs 24 7 $dirs'
run sanitize.asan.inspect_verify 600 bash -c 'd=$(san_shards) && "$SAN_BIN/perfcell-inspect" "$d" --verify'
run sanitize.asan.pretrain_np2 600 bash -c '
  d=$(san_shards) || exit 1
  ASAN_OPTIONS=detect_leaks=0 $MPIRUN -np 2 "$SAN_BIN/perfcell" pretrain --config configs/tiny.ini data.shards="$d" \
    run.dir="$TEST_TMP/run" run.max_steps=2 &&
  test -f "$TEST_TMP/run/checkpoints/ckpt-00000002.h5"'
# Contrastive divide and conquer: pass 2 reads its cells again (stream
# replay), sub-batches span micro-batches, blocks no larger than them.
run sanitize.asan.pretrain_contrastive_np2 600 bash -c '
  d=$(san_shards) || exit 1
  ASAN_OPTIONS=detect_leaks=0 $MPIRUN -np 2 "$SAN_BIN/perfcell" pretrain --config configs/tiny.ini data.shards="$d" \
    run.dir="$TEST_TMP/run" run.max_steps=2 contrastive.weight=0.5 contrastive.sub_batch=3 \
    contrastive.proj_dim=8 contrastive.proj_hidden=16 batch.global_batch=12 batch.micro_batch=2 \
    data.block_cells=2 > "$TEST_TMP/out.txt" 2>&1
  rc=$?
  cat "$TEST_TMP/out.txt"
  [ $rc -eq 0 ] && ! grep -q re-encoded "$TEST_TMP/out.txt" &&
  test -f "$TEST_TMP/run/checkpoints/ckpt-00000002.h5"'

# --- valgrind ---------------------------------------------------------------

# MAKEFLAGS cleared: under `make test DEBUG=1` it carries DEBUG=1.
run sanitize.build_valgrind 1800 env MAKEFLAGS= make -j"$(nproc)" --no-print-directory DEBUG= VALGRIND=1 all

# vg PROGRAM ARGS...: run under memcheck; on failure, show the report.
vg() {
  local log
  log=$(mktemp "$TEST_TMP/valgrind.XXXXXX")
  valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
    --suppressions=tests/valgrind.supp --num-callers=40 --log-file="$log" "$@"
  local rc=$?
  grep -E 'ERROR SUMMARY|definitely lost:' "$log"
  if [ $rc -ne 0 ]; then
    echo "valgrind: exit $rc for $*"
    grep -v '^==[0-9]*== *$' "$log" | head -n 150
  fi
  return $rc
}
export -f vg

# vg_shards: print the folder of chr21 shards written under valgrind,
# building it first if needed.
vg_shards() {
  local dir=$TMPROOT/valgrind-chr21 in=$DATA/10x_formats/3.0.0/filtered_feature_bc_matrix.h5
  if [ ! -f "$dir/manifest.tsv" ]; then
    rm -rf "$dir" "$dir.vocab.tsv"
    vg "$VG_BIN/perfcell-shard" vocab "$in" --out "$dir.vocab.tsv" --quiet >&2 &&
      vg "$VG_BIN/perfcell-shard" build "$in" --vocab "$dir.vocab.tsv" --out "$dir" --shard-cells 300 \
        --quiet >&2 || return 1
  fi
  echo "$dir"
}
export -f vg_shards

run sanitize.valgrind.shard_build 900 bash -c 'd=$(vg_shards) && test -f "$d/manifest.tsv"'
run sanitize.valgrind.inspect_verify 900 bash -c 'd=$(vg_shards) && vg "$VG_BIN/perfcell-inspect" "$d" --verify'
run sanitize.valgrind.pretrain 900 bash -c '
  d=$(vg_shards) || exit 1
  vg "$VG_BIN/perfcell" pretrain --config configs/tiny.ini data.shards="$d" run.dir="$TEST_TMP/run" \
    run.max_steps=2 run.val_every=0 model.dim=8 model.ff_dim=16 &&
  test -f "$TEST_TMP/run/checkpoints/ckpt-00000002.h5"'
