#!/usr/bin/env bash
# The encoder against PyTorch eager (tools/perfcell_torch.py, the same model),
# both single-threaded on the same OpenBLAS, in the same run:
#   - one training step per cell (forward + MLM loss + backward), full mode,
#     for scBERT's configuration (16,906 genes + 1) and a 2,000-gene one;
#   - peak RSS of each (separate processes);
#   - perfcell's achieved GFLOP/s (matrix products) against single-thread sgemm;
#   - where perfcell's time goes (profile of the full configuration);
#   - nonzero mode on real pbmc3k cells: tokens per cell and cells/s.
#
#   bash tests/bench/bench_model.sh      (STEPS, FULL_STEPS may be set)
set -euo pipefail
cd "$(dirname "$0")/../.."
BBIN=${BBIN:-build/release/bench} BIN=${BIN:-bin} PYTHON=${PYTHON:-/usr/bin/python3}
DATA=${DATA:-$PWD/../shared/data}
STEPS=${STEPS:-3}
FULL_STEPS=${FULL_STEPS:-2}
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 HDF5_PLUGIN_PATH=$PWD/lib/hdf5-plugin
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench_model.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

field() { # line key -> value
  awk -v k="$2" '{for (i = 1; i <= NF; i++) {split($i, kv, "="); if (kv[1] == k) print kv[2]}}' <<<"$1"
}

echo "OpenBLAS core: ${OPENBLAS_CORETYPE:-auto-detected} (the same library and setting for perfcell and PyTorch)"
sg=$("$BBIN/bench_model" --sgemm)
echo "$sg" | sed 's/^/  /'
sgemm_peak=$(echo "$sg" | awk -F'gflops=' 'NR==1{print $2}')

printf '\n%-7s %-9s %12s %12s %8s %12s %12s %7s %9s %8s\n' genes side step_s torch_step_s speedup peak_rss_MB torch_rss_MB ratio GFLOP/s of_sgemm
for G in 16906 2000; do
  steps=$STEPS
  extra=()
  if [ "$G" -gt 10000 ]; then
    steps=$FULL_STEPS
    extra=(--recompute)
  fi
  c=$("$BBIN/bench_model" --mode full --genes "$G" --steps "$steps" "${extra[@]}")
  t=$("$PYTHON" tests/bench/bench_torch.py --genes "$G" --steps "$steps" --warmup 1 --timeout 3000 | grep '^torch mode=full')
  cs=$(field "$c" step_s); ts=$(field "$t" step_s)
  cr=$(field "$c" peak_rss_mb); tr=$(field "$t" peak_rss_mb)
  gf=$(field "$c" gflops)
  printf '%-7s %-9s %12.3f %12.3f %7.2fx %12.0f %12.0f %6.2fx %9.1f %7.0f%%\n' "$G" perfcell "$cs" "$ts" \
    "$(echo "$ts / $cs" | awk '{print $1 / $3}')" "$cr" "$tr" "$(echo "$cr $tr" | awk '{print $1 / $2}')" "$gf" \
    "$(echo "$gf $sgemm_peak" | awk '{print 100 * $1 / $2}')"
  echo "  perfcell: $c"
  echo "  torch:    $t"
done

echo
echo "Profile of one training step, full configuration (16,906 genes), perfcell:"
"$BBIN/bench_model" --mode full --genes 16906 --steps 1 --recompute --profile | sed -n '2,$p'

echo
echo "Nonzero mode on pbmc3k cells (first 64 cells, micro-batch 1, all nonzero genes):"
"$BIN/perfcell-shard" vocab "$DATA/pbmc3k/pbmc3k_counts.h5ad" --out "$WORK/vocab.tsv" >/dev/null
"$BIN/perfcell-shard" build "$DATA/pbmc3k/pbmc3k_counts.h5ad" --vocab "$WORK/vocab.tsv" --out "$WORK/shards" >/dev/null
c=$("$BBIN/bench_model" --mode nonzero --shards "$WORK/shards" --cells 65 --steps 64 --micro-batch 1)
t=$("$PYTHON" tests/bench/bench_torch.py --no-full --nonzero-h5ad "$DATA/pbmc3k/pbmc3k_counts.h5ad" \
  --nonzero-cells 64 --micro-batch 1 --timeout 3000 | grep '^torch mode=nonzero')
echo "  perfcell: cells/s $(field "$c" cells_per_s), tokens per cell $(field "$c" tokens_per_cell), peak RSS $(field "$c" peak_rss_mb) MB"
echo "  torch:    $t"
