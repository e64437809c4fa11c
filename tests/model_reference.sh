#!/usr/bin/env bash
# The C model against the PyTorch reference on fresh dumps: full and nonzero
# mode, a frozen gene embedding, and an odd shape (3 heads of 5, 7 features)
# that catches layout mistakes. Usage: tests/model_reference.sh (env from tests/run.sh).
set -euo pipefail
out=${TEST_TMP:-/tmp}
mk() { "$PYTHON" tools/make_reference.py --out "$out/$1.h5" "${@:2}" >/dev/null; }
mk full --mode full --genes 24 --dim 16 --depth 2 --heads 2 --dim-head 8 --features 12 --ff 32 --bins 5 --cells 3 --seed 1
mk nonzero --mode nonzero --genes 40 --dim 16 --depth 2 --heads 2 --dim-head 8 --features 12 --ff 32 --bins 5 --cells 4 --nonzero-lengths 12,1,15,6 --seed 2
mk frozen --mode nonzero --genes 40 --dim 16 --depth 2 --heads 2 --dim-head 8 --features 12 --ff 32 --bins 5 --cells 3 --nonzero-lengths 9,20,3 --seed 3 --frozen-gene-emb
mk odd --mode full --genes 30 --dim 12 --depth 3 --heads 3 --dim-head 5 --features 7 --ff 20 --bins 5 --cells 2 --seed 4
for d in full nonzero frozen odd; do
  "$TBIN/test_reference" "$out/$d.h5"
done
