# Faults while writing shards, and what inputs are taken as (perfcell-shard build).
# tests/py/build_faults.py: a full disk (tmpfs in a private mount namespace), a
# file size limit, SIGTERM/SIGINT to mpirun, to one rank or to a 1-rank build:
# a message naming the shard and the cause, status 1..127, no partial output,
# no process left. A 2-rank build over TCP only equals the default one.
BUILD_FAULTS="$PYTHON tests/py/build_faults.py"

run build_faults.disk_full_1rank 180 $BUILD_FAULTS disk-full 1
run build_faults.disk_full_2ranks 180 $BUILD_FAULTS disk-full 2
run build_faults.fsize_1rank 180 $BUILD_FAULTS fsize 1
run build_faults.fsize_2ranks 180 $BUILD_FAULTS fsize 2
run build_faults.sigterm_mpirun 180 $BUILD_FAULTS signal mpirun TERM
run build_faults.sigint_mpirun 180 $BUILD_FAULTS signal mpirun INT
run build_faults.sigterm_one_rank 180 $BUILD_FAULTS signal rank TERM
run build_faults.sigterm_1rank 180 $BUILD_FAULTS signal single TERM
run build_faults.sigint_1rank 180 $BUILD_FAULTS signal single INT
run build_tcp.equals_shm 240 $BUILD_FAULTS tcp

# Inputs made in the test (tests/py/build_inputs.py): a square MatrixMarket
# folder (orientation not told by the file lengths) refused, a cells x genes one
# read right; .h5ad var feature_types rows that are not genes left out with the
# note of the 10x readers; float32 counts with rounding noise refused with the
# digits that show it, the cell and the gene.
BUILD_INPUTS="$PYTHON tests/py/build_inputs.py"
run build_inputs.mtx_square 120 $BUILD_INPUTS mtx-square
run build_inputs.h5ad_antibody 120 $BUILD_INPUTS h5ad-antibody
run build_inputs.float32_noise 120 $BUILD_INPUTS float32-noise
