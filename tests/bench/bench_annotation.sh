#!/usr/bin/env bash
# Cell-type annotation against logistic regression, on real data sets:
# shard -> short pretraining (masked expression, 2 ranks) -> fine-tuning ->
# held-out test cells, beside logistic regression on log2(1 + CP10k) with the
# same stratified 80/20 split (scikit-learn, random_state 2021; 10% of the
# training part for early stopping). Prints macro-F1 and accuracy of both and
# how long perfcell took on this machine.
#
#   bash tests/bench/bench_annotation.sh [pbmc3k] [bladder]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin} PYTHON=${PYTHON:-/usr/bin/python3}
DATA=${DATA:-$PWD/../shared/data}
STEPS=${STEPS:-800}
NP=${NP:-2}
MPIRUN=${MPIRUN:-mpirun --oversubscribe --bind-to none}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export HDF5_PLUGIN_PATH=$PWD/lib/hdf5-plugin
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench_annotation.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(pbmc3k bladder)

for name in "${sets[@]}"; do
  case $name in
    pbmc3k) input=$DATA/pbmc3k/pbmc3k_counts.h5ad ;;
    bladder) input=$DATA/other/mouse_bladder_top2000.h5ad ;;
    *) echo "unknown data set $name (pbmc3k, bladder)"; exit 2 ;;
  esac
  w=$WORK/$name
  mkdir -p "$w"
  echo "--- $name: $input"
  t0=$(date +%s)
  "$BIN/perfcell-shard" vocab "$input" --out "$w/vocab.tsv" >/dev/null
  "$BIN/perfcell-shard" build "$input" --vocab "$w/vocab.tsv" --out "$w/shards" --label-key celltype >/dev/null
  "$PYTHON" tools/annotation_eval.py split "$input" --label-key celltype --out "$w/eval" 2>/dev/null | sed 's/^/  /'
  t1=$(date +%s)
  $MPIRUN -np "$NP" "$BIN/perfcell" pretrain --config configs/pbmc_demo.ini data.shards="$w/shards" \
    run.dir="$w/pretrain" run.max_steps="$STEPS" run.log_every="$STEPS" run.val_every="$STEPS" \
    checkpoint.every_steps="$STEPS" data.max_tokens=0 | grep -E "validation at step 0|final validation" | sed 's/^/  /'
  t2=$(date +%s)
  $MPIRUN -np "$NP" "$BIN/perfcell" finetune --config configs/pbmc_finetune.ini \
    --init "$w/pretrain/checkpoints/ckpt-$(printf %08d "$STEPS").h5" data.shards="$w/shards" \
    run.dir="$w/finetune" finetune.split_file="$w/eval/split.tsv" run.log_every=100000 >"$w/finetune.log"
  t3=$(date +%s)
  grep -E "^epoch" "$w/finetune.log" | tail -1 | sed 's/^/  last /'
  "$PYTHON" tools/annotation_eval.py compare "$w/eval/baseline.json" "$w/finetune/report_test.tsv" | sed 's/^/  /'
  echo "  perfcell time on $NP ranks: pretraining $((t2 - t1)) s ($STEPS steps), fine-tuning $((t3 - t2)) s"
done
