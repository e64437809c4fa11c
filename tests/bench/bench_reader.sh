#!/usr/bin/env bash
# Reader throughput, cells per second and rank, for 1 and 2 ranks: perfcell's
# training stream over pbmc3k shards (Zstandard decompression, decoding and
# shuffles included, prefetch on) against reading the same cells from the
# input .h5ad with Python (/usr/bin/python3):
#   (a) scBERT's access: anndata.read_h5ad() into memory, X[i].toarray() per cell
#   (b) anndata backed mode: read_h5ad(path, backed='r'), X[i] per cell
#   (c) h5py: X/data and X/indices sliced per cell
# Python cells are taken in a random order (a shuffled epoch, as scBERT's
# sampler does); with 2 ranks, 2 processes each read half of them at once.
#
#   bash tests/bench/bench_reader.sh      (after make; BIN, BBIN, PYTHON may be set)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${BIN:-bin} BBIN=${BBIN:-build/release/bench} PYTHON=${PYTHON:-/usr/bin/python3}
DATA=${DATA:-$ROOT/../shared/data}
IN=$DATA/pbmc3k/pbmc3k_counts.h5ad
EPOCHS=${EPOCHS:-40}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export HDF5_PLUGIN_PATH=$ROOT/lib/hdf5-plugin OPENBLAS_NUM_THREADS=1
MPIRUN=${MPIRUN:-mpirun --oversubscribe --bind-to none}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench_reader.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Shards of 1000 cells (so blocks come from three files), labelled.
"$BIN/perfcell-shard" vocab "$IN" --out "$WORK/vocab.tsv" >/dev/null
"$BIN/perfcell-shard" build "$IN" --vocab "$WORK/vocab.tsv" --out "$WORK/shards" --shard-cells 1000 \
  --label-key celltype >/dev/null

perfcell_rate() { # ranks -> cells/s of the slowest rank, best of 3 runs
  for _ in 1 2 3; do
    $MPIRUN -np "$1" "$BBIN/bench_reader" "$WORK/shards" --epochs "$EPOCHS"
  done | awk '{for (i = 1; i < NF; i++) if ($i == "cells_per_s_per_rank") print $(i + 1)}' | sort -n | tail -1
}

cat >"$WORK/baselines.py" <<'EOF'
import sys, time
from multiprocessing import Pool

import anndata
import h5py
import numpy as np

path, procs = sys.argv[1], int(sys.argv[2])
# Cells per process for each method, enough for about a second of work.
LIMIT = {"a": 2638, "b": 300, "c": 2638}


def order(n, part):
    cells = np.random.default_rng(0).permutation(n)
    return cells[part::procs]


def run(args):
    method, part = args
    if method == "a":
        t0 = time.perf_counter()
        ad = anndata.read_h5ad(path)
        load = time.perf_counter() - t0
        X = ad.X
        cells = order(X.shape[0], part)[: LIMIT["a"]]
        t0 = time.perf_counter()
        for i in cells:
            X[i].toarray()
        return len(cells) / (time.perf_counter() - t0), load
    if method == "b":
        ad = anndata.read_h5ad(path, backed="r")
        X = ad.X
        cells = order(ad.n_obs, part)[: LIMIT["b"]]
        t0 = time.perf_counter()
        for i in cells:
            X[i]
        return len(cells) / (time.perf_counter() - t0), 0.0
    with h5py.File(path, "r") as f:
        indptr = f["X/indptr"][:]
        data, indices = f["X/data"], f["X/indices"]
        cells = order(len(indptr) - 1, part)[: LIMIT["c"]]
        t0 = time.perf_counter()
        for i in cells:
            lo, hi = indptr[i], indptr[i + 1]
            data[lo:hi]
            indices[lo:hi]
        return len(cells) / (time.perf_counter() - t0), 0.0


for method in "abc":
    with Pool(procs) as pool:
        res = pool.map(run, [(method, p) for p in range(procs)])
    print(method, min(r[0] for r in res), max(r[1] for r in res))
EOF

declare -A RATE
for np in 1 2; do
  RATE[perfcell,$np]=$(perfcell_rate $np)
  while read -r m rate load; do
    RATE[$m,$np]=$rate
    if [ "$m" = a ]; then RATE[load,$np]=$load; fi
  done < <("$PYTHON" "$WORK/baselines.py" "$IN" "$np")
done

printf '\nReader throughput on pbmc3k (2,638 cells x 13,714 genes), cells/s per rank\n'
printf '(slowest rank; %s epochs for perfcell, best of 3 runs)\n\n' "$EPOCHS"
printf '%-52s %12s %12s\n' "" "1 rank" "2 ranks"
row() { printf '%-52s %12.0f %12.0f\n' "$1" "${RATE[$2,1]}" "${RATE[$2,2]}"; }
row "perfcell stream (zstd shards, prefetch)" perfcell
row "(a) anndata in memory, X[i].toarray()  [scBERT]" a
row "(b) anndata backed='r', X[i]" b
row "(c) h5py, X/data + X/indices slices" c
printf '%-52s %11.2fs %11.2fs\n' "    (a) read_h5ad() load time, not counted above" "${RATE[load,1]}" "${RATE[load,2]}"
printf '\n%-52s %11.1fx %11.1fx\n' "perfcell / (a)" \
  "$(echo "${RATE[perfcell,1]} / ${RATE[a,1]}" | bc -l)" "$(echo "${RATE[perfcell,2]} / ${RATE[a,2]}" | bc -l)"
printf '%-52s %11.1fx %11.1fx\n' "perfcell / (b)" \
  "$(echo "${RATE[perfcell,1]} / ${RATE[b,1]}" | bc -l)" "$(echo "${RATE[perfcell,2]} / ${RATE[b,2]}" | bc -l)"
printf '%-52s %11.1fx %11.1fx\n' "perfcell / (c)" \
  "$(echo "${RATE[perfcell,1]} / ${RATE[c,1]}" | bc -l)" "$(echo "${RATE[perfcell,2]} / ${RATE[c,2]}" | bc -l)"
