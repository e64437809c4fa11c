# Stop signals, launchers and a full run folder (tests/py/signals_tests.py),
# and the MPI runs over the TCP transport, as between hosts (pretrain_mpi.py
# with PERFCELL_MPI_TRANSPORT=tcp).
run signals.metrics_full_disk 600 "$PYTHON" tests/py/signals_tests.py metrics_full
run signals.metrics_file_size_limit 600 "$PYTHON" tests/py/signals_tests.py metrics_fsize
run signals.sigterm_run_local 600 "$PYTHON" tests/py/signals_tests.py launcher run_local
run signals.sigterm_slurm_script 600 "$PYTHON" tests/py/signals_tests.py launcher slurm
run signals.sigterm_pbs_script 600 "$PYTHON" tests/py/signals_tests.py launcher pbs
run signals.sigterm_bare_mpirun 600 "$PYTHON" tests/py/signals_tests.py bare_mpirun
run signals.sigterm_one_rank 600 "$PYTHON" tests/py/signals_tests.py rank_term
run signals.tcp_ranks_equal 600 env PERFCELL_MPI_TRANSPORT=tcp "$PYTHON" tests/py/pretrain_mpi.py ranks
run signals.tcp_kill9_resume 600 env PERFCELL_MPI_TRANSPORT=tcp KILL_TRIALS=4 "$PYTHON" tests/py/pretrain_mpi.py kill
