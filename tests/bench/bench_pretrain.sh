#!/usr/bin/env bash
# Distributed pretraining on pbmc3k (configs/pbmc_demo.ini): steps/s and
# cells/s with 1 and 2 ranks at a fixed micro-batch and accumulation per rank
# (weak scaling: the global batch grows with the ranks), the all-reduce's
# share of the step time, the bytes all-reduced per step against the number
# of parameters, and a model of the step time at 64 and 1024 ranks from the
# measured compute and a ring all-reduce cost.
#
#   bash tests/bench/bench_pretrain.sh     (STEPS may be set)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
STEPS=${STEPS:-40}
bench_setup pretrain
bench_pbmc_shards

for np in 1 2; do
  $MPIRUN -np "$np" "$BIN/perfcell" pretrain --config configs/pbmc_demo.ini data.shards="$WORK/shards" \
    run.dir="$WORK/run$np" run.max_steps="$STEPS" run.log_every="$STEPS" run.val_every=0 \
    checkpoint.every_steps=0 batch.micro_batch=8 batch.accumulation=2 batch.global_batch=0 >"$WORK/log$np"
done
"$PYTHON" - "$WORK" "$STEPS" <<'PY'
import json, sys, math
work, steps = sys.argv[1], int(sys.argv[2])
rows = {}
for n in (1, 2):
    lines = [json.loads(l) for l in open(f"{work}/run{n}/metrics.jsonl")]
    last = [r for r in lines if "step_s" in r][-1]
    rows[n] = last
P = None
for l in open(f"{work}/log1"):
    if l.startswith("model:"):
        P = int(l.split("tensors,")[1].split()[0])
print(f"{'ranks':>5} {'global batch':>12} {'step s':>8} {'steps/s':>8} {'cells/s':>9} {'efficiency':>10} {'allreduce share':>15}")
base = rows[1]["cells_per_s"]
for n in (1, 2):
    r = rows[n]
    share = r["allreduce_s"] / (r["step_s"] * steps)
    eff = r["cells_per_s"] / (n * base)
    print(f"{n:>5} {16 * n:>12} {r['step_s']:>8.3f} {1 / r['step_s']:>8.2f} {r['cells_per_s']:>9.1f} {eff:>9.0%} {share:>14.1%}")
S = 4 * P
print(f"\nparameters {P:,} (all trainable): {S / 2**20:.1f} MiB of float32 gradients all-reduced per step;")
print(f"a ring all-reduce sends 2(N-1)/N x {S / 2**20:.1f} MiB per rank per step ({S / 2**20:.1f} MiB at N=2).")
# Step time model: compute per rank (measured at 1 rank) + ring all-reduce.
t_comp = rows[1]["step_s"] - rows[1]["allreduce_s"] / steps
for bw, lat, name in ((12.5e9, 2e-6, "100 Gb/s InfiniBand"), (3e9, 20e-6, "25 Gb/s Ethernet")):
    print(f"\nmodel of the step time over {name} (bandwidth {bw / 1e9:.1f} GB/s, latency {lat * 1e6:.0f} us),")
    print(f"  compute {t_comp:.3f} s per rank per step (measured, 1 rank):")
    for N in (2, 64, 1024):
        t_ar = 2 * (N - 1) / N * S / bw + 2 * (N - 1) * lat
        t = t_comp + t_ar
        print(f"  N={N:>5}: all-reduce {t_ar * 1e3:8.2f} ms, step {t:.3f} s, weak-scaling efficiency {t_comp / t:.1%}")
PY
