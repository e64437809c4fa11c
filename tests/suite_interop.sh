# scBERT / performer-pytorch interoperability (tools/scbert_import.py,
# tools/scbert_export.py): bitwise round trips and the stored configuration,
# perfcell's forward pass on imported weights against the PyTorch reference
# (embed in full and nonzero mode, predict and its threshold), fine-tuning
# from imported weights and exporting the result, and bad inputs.
run interop.roundtrip 300 bash -c '"$PYTHON" tests/py/interop_roundtrip.py "$TEST_TMP"'
run interop.forward 300 bash -c '"$PYTHON" tests/py/interop_forward.py "$TEST_TMP"'
run interop.finetune 300 bash -c '"$PYTHON" tests/py/interop_finetune.py "$TEST_TMP"'
run interop.errors 300 bash -c '"$PYTHON" tests/py/interop_errors.py "$TEST_TMP"'
