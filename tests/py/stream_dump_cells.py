#!/usr/bin/env python3
"""Reference cells for `test_stream compare`, read with h5py from the input
.h5ad (not from the shards), mapped to the shard folder's vocabulary and
label codes by name.

    /usr/bin/python3 tests/py/stream_dump_cells.py IN.h5ad SHARD_DIR --label-key celltype > ref.txt

One line per cell: `id label total gene:count ...` with vocabulary indices
ascending, label codes as in manifest.tsv (-1: none), total over vocabulary
genes. Cells: every 53rd, plus the first and last cell of every shard.
"""
import argparse
import os

import h5py
import numpy as np


def text(v):
    return v.decode() if isinstance(v, bytes) else v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("folder")
    ap.add_argument("--label-key", default="")
    a = ap.parse_args()

    vocab = {}
    with open(os.path.join(a.folder, "vocab.tsv")) as f:
        for i, line in enumerate(f):
            vocab.setdefault(line.rstrip("\n").split("\t")[0], i)
    labels, edges = {}, []
    with open(os.path.join(a.folder, "manifest.tsv")) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if p[0] == "#label":
                labels[p[2]] = int(p[1])
            elif not p[0].startswith("#") and p[0] != "file":
                first, n = int(p[2]), int(p[1])
                edges += [first, first + n - 1]

    with h5py.File(a.input, "r") as f:
        x = f["X"]
        n = int(x.attrs["shape"][0])
        indptr = x["indptr"][:]
        data, indices = x["data"], x["indices"]
        var = f["var"]
        genes = [text(s) for s in var[var.attrs["_index"]][:]]
        to_vocab = np.array([vocab.get(g, -1) for g in genes])
        codes, cats = None, None
        if a.label_key:
            codes = f["obs"][a.label_key]["codes"][:]
            cats = [text(s) for s in f["obs"][a.label_key]["categories"][:]]
        for cell in sorted(set(list(range(0, n, 53)) + edges)):
            lo, hi = indptr[cell], indptr[cell + 1]
            g = to_vocab[indices[lo:hi]]
            c = data[lo:hi]
            keep = (g >= 0) & (c > 0)
            g, c = g[keep], c[keep].astype(np.int64)
            order = np.argsort(g)
            g, c = g[order], c[order]
            label = -1
            if codes is not None and codes[cell] >= 0:
                label = labels[cats[codes[cell]]]
            pairs = " ".join(f"{gi}:{ci}" for gi, ci in zip(g, c))
            print(f"{cell} {label} {int(c.sum())} {pairs}".rstrip())


if __name__ == "__main__":
    main()
