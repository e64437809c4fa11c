# Bad input: damaged shards and checkpoints, other vocabularies and model
# sizes, unknown config keys, missing files, non-count matrices, empty inputs,
# missing labels. Each case must be refused with a message naming the file and
# the fault, a non-zero exit status, no crash or sanitizer report, no hang
# and no partial output (tests/py/badinput_common.py says exactly what is
# checked). Fixtures (pbmc3k shards, a tiny pretrained and a fine-tuned
# checkpoint) are built once per test run by the first case.
for script in shards checkpoints config; do
  for case in $("$PYTHON" "tests/py/badinput_$script.py" --list); do
    run "badinput.$case" 300 "$PYTHON" "tests/py/badinput_$script.py" "$case"
  done
done
