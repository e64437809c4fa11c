# PyTorch reference model (tools/perfcell_torch.py): gradients, packing,
# FAVOR+ kernel, random features, names, masking and dump round trip.
run reference.torch_selfcheck 300 "$PYTHON" tests/py/torch_check_reference.py
