# Shard reading: the shard reader, the training stream, perfcell-inspect.
#
# The tests read pbmc3k shards of 1000 cells (3 files, so blocks and streams
# cross shard files), built once per test run by shard_read_folder below and
# shared by the tests (each test still builds them if it runs alone).

# shard_read_folder KIND: print the path of the pbmc3k shard folder, building
# it first if needed. KIND "writer": bin/perfcell-shard; "python": the
# independent writer tests/py/stream_make_shards.py (h5py, the format spec).
shard_read_folder() {
  local kind=$1 dir=$TMPROOT/shard_read-pbmc3k-$1 in=$DATA/pbmc3k/pbmc3k_counts.h5ad
  if [ ! -f "$dir/manifest.tsv" ]; then
    rm -rf "$dir" "$dir.vocab.tsv"
    if [ "$kind" = writer ]; then
      "$BIN/perfcell-shard" vocab "$in" --out "$dir.vocab.tsv" >&2 &&
        "$BIN/perfcell-shard" build "$in" --vocab "$dir.vocab.tsv" --out "$dir" --shard-cells 1000 \
          --label-key celltype >&2 || return 1
    else
      "$PYTHON" tests/py/stream_make_shards.py "$in" --out "$dir" --shard-cells 1000 \
        --label-key celltype >&2 || return 1
    fi
  fi
  echo "$dir"
}
export -f shard_read_folder

# The stream under 1, 2 and 3 ranks: G=12, b=2 (k=6) and G=6, b=1 (k=6).
for np in 1 2 3; do
  run "shard_read.stream_G12_b2_np$np" 120 bash -c \
    "d=\$(shard_read_folder writer) && $MPIRUN -np $np \$TBIN/test_stream mpi \$d 12 2 16 3"
  run "shard_read.stream_G6_b1_np$np" 120 bash -c \
    "d=\$(shard_read_folder writer) && $MPIRUN -np $np \$TBIN/test_stream mpi \$d 6 1 64 2"
done

# The epoch rule with a remainder (G = 30 does not divide the training
# cells) under 3 ranks.
run shard_read.stream_G30_b5_np3 180 bash -c \
  "d=\$(shard_read_folder writer) && $MPIRUN -np 3 \$TBIN/test_stream mpi \$d 30 5 64 2"

# Validation split, cursor across simulated rank counts, epochs and seeds,
# reader paths (ranges, ids, content CRC).
run shard_read.unit 180 bash -c 'd=$(shard_read_folder writer) && $TBIN/test_stream unit $d'

# Cursor across processes: 150 steps on 2 ranks, save; continue 90 steps on
# 3 ranks (and on 2): the same as 240 uninterrupted steps on 1 rank (an
# epoch has about 197 steps, so the resumed part crosses an epoch).
run shard_read.cursor_mpi 180 bash -c '
  set -e
  d=$(shard_read_folder writer); t=$TEST_TMP
  $MPIRUN -np 1 $TBIN/test_stream dump $d 12 2 16 240 > $t/full.txt
  $MPIRUN -np 2 $TBIN/test_stream dump $d 12 2 16 150 --cursor-out $t/cursor.txt > $t/first.txt
  $MPIRUN -np 3 $TBIN/test_stream dump $d 12 2 16 90 --cursor-in $t/cursor.txt > $t/then3.txt
  $MPIRUN -np 2 $TBIN/test_stream dump $d 12 2 16 90 --cursor-in $t/cursor.txt > $t/then2.txt
  test $(wc -l < $t/full.txt) -eq $((240 * 6))
  cat $t/first.txt $t/then3.txt | cmp - $t/full.txt
  cat $t/first.txt $t/then2.txt | cmp - $t/full.txt
  echo "resumed 2 -> 3 and 2 -> 2 ranks equal the uninterrupted run"'

# Decoded cells equal the input read with h5py (genes, counts, totals, labels).
run shard_read.decode_vs_h5py 120 bash -c '
  set -e
  d=$(shard_read_folder writer)
  $PYTHON tests/py/stream_dump_cells.py $DATA/pbmc3k/pbmc3k_counts.h5ad $d --label-key celltype > $TEST_TMP/ref.txt
  $TBIN/test_stream compare $d $TEST_TMP/ref.txt'

# perfcell-inspect on a good folder and a good file; usage errors.
run shard_read.inspect 120 bash -c '
  set -e
  d=$(shard_read_folder writer)
  $BIN/perfcell-inspect $d --verify --cells 3 | tee $TEST_TMP/out.txt
  grep -q "cells        2,638" $TEST_TMP/out.txt
  grep -q "Naive CD4 T .* 697" $TEST_TMP/out.txt
  grep -q "all 3 shards verified" $TEST_TMP/out.txt
  $BIN/perfcell-inspect $d/shard-00001.h5ad --verify --cells 2 | tee $TEST_TMP/file.txt
  grep -q "agrees with" $TEST_TMP/file.txt
  $BIN/perfcell-inspect --help | grep -q -- --verify
  ! $BIN/perfcell-inspect $d --bogus 2> $TEST_TMP/err.txt && grep -q HINT $TEST_TMP/err.txt
  ! $BIN/perfcell-inspect $TEST_TMP 2> $TEST_TMP/err.txt && grep -q "without manifest.tsv" $TEST_TMP/err.txt
  ! $BIN/perfcell-inspect $DATA/README.md 2> $TEST_TMP/err.txt && grep -q "not an HDF5 file" $TEST_TMP/err.txt'

# Damaged folders: truncated and deleted shards, flipped bytes in chunks and
# in HDF5 metadata, bad manifest lines, wrong vocabulary, invalid content.
run shard_read.corrupt 240 bash -c \
  'd=$(shard_read_folder writer) && $PYTHON tests/py/stream_corrupt.py $d $TEST_TMP $BIN $TBIN'

# The reader follows the format, not one writer: shards written by the
# independent h5py writer read, stream and verify the same way.
run shard_read.python_writer 180 bash -c '
  set -e
  d=$(shard_read_folder python)
  $BIN/perfcell-inspect $d --verify
  $TBIN/test_stream unit $d
  $PYTHON tests/py/stream_dump_cells.py $DATA/pbmc3k/pbmc3k_counts.h5ad $d --label-key celltype > $TEST_TMP/ref.txt
  $TBIN/test_stream compare $d $TEST_TMP/ref.txt'
