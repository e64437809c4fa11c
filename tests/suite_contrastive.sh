# CellLM divide-and-conquer contrastive learning: the loss gradient against
# finite differences, and divide and conquer against the naive full-batch
# gradient on 1, 2 and 3 ranks (uneven cells, a rank with none).
run contrastive.dc_1rank 300 $MPIRUN -np 1 "$TBIN/test_contrastive"
run contrastive.dc_2ranks 300 $MPIRUN -np 2 "$TBIN/test_contrastive"
run contrastive.dc_3ranks 300 $MPIRUN -np 3 "$TBIN/test_contrastive"
run contrastive.pretrain 300 "$PYTHON" tests/py/pretrain_mpi.py contrastive
