# Shared set-up of the benchmark scripts (sourced from the repository root).
#
#   bench_setup NAME       environment for mpirun as root, one OpenBLAS thread,
#                          the zstd HDF5 plugin; $WORK, a scratch folder
#                          removed on exit
#   bench_pbmc_shards      pbmc3k shards (cell-type labels) in $WORK/shards
BIN=${BIN:-bin} PYTHON=${PYTHON:-/usr/bin/python3}
DATA=${DATA:-$PWD/../shared/data}
MPIRUN=${MPIRUN:-mpirun --oversubscribe --bind-to none}

bench_setup() {
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
  export HDF5_PLUGIN_PATH=$PWD/lib/hdf5-plugin
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench_$1.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
}

bench_pbmc_shards() {
  "$BIN/perfcell-shard" vocab "$DATA/pbmc3k/pbmc3k_counts.h5ad" --out "$WORK/vocab.tsv" >/dev/null
  "$BIN/perfcell-shard" build "$DATA/pbmc3k/pbmc3k_counts.h5ad" --vocab "$WORK/vocab.tsv" --out "$WORK/shards" \
    --label-key celltype >/dev/null
}
