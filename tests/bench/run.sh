#!/usr/bin/env bash
# `make bench`: every benchmark, in one run, with the machine described first.
# Speed and memory targets are checked here, never in tests. Each section
# prints its own table; the whole run takes about an hour on 2 cores (the full
# scBERT configuration dominates: PyTorch needs about a minute per step).
#
#   bash tests/bench/run.sh [SECTION...]   sections: shards reader model pretrain contrastive annotation
set -uo pipefail
cd "$(dirname "$0")/../.."
export BIN=${BIN:-bin} BBIN=${BBIN:-build/release/bench} PYTHON=${PYTHON:-/usr/bin/python3}
export DATA=${DATA:-$PWD/../shared/data}
# OpenBLAS 0.3.21 runs AVX2 (Haswell) SGEMM kernels on AVX-512 CPUs it takes
# for Cooper Lake (and whenever OPENBLAS_CORETYPE=Haswell is set); its SkylakeX
# kernels are about 1.6x faster there. PERFCELL_OPENBLAS_CORETYPE chooses.
if [ -n "${PERFCELL_OPENBLAS_CORETYPE:-}" ]; then
  export OPENBLAS_CORETYPE=$PERFCELL_OPENBLAS_CORETYPE
elif grep -q avx512f /proc/cpuinfo; then
  export OPENBLAS_CORETYPE=SKYLAKEX
fi
# The same library and setting serve perfcell and PyTorch.
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(shards reader model pretrain contrastive annotation)

echo "perfcell benchmarks, $(date -u +%Y-%m-%dT%H:%MZ)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (timings on a busy machine are pessimistic)"
status=0
for s in "${sections[@]}"; do
  case $s in
    shards) title="Shard build: throughput and size" script=tests/bench/bench_shard_build.sh ;;
    reader) title="Reader: cells/s per rank against anndata/h5py" script=tests/bench/bench_reader.sh ;;
    model) title="Encoder: training step against PyTorch, memory, GFLOP/s, profile" script=tests/bench/bench_model.sh ;;
    pretrain) title="Distributed pretraining: scaling and all-reduce" script=tests/bench/bench_pretrain.sh ;;
    contrastive) title="Contrastive pretraining: time, memory, embeddings" script=tests/bench/bench_contrastive.sh ;;
    annotation) title="Cell-type annotation against logistic regression" script=tests/bench/bench_annotation.sh ;;
    *) echo "unknown section '$s' (shards reader model pretrain contrastive annotation)"; exit 2 ;;
  esac
  printf '\n================ %s\n' "$title"
  t0=$(date +%s)
  bash "$script" || { echo "(section $s failed)"; status=1; }
  echo "($(( $(date +%s) - t0 )) s)"
done
exit $status
