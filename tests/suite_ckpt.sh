# Checkpoint checks and resume settings: values without a CRC of their own
# edited with h5py (the root checksum), NaN/Inf weights under a valid CRC,
# a damaged root header, checkpoints written before the root checksum, a
# resume with another batch geometry or other optimizer settings, keys given
# twice, and the hint of a missing label column in predict/embed. Fixtures
# are the bad-input tests' (built once per run); tests/py/ckpt_cases.py
# says what each case checks.
for case in $("$PYTHON" tests/py/ckpt_cases.py --list); do
  run "ckpt.$case" 600 "$PYTHON" tests/py/ckpt_cases.py "$case"
done
