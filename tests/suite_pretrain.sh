# Distributed MLM pretraining under mpirun on real pbmc3k shards.
run pretrain.ranks_equal 600 "$PYTHON" tests/py/pretrain_mpi.py ranks
run pretrain.sigusr1_resume 600 "$PYTHON" tests/py/pretrain_mpi.py resume
run pretrain.kill9_resume 600 "$PYTHON" tests/py/pretrain_mpi.py kill
run pretrain.metrics_plot 300 "$PYTHON" tests/py/pretrain_mpi.py metrics
