#!/usr/bin/env bash
# CellLM contrastive pretraining on pbmc3k, 2 ranks:
#   1. time per step of MLM + contrastive against MLM alone at the same global
#      batch, and the coordinator's share (gather, loss, scatter on rank 0);
#   2. memory: peak RSS per rank with global batches of 64 and 1024 cells at a
#      fixed sub-batch, against the z the ranks store;
#   3. embeddings: how well validation-cell embeddings separate the labelled
#      cell types (kNN accuracy, silhouette) at random initialisation, after
#      MLM pretraining and after MLM + contrastive pretraining of the same
#      length.
#
#   bash tests/bench/bench_contrastive.sh     (STEPS, QSTEPS, REPS may be set;
#                                               PARTS=2 runs part 2 only)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
STEPS=${STEPS:-20}
QSTEPS=${QSTEPS:-150}
PARTS=${PARTS:-123}
bench_setup contrastive
bench_pbmc_shards
common=(--config configs/pbmc_demo.ini data.shards="$WORK/shards" run.val_every=0 checkpoint.every_steps=0
  model.dropout_emb=0.1 model.dropout_attn=0.1 model.dropout_ff=0.1)
con=(contrastive.weight=0.5 contrastive.sub_batch=8 contrastive.proj_dim=64 contrastive.proj_hidden=128)

if [[ $PARTS == *1* ]]; then
echo "1. Step time at global batch 32 (2 ranks x 2 micro-batches x 8 cells), $STEPS steps:"
for kind in mlm contrastive; do
  extra=()
  [ "$kind" = contrastive ] && extra=("${con[@]}")
  $MPIRUN -np 2 "$BIN/perfcell" pretrain "${common[@]}" run.dir="$WORK/t-$kind" run.max_steps="$STEPS" \
    run.log_every="$STEPS" "${extra[@]}" >/dev/null
done
"$PYTHON" - "$WORK" "$STEPS" <<'PY'
import json, sys
w, steps = sys.argv[1], int(sys.argv[2])
r = {k: [json.loads(l) for l in open(f"{w}/t-{k}/metrics.jsonl") if "step_s" in l][-1] for k in ("mlm", "contrastive")}
m, c = r["mlm"]["step_s"], r["contrastive"]["step_s"]
coord = r["contrastive"].get("contrastive_coord_s", 0) / steps
print(f"  MLM alone            {m:.3f} s/step")
print(f"  MLM + contrastive    {c:.3f} s/step  ({c / m:.2f}x; target <= 1.5x)")
print(f"  coordinator (gather, loss, scatter) {coord * 1e3:.2f} ms/step = {coord / c:.2%} of the step")
PY

fi

if [[ $PARTS == *2* ]]; then
echo
# Both runs read the same 4096 cells (1.7 epochs), so that everything but the
# batch size is the same.
echo "2. Peak RSS per rank, sub-batch 8, 2 ranks, 4096 training cells read at both batch sizes"
echo "   (64 steps of 64 cells, 4 steps of 1024; blocks of 8 cells, so 128 streams all get cells):"
# Peak RSS varies by a few MiB from run to run (allocator and prefetch-thread
# timing): three runs of each, medians compared.
REPS=${REPS:-3}
for rep in $(seq "$REPS"); do
  for G in 64 1024; do
    $MPIRUN -np 2 "$BIN/perfcell" pretrain "${common[@]}" "${con[@]}" run.dir="$WORK/m$G-$rep" \
      run.max_steps=$((4096 / G)) run.log_every=1 batch.micro_batch=8 batch.global_batch="$G" \
      data.block_cells=8 >/dev/null
  done
done
"$PYTHON" - "$WORK" "$REPS" <<'PY'
import json, statistics, sys
w, reps = sys.argv[1], int(sys.argv[2])
rss, runs = {}, {}
for G in (64, 1024):
    runs[G] = [[json.loads(l) for l in open(f"{w}/m{G}-{r}/metrics.jsonl") if "peak_rss_bytes" in l][-1]
               ["peak_rss_bytes"] for r in range(1, reps + 1)]
    rss[G] = statistics.median(runs[G])
    print(f"  global batch {G:>5}: runs " + ", ".join(f"{x / 2**20:.1f}" for x in runs[G]) + " MiB")
D = 64
# z stored per step: each rank keeps za, zb, ga, gb (local cells x D); rank 0
# also holds them for the whole global batch (4 x G x D floats).
def z_bytes(G):
    return 4 * (G // 2) * D * 4 + 4 * G * D * 4
for G in (64, 1024):
    print(f"  global batch {G:>5}: median peak RSS (largest rank) {rss[G] / 2**20:8.1f} MiB; z stored on rank 0 {z_bytes(G) / 2**20:.2f} MiB")
growth = rss[1024] - rss[64]
zg = z_bytes(1024) - z_bytes(64)
print(f"  growth {growth / 2**20:.2f} MiB; z growth {zg / 2**20:.2f} MiB "
      f"({'within' if growth <= zg else 'over'} the stored z by {abs(growth - zg) / 2**20:.2f} MiB; "
      f"pass 2 reads the step's cells again, so no step holds more than a micro-batch of cells)")
PY

fi

if [[ $PARTS == *3* ]]; then
echo
echo "3. Validation-cell embeddings ($QSTEPS steps of pretraining, last-position pooling):"
for kind in mlm contrastive; do
  extra=()
  [ "$kind" = contrastive ] && extra=("${con[@]}")
  $MPIRUN -np 2 "$BIN/perfcell" pretrain "${common[@]}" run.dir="$WORK/q-$kind" run.max_steps="$QSTEPS" \
    run.log_every="$QSTEPS" checkpoint.every_steps="$QSTEPS" "${extra[@]}" >/dev/null
  "$BIN/perfcell" embed --checkpoint "$WORK/q-$kind/checkpoints" --input "$WORK/shards" --out "$WORK/$kind.h5ad" >/dev/null
done
$MPIRUN -np 1 "$BIN/perfcell" pretrain "${common[@]}" "${con[@]}" run.dir="$WORK/q-init" run.max_steps=1 \
  optim.lr=0 run.log_every=1 checkpoint.every_steps=1 >/dev/null
"$BIN/perfcell" embed --checkpoint "$WORK/q-init/checkpoints" --input "$WORK/shards" --out "$WORK/init.h5ad" >/dev/null
"$PYTHON" tools/embedding_quality.py "random initialisation=$WORK/init.h5ad" "MLM pretraining=$WORK/mlm.h5ad" \
  "MLM + contrastive=$WORK/contrastive.h5ad" | sed 's/^/  /'
fi
