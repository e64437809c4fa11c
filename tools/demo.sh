#!/usr/bin/env bash
# `make demo`: the main job on the bundled real data set (pbmc3k, 2,638 cells):
#   1. shard it (vocabulary, zstd shards, verify);
#   2. pretrain a small Performer with masked-expression learning on 2 ranks
#      (the validation masked loss falls; metrics and a plot are written);
#   3. fine-tune it for cell-type annotation on a stratified 80/20 split
#      (random_state 2021, 10% of the training part for early stopping);
#   4. annotate the held-out test cells with `perfcell predict` and compare
#      the macro-F1 with logistic regression on log2(1 + CP10k), same split;
#   5. write cell embeddings with `perfcell embed`.
# Everything goes to runs/demo/ (and shards/pbmc3k_demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-bin}
PYTHON=${PYTHON:-/usr/bin/python3}
DATA=tests/data/pbmc3k_counts.h5ad
OUT=runs/demo
SHARDS=shards/pbmc3k_demo
NP=${NP:-2}
CORES=$(nproc)
export OPENBLAS_NUM_THREADS=$(( CORES / NP > 0 ? CORES / NP : 1 ))
export HDF5_PLUGIN_PATH=$ROOT/lib/hdf5-plugin
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
MPIRUN=(mpirun -np "$NP" --bind-to none)
[ "$NP" -gt "$CORES" ] && MPIRUN+=(--oversubscribe)
# OpenBLAS 0.3.21 runs AVX2 (Haswell) SGEMM kernels on AVX-512 CPUs it takes
# for Cooper Lake (and whenever OPENBLAS_CORETYPE=Haswell is set); its SkylakeX
# kernels are about 1.6x faster there. PERFCELL_OPENBLAS_CORETYPE chooses.
if [ -n "${PERFCELL_OPENBLAS_CORETYPE:-}" ]; then
  export OPENBLAS_CORETYPE=$PERFCELL_OPENBLAS_CORETYPE
elif grep -q avx512f /proc/cpuinfo; then
  export OPENBLAS_CORETYPE=SKYLAKEX
fi
t_start=$(date +%s)
step() { printf '\n=== %s (%ds)\n' "$1" $(($(date +%s) - t_start)); }

rm -rf "$OUT"
mkdir -p "$OUT"

step "1. Shards"
"$BIN/perfcell-shard" vocab "$DATA" --out "$OUT/vocab.tsv" --force
"${MPIRUN[@]}" "$BIN/perfcell-shard" build "$DATA" --vocab "$OUT/vocab.tsv" --out "$SHARDS" \
  --label-key celltype --force
"$BIN/perfcell-inspect" "$SHARDS" --verify

step "2. Pretraining (masked expression, $NP ranks)"
"${MPIRUN[@]}" "$BIN/perfcell" pretrain --config configs/pbmc_demo.ini data.shards="$SHARDS" run.dir="$OUT/pretrain"
"$PYTHON" tools/plot_metrics.py "$OUT/pretrain/metrics.jsonl" -o "$OUT/pretrain/metrics.png" --title "perfcell pretraining on pbmc3k"
"$PYTHON" - "$OUT/pretrain/metrics.jsonl" <<'PY'
import json, sys
val = [json.loads(l) for l in open(sys.argv[1]) if '"val_loss"' in l]
first, last = val[0], val[-1]
print(f"validation masked loss: step {first['step']}: {first['val_loss']:.4f} -> step {last['step']}: "
      f"{last['val_loss']:.4f} ({100 * (1 - last['val_loss'] / first['val_loss']):.0f}% lower); "
      f"masked accuracy {first['val_acc']:.3f} -> {last['val_acc']:.3f}")
if not last["val_loss"] < first["val_loss"]:
    sys.exit("the validation loss did not fall")
PY

step "3. Split and the logistic-regression baseline"
"$PYTHON" tools/annotation_eval.py split "$DATA" --label-key celltype --out "$OUT/eval"

step "4. Fine-tuning for cell-type annotation ($NP ranks)"
CKPT=$(ls "$OUT"/pretrain/checkpoints/ckpt-*.h5 | tail -1)
"${MPIRUN[@]}" "$BIN/perfcell" finetune --config configs/pbmc_finetune.ini --init "$CKPT" \
  data.shards="$SHARDS" run.dir="$OUT/finetune" finetune.split_file="$OUT/eval/split.tsv"

step "5. Prediction on the held-out cells"
"$BIN/perfcell" predict --checkpoint "$OUT/finetune/best" --input "$SHARDS" --out "$OUT/predictions.tsv" \
  --report "$OUT/predict_report"
"$PYTHON" tools/annotation_eval.py compare "$OUT/eval/baseline.json" "$OUT/finetune/report_test.tsv"

step "6. Cell embeddings"
"$BIN/perfcell" embed --checkpoint "$OUT/finetune/best" --input "$SHARDS" --out "$OUT/cells.h5ad"
"$PYTHON" -c "import anndata; a = anndata.read_h5ad('$OUT/cells.h5ad'); print(a)"

step "Done"
cat <<EOF
Results in $OUT/:
  pretrain/metrics.jsonl, pretrain/metrics.png   pretraining curves
  finetune/report_test.{tsv,svg}                 test-cell accuracy, macro-F1, confusion matrix
  predictions.tsv                                every cell: prediction, probability (Unassigned below 0.5)
  cells.h5ad                                     obsm['X_perfcell'] embeddings (anndata)
EOF
