# Distributed MLM pretraining under mpirun on real pbmc3k shards.
run pretrain.ranks_equal 600 "$PYTHON" tests/py/pretrain_mpi.py ranks
run pretrain.signal_resume 600 "$PYTHON" tests/py/pretrain_mpi.py resume
run pretrain.kill9_resume 600 "$PYTHON" tests/py/pretrain_mpi.py kill
run pretrain.metrics_plot 300 "$PYTHON" tests/py/pretrain_mpi.py metrics
run pretrain.nan_policy 600 "$PYTHON" tests/py/pretrain_mpi.py nan
run pretrain.full_disk 600 "$PYTHON" tests/py/pretrain_mpi.py fulldisk
run pretrain.finetune_cache_resume 600 "$PYTHON" tests/py/pretrain_mpi.py finetune
run pretrain.finetune_lbfgs 600 "$PYTHON" tests/py/pretrain_mpi.py finetune_lbfgs
