#!/usr/bin/env bash
# Run bin/perfcell over NP ranks on this machine.
#
#   mpi_scripts/run_local.sh NP COMMAND [perfcell arguments...]
#   mpi_scripts/run_local.sh 2 pretrain --config configs/pbmc_demo.ini --resume auto
#
# OpenBLAS threads are set so that ranks x threads <= cores; as root, the
# Open MPI variables that allow it are set; with more ranks than cores, ranks
# oversubscribe. Ctrl-C (SIGINT), SIGTERM, SIGHUP or SIGUSR1 to this script
# (or to its process group) reach the ranks as SIGUSR1: they finish the step
# (and a checkpoint being written), checkpoint, and the script exits 0.
set -euo pipefail
if [ $# -lt 2 ] || [ "$1" = "--help" ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
NP=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CORES=$(nproc)
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$(( CORES / NP > 0 ? CORES / NP : 1 ))}
# OpenBLAS 0.3.21 runs AVX2 SGEMM kernels on AVX-512 CPUs it takes for Cooper
# Lake; its SkylakeX ones are about 1.6x faster. PERFCELL_OPENBLAS_CORETYPE chooses.
if [ -n "${PERFCELL_OPENBLAS_CORETYPE:-}" ]; then
  export OPENBLAS_CORETYPE=$PERFCELL_OPENBLAS_CORETYPE
elif grep -q avx512f /proc/cpuinfo 2>/dev/null; then
  export OPENBLAS_CORETYPE=SKYLAKEX
fi
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
EXTRA=()
[ "$NP" -gt "$CORES" ] && EXTRA+=(--oversubscribe)
export HDF5_PLUGIN_PATH=${HDF5_PLUGIN_PATH:-$ROOT/lib/hdf5-plugin}
# mpirun runs in a session of its own: a SIGTERM or SIGINT sent to this
# script's process group (Ctrl-C, kill -TERM -PGID, a batch system) reaches
# this script only, which turns it into SIGUSR1 for mpirun (which forwards it):
# mpirun itself would kill the ranks about 2 s after a SIGTERM, mid-checkpoint.
# Should this script be killed (SIGKILL), mpirun gets SIGTERM (parent-death
# signal) so that no rank is left behind.
ISOLATE=(setsid)
if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
  ISOLATE+=(setpriv --pdeathsig TERM)
fi
child=
forward() {
  [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null
  return 0
}
trap forward TERM INT HUP USR1
"${ISOLATE[@]}" mpirun -np "$NP" "${EXTRA[@]}" --bind-to none -x OPENBLAS_NUM_THREADS -x OPENBLAS_CORETYPE \
  -x HDF5_PLUGIN_PATH "$ROOT/bin/perfcell" "$@" &
child=$!
rc=0
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break   # wait returns early when a trap runs
done
exit "$rc"
