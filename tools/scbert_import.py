#!/usr/bin/python3
"""Import a scBERT / performer-pytorch model into a perfcell checkpoint.

    /usr/bin/python3 tools/scbert_import.py MODEL.pth --vocab VOCAB.tsv --out CKPT.h5 \\
        [--heads 10] [--labels LABELS.txt] [--gene-emb frozen|learned] [--mode full|nonzero]

The same as `tools/scbert_interop.py import`; `--help` describes it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scbert_interop  # noqa: E402

if __name__ == "__main__":
    sys.exit(scbert_interop.run(sys.argv[1:], only="import", prog="scbert_import.py"))
