# One writer per folder (tests/py/lock_tests.py): the run lock of pretrain,
# finetune and perfcell-shard build, starts refused without a trace, and the
# outputs of embed and predict (never over an input, --force, atomic).
run lock.pretrain_race 600 "$PYTHON" tests/py/lock_tests.py pretrain
run lock.stale_lock 600 "$PYTHON" tests/py/lock_tests.py stale
run lock.checkpoint_dir_shared 600 "$PYTHON" tests/py/lock_tests.py ckptdir
run lock.finetune_race 600 "$PYTHON" tests/py/lock_tests.py finetune
run lock.shard_build_race 600 "$PYTHON" tests/py/lock_tests.py shard
run lock.refused_start_unchanged 600 "$PYTHON" tests/py/lock_tests.py refused
run lock.output_force 600 "$PYTHON" tests/py/lock_tests.py force
run lock.output_not_input 600 "$PYTHON" tests/py/lock_tests.py input
run lock.output_folder_missing 600 "$PYTHON" tests/py/lock_tests.py folder
run lock.output_write_fails 600 "$PYTHON" tests/py/lock_tests.py fullwrite
