#!/usr/bin/python3
"""Export a perfcell checkpoint as a scBERT / performer-pytorch state_dict.

    /usr/bin/python3 tools/scbert_export.py CKPT.h5 --out MODEL.pth [--wrap] [--redraw-counter]

The same as `tools/scbert_interop.py export`; `--help` describes it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scbert_interop  # noqa: E402

if __name__ == "__main__":
    sys.exit(scbert_interop.run(sys.argv[1:], only="export", prog="scbert_export.py"))
