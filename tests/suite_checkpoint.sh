# Checkpoints: round trip, keep-K and `latest`, resume over damaged files,
# malformed files, a writer killed mid-write, full disks; then the same file
# read with h5py.
run checkpoint.unit 120 "$TBIN/test_checkpoint"
run checkpoint.h5py 120 bash -c '"$TBIN/test_checkpoint" --sample "$TEST_TMP" && "$PYTHON" tests/py/ckpt_h5py_check.py "$TEST_TMP"'
