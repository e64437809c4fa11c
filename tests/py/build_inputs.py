#!/usr/bin/env python3
"""What perfcell-shard takes an input to be, on inputs made in the test.

    build_inputs.py mtx-square      a square MatrixMarket folder (as many cells as
                                    genes), written cells x genes or genes x cells:
                                    refused, naming the files and both counts; a
                                    non-square cells x genes folder is read right
    build_inputs.py h5ad-antibody   an .h5ad whose var feature_types has 'Antibody
                                    Capture' rows: left out with the note of the 10x
                                    readers, as a 10x MatrixMarket folder of the same data
    build_inputs.py float32-noise   float32 counts with rounding noise: refused, the
                                    message shows the digits, the cell and the gene

The exit status is the verdict.
"""
import gzip
import os
import subprocess
import sys

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

BIN = os.environ.get("BIN", "bin")
TMP = os.path.abspath(os.environ.get("TEST_TMP", "build/test-tmp/build_inputs"))
SHARD = os.path.join(BIN, "perfcell-shard")
LIMIT = 120

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def shard(*args):
    r = subprocess.run([SHARD, *args], capture_output=True, text=True, timeout=LIMIT)
    print("$ perfcell-shard " + " ".join(args) + f"\n{r.stdout}{r.stderr}(status {r.returncode})")
    return r.returncode, r.stdout + r.stderr


def counts(n_cells, n_genes, seed):
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.8, size=(n_cells, n_genes)).astype(np.int64)
    x[:, 0] += 1  # no empty cell
    return x


def write_mtx(folder, x_cells_genes, genes, cells, cells_x_genes, types=None):
    os.makedirs(folder, exist_ok=True)
    m = sp.coo_matrix(x_cells_genes if cells_x_genes else x_cells_genes.T)
    scipy.io.mmwrite(os.path.join(folder, "matrix.mtx"), m, field="integer")
    with gzip.open(os.path.join(folder, "features.tsv.gz"), "wt") as f:
        for i, g in enumerate(genes):
            f.write(f"ENSG{i:011d}\t{g}\t{types[i] if types else 'Gene Expression'}\n")
    with gzip.open(os.path.join(folder, "barcodes.tsv.gz"), "wt") as f:
        for c in cells:
            f.write(c + "\n")


def read_shards(out):
    """Cells x vocabulary counts of a shard folder, and the vocabulary."""
    names = sorted(n for n in os.listdir(out) if n.endswith(".h5ad"))
    parts = []
    for n in names:
        with h5py.File(os.path.join(out, n)) as f:
            shape = tuple(f["X"].attrs["shape"])
            parts.append(sp.csr_matrix((f["X/data"][()], f["X/indices"][()], f["X/indptr"][()]),
                                       shape=shape).toarray())
    with open(os.path.join(out, "vocab.tsv")) as f:
        vocab = [l.rstrip("\n").split("\t")[0] for l in f]
    return np.vstack(parts), vocab


def mtx_square():
    n = 30
    genes = [f"G{i}" for i in range(n)]
    cells = [f"C{i}" for i in range(n)]
    x = counts(n, n, 1)
    vocab = os.path.join(TMP, "vocab.tsv")
    with open(vocab, "w") as f:
        f.write("".join(g + "\n" for g in genes))
    for orient in ("cells_x_genes", "genes_x_cells"):
        folder = os.path.join(TMP, orient)
        write_mtx(folder, x, genes, cells, orient == "cells_x_genes")
        out = os.path.join(TMP, "out_" + orient)
        rc, text = shard("build", folder, "--vocab", vocab, "--out", out, "--quiet")
        check(1 <= rc <= 127, f"square {orient}: refused (status {rc})")
        check("cannot be told" in text and "features.tsv.gz" in text and "barcodes.tsv.gz" in text
              and f"{n} features" in text and f"{n} barcodes" in text,
              f"square {orient}: the message names both files and both counts")
        check(not os.path.exists(out) and not os.path.exists(out + ".partial"), f"square {orient}: no output")
    # Not square, written cells x genes: told by the lengths, read right.
    xc = counts(20, n, 2)
    folder = os.path.join(TMP, "cells_x_genes_20")
    write_mtx(folder, xc, genes, cells[:20], True)
    out = os.path.join(TMP, "out_20")
    rc, text = shard("build", folder, "--vocab", vocab, "--out", out, "--quiet")
    check(rc == 0, "20 cells x 30 genes written cells x genes: built")
    if rc == 0:
        got, v = read_shards(out)
        check(v == genes and np.array_equal(got, xc), "20 x 30 cells x genes: the same counts")


def h5ad_antibody():
    genes = [f"G{i}" for i in range(40)]
    abs_ = [f"CD{i}_TotalSeqB" for i in range(6)]
    names = genes[:20] + abs_[:3] + genes[20:] + abs_[3:]
    types = ["Gene Expression"] * 20 + ["Antibody Capture"] * 3 + ["Gene Expression"] * 20 + \
            ["Antibody Capture"] * 3
    cells = [f"C{i}" for i in range(25)]
    x = counts(25, len(names), 3)
    ad = anndata.AnnData(X=sp.csr_matrix(x.astype(np.float32)),
                         obs=pd.DataFrame(index=cells),
                         var=pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(len(names))],
                                           "feature_types": pd.Categorical(types)}, index=names))
    h5ad = os.path.join(TMP, "with_antibodies.h5ad")
    ad.write_h5ad(h5ad)
    folder = os.path.join(TMP, "with_antibodies_mtx")
    write_mtx(folder, x, names, cells, False, types)
    notes = {}
    for name, path in (("h5ad", h5ad), ("mtx", folder)):
        vocab = os.path.join(TMP, f"vocab_{name}.tsv")
        rc, text = shard("vocab", path, "--out", vocab)
        check(rc == 0, f"{name}: vocabulary built")
        if rc == 0:
            with open(vocab) as f:
                v = [l.split("\t")[0] for l in f.read().splitlines()]
            check(v == genes, f"{name}: the vocabulary holds the 40 genes only ({len(v)} entries)")
        notes[name] = [l.split(": ", 1)[-1] for l in text.splitlines() if "left out" in l]
        check(any("left out 6 features" in l and "6 Antibody Capture" in l for l in notes[name]),
              f"{name}: the note says 6 Antibody Capture features were left out")
        out = os.path.join(TMP, f"out_{name}")
        rc, text = shard("build", path, "--vocab", vocab, "--out", out)
        check(rc == 0, f"{name}: built")
        if rc == 0:
            got, v = read_shards(out)
            keep = [i for i, t in enumerate(types) if t == "Gene Expression"]
            check(np.array_equal(got, x[:, keep]), f"{name}: the shards hold the gene counts only")
    check(notes.get("h5ad") == notes.get("mtx") and notes.get("h5ad"),
          f"the same note for .h5ad and 10x ({notes})")


def float32_noise():
    cells = [f"C{i}" for i in range(10)]
    genes = [f"G{i}" for i in range(12)]
    x = counts(10, 12, 4).astype(np.float32)
    # float32 rounding noise: 3 * (1 + 2^-22) prints as 3 with 6 digits.
    x[4, 7] = np.float32(3) + np.float32(3 * 2.0 ** -22)
    ad = anndata.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes))
    path = os.path.join(TMP, "noisy.h5ad")
    ad.write_h5ad(path)
    vocab = os.path.join(TMP, "vocab.tsv")
    with open(vocab, "w") as f:
        f.write("".join(g + "\n" for g in genes))
    out = os.path.join(TMP, "out")
    rc, text = shard("build", path, "--vocab", vocab, "--out", out, "--quiet")
    shown = f"{float(x[4, 7]):.9g}"
    check(1 <= rc <= 127, f"refused (status {rc})")
    check(shown != "3" and f"e.g. {shown} at cell 4 'C4', gene 'G7'" in text,
          f"the message shows {shown}, the cell and the gene")
    check(not os.path.exists(out), "no output")


def main():
    os.makedirs(TMP, exist_ok=True)
    {"mtx-square": mtx_square, "h5ad-antibody": h5ad_antibody, "float32-noise": float32_noise}[sys.argv[1]]()
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
