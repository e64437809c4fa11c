#!/usr/bin/env bash
# Benchmark of `perfcell-shard build` on pbmc3k (2,638 cells x 13,714 genes):
# cells/s with 1 and 2 ranks (best of REPEAT runs, the build's own clock, so
# without mpirun's start-up), and the size of the shard folder against the
# input .h5ad (gzip level 4 inside) and against the input compressed whole
# with gzip -6.
#
#   BIN=bin bash tests/bench/bench_shard_build.sh [INPUT.h5ad]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin}
DATA=${DATA:-$PWD/../shared/data}
INPUT=${1:-$DATA/pbmc3k/pbmc3k_counts.h5ad}
REPEAT=${REPEAT:-3}
MPIRUN=${MPIRUN:-mpirun --oversubscribe --bind-to none}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench_shard_build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

"$BIN/perfcell-shard" vocab "$INPUT" --out "$TMP/vocab.tsv" --quiet
input_bytes=$(stat -c %s "$INPUT")
gzip_bytes=$(gzip -6 -c "$INPUT" | wc -c)

printf '%-6s %10s %10s %12s %12s %8s %9s %9s\n' ranks seconds cells/s folder_bytes shard_bytes X_ratio vs_h5ad vs_gzip
for np in 1 2; do
  best=""
  for ((r = 0; r < REPEAT; r++)); do
    out=$($MPIRUN -np "$np" "$BIN/perfcell-shard" build "$INPUT" --vocab "$TMP/vocab.tsv" \
      --out "$TMP/shards" --force)
    s=$(sed -n 's/^time \([0-9.]*\) s on.*/\1/p' <<<"$out")
    if [ -z "$best" ] || awk "BEGIN{exit !($s < $best)}"; then best=$s; fi
    ratio=$(sed -n 's/.*stored, ratio \([0-9.]*\)$/\1/p' <<<"$out")
  done
  cells=$(awk -F'\t' '$1 == "#n_cells" {print $2}' "$TMP/shards/manifest.tsv")
  shard_bytes=$(awk -F'\t' '/^shard-/ {s += $6} END {print s}' "$TMP/shards/manifest.tsv")
  folder_bytes=$(du -cb "$TMP/shards"/* | tail -1 | cut -f1)
  printf '%-6s %10s %10.0f %12s %12s %8s %8.1f%% %8.1f%%\n' "$np" "$best" \
    "$(awk "BEGIN{print $cells / $best}")" "$folder_bytes" "$shard_bytes" "$ratio" \
    "$(awk "BEGIN{print 100 * $folder_bytes / $input_bytes}")" \
    "$(awk "BEGIN{print 100 * $folder_bytes / $gzip_bytes}")"
done
echo "input: $INPUT, $input_bytes bytes (.h5ad), $gzip_bytes bytes with gzip -6"
echo "X_ratio: X/data + X/indices as int32 over their stored size (shuffle + Zstandard)"
