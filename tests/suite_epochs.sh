# Epoch coverage: every training cell once per epoch but the remainder's
# moving window, the same global batches on 1, 2 and 3 ranks, exact resume,
# bounded block reads (stream.h), over random geometries and shard layouts.

# epoch_layouts DIR: small shard folders of several layouts under DIR (one
# shard; uneven shards; shards of 3 cells; the C writer's shards over three
# inputs; 11 cells; 1000 cells in shards of 333). Prints the folders.
epoch_layouts() {
  local d=$1 py=tests/py/stream_make_shards.py tiny=tests/py/stream_tiny_h5ad.py
  mkdir -p "$d"
  "$PYTHON" $tiny "$d/a.h5ad" 97 1 && "$PYTHON" $py "$d/a.h5ad" --out "$d/one" --shard-cells 1000 &&
    "$PYTHON" $tiny "$d/b.h5ad" 300 2 &&
    "$PYTHON" $py "$d/b.h5ad" --out "$d/uneven" --shard-sizes 13,1,100,2 --shard-cells 50 &&
    "$PYTHON" $tiny "$d/c.h5ad" 120 3 && "$PYTHON" $py "$d/c.h5ad" --out "$d/tiny" --shard-cells 3 &&
    "$PYTHON" $tiny "$d/e.h5ad" 11 5 && "$PYTHON" $py "$d/e.h5ad" --out "$d/eleven" --shard-cells 4 &&
    "$PYTHON" $tiny "$d/f.h5ad" 1000 6 && "$PYTHON" $py "$d/f.h5ad" --out "$d/thousand" --shard-cells 333 &&
    "$BIN/perfcell-shard" vocab "$d/e.h5ad" --out "$d/v.tsv" --quiet &&
    "$BIN/perfcell-shard" build "$d/a.h5ad" "$d/c.h5ad" "$d/e.h5ad" --vocab "$d/v.tsv" --out "$d/writer" \
      --shard-cells 64 --quiet >&2 || return 1
  echo "$d/one $d/uneven $d/tiny $d/writer $d/eleven $d/thousand"
}
export -f epoch_layouts

# 240 random combinations (seed, validation split, block size, micro-batch,
# global batch), 40 on each layout, 3 epochs each, on 1, 2 and 3 simulated
# ranks where they divide the streams, plus a resume on other ranks.
run epochs.coverage_property 600 bash -c \
  'dirs=$(epoch_layouts $TEST_TMP) && $TBIN/test_stream epochs 240 20261204 $dirs'

