#!/usr/bin/env python3
"""Checks of `perfcell-shard` against inputs read independently in Python.

The inputs are read here with anndata (.h5ad), h5py (10x HDF5) and
scipy.io.mmread (10x MatrixMarket); the gene matching rules of vocab.h are
re-implemented here; shards are read with h5py and with anndata.read_h5ad, and
the manifest's checksums are recomputed from shards/README.md.

    shard_check.py roundtrip INPUT [--genome G] [--use-raw] [--layer L]
                   [--label-key K] [--labels TSV] [--np N] [--shard-cells N]
                   [--piece-cells N] [--vocab V] [--expect-report TEXT ...]
    shard_check.py invariance INPUT [--label-key K] [--shard-cells N]
    shard_check.py variants            (CSC, dense, layers/counts, raw/X .h5ad)
    shard_check.py mismatch            (vocabulary that differs from the input)
    shard_check.py multi               (two inputs of two formats in one build)
    shard_check.py refusals            (inputs and options that must be refused)

Environment (tests/run.sh): BIN, MPIRUN, DATA, TEST_TMP, HDF5_PLUGIN_PATH.
Exit status 0 when every check passed.
"""
import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import zlib

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp

BIN = os.environ.get("BIN", "bin")
MPIRUN = os.environ.get("MPIRUN", "mpirun --oversubscribe --bind-to none").split()
DATA = os.environ.get("DATA", "../shared/data")
TMP = os.environ.get("TEST_TMP", "/tmp")
SHARD = os.path.abspath(os.path.join(BIN, "perfcell-shard"))
ID_COLUMNS = ["gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "feature_id", "feature_ids",
              "gene_ensembl_id"]

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


def run(cmd, expect_ok=True):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print("$", " ".join(cmd))
    print(p.stdout)
    if expect_ok and p.returncode != 0:
        raise SystemExit("command failed (%d): %s" % (p.returncode, " ".join(cmd)))
    return p


def s(x):
    return x.decode() if isinstance(x, bytes) else str(x)


# ---------------------------------------------------------------------------
# Inputs, read independently: cells, symbols, ids, X (cells x genes, float64 CSR), labels

def read_h5ad(path, use_raw=False, layer=None, label_key=None):
    import anndata as ad
    a = ad.read_h5ad(path)
    if use_raw:
        X, var = a.raw.X, a.raw.var
    elif layer:
        X, var = a.layers[layer], a.var
    else:
        X, var = a.X, a.var
    symbols = [str(v) for v in var.index]
    ids = [""] * len(symbols)
    for col in ID_COLUMNS:
        if col in var.columns:
            ids = ["" if v != v else str(v) for v in var[col]]
            break
    labels = None
    if label_key:
        labels = [None if v != v or str(v) == "" else str(v) for v in a.obs[label_key]]
    return dict(cells=[str(v) for v in a.obs_names], symbols=symbols, ids=ids,
                X=sp.csr_matrix(X, dtype=np.float64), labels=labels)


def read_10x_h5(path, genome=None):
    f = h5py.File(path, "r")
    if "matrix" in f:
        m = f["matrix"]
        n_feat, n_cells = (int(v) for v in m["shape"][:])
        X = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]),
                          shape=(n_feat, n_cells)).T.tocsr().astype(np.float64)
        feat = m["features"]
        keep = np.ones(n_feat, dtype=bool)
        if "feature_type" in feat:
            keep &= np.array([s(t) == "Gene Expression" for t in feat["feature_type"][:]])
        if genome and genome != "all":
            keep &= np.array([s(g) == genome for g in feat["genome"][:]])
        idx = np.nonzero(keep)[0]
        names, fids = feat["name"][:], feat["id"][:]
        return dict(cells=[s(b) for b in m["barcodes"][:]],
                    symbols=[s(names[i]) for i in idx], ids=[s(fids[i]) for i in idx],
                    X=X[:, idx].tocsr(), labels=None)
    groups = sorted(k for k in f.keys() if isinstance(f[k], h5py.Group) and "indptr" in f[k])
    use = groups if genome == "all" else [genome if genome else groups[0]]
    parts, symbols, ids, cells = [], [], [], None
    for g in use:
        m = f[g]
        n_genes, n_cells = (int(v) for v in m["shape"][:])
        parts.append(sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]),
                                   shape=(n_genes, n_cells)).T.tocsr().astype(np.float64))
        symbols += [s(v) for v in m["gene_names"][:]]
        ids += [s(v) for v in m["genes"][:]]
        cells = [s(b) for b in m["barcodes"][:]]
    return dict(cells=cells, symbols=symbols, ids=ids, X=sp.hstack(parts).tocsr(), labels=None)


def text_lines(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as fh:
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def read_mtx(folder):
    def first(*names):
        for n in names:
            if os.path.exists(os.path.join(folder, n)):
                return os.path.join(folder, n)
        raise SystemExit("no %s in %s" % (names, folder))
    feat = text_lines(first("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    cells = [r[0] for r in text_lines(first("barcodes.tsv.gz", "barcodes.tsv"))]
    X = scipy.io.mmread(first("matrix.mtx.gz", "matrix.mtx")).T.tocsr().astype(np.float64)
    keep = [i for i, r in enumerate(feat) if len(r) < 3 or r[2] == "Gene Expression"]
    return dict(cells=cells, symbols=[feat[i][1] if len(feat[i]) > 1 else feat[i][0] for i in keep],
                ids=[feat[i][0] for i in keep], X=X[:, keep].tocsr(), labels=None)


def read_input(path, genome=None, use_raw=False, layer=None, label_key=None, labels_tsv=None):
    if os.path.isdir(path):
        d = read_mtx(path)
    elif h5py.is_hdf5(path) and ("X" in h5py.File(path, "r") or "obs" in h5py.File(path, "r")):
        d = read_h5ad(path, use_raw, layer, None if labels_tsv else label_key)
    else:
        d = read_10x_h5(path, genome)
    # An id equal to its symbol is no id (vocab.h).
    d["ids"] = ["" if i == sym else i for sym, i in zip(d["symbols"], d["ids"])]
    if labels_tsv:
        rows = text_lines(labels_tsv)
        col = 1
        if rows and rows[0][0].lower() in ("barcode", "barcodes", "cell", "cells", "cell_id"):
            if label_key:
                col = rows[0].index(label_key)
            rows = rows[1:]
        table = {r[0]: r[col] for r in rows if len(r) > col and r[col] != ""}
        d["labels"] = [table.get(c) for c in d["cells"]]
    return d


# ---------------------------------------------------------------------------
# The vocabulary rules of include/perfcell/vocab.h, written again

def id_key(i):
    m = re.fullmatch(r"(ENS.*)\.(\d+)", i)
    return m.group(1) if m else i


class Vocab:
    def __init__(self):
        self.symbols, self.ids, self.by_id, self.by_sym = [], [], {}, {}

    def match(self, sym, i):
        if i and id_key(i) in self.by_id:
            return self.by_id[id_key(i)]
        g = self.by_sym.get(sym)
        if g is None or (i and self.ids[g]):
            return None
        return g

    def add(self, sym, i):
        g = len(self.symbols)
        self.symbols.append(sym)
        self.ids.append(i)
        if i:
            self.by_id.setdefault(id_key(i), g)
        self.by_sym.setdefault(sym, g)

    @staticmethod
    def load(path):
        v = Vocab()
        for line in open(path).read().split("\n")[:-1]:
            f = line.split("\t")
            v.add(f[0], f[1] if len(f) > 1 else "")
        return v


def union_vocab(d):
    v = Vocab()
    for sym, i in zip(d["symbols"], d["ids"]):
        if v.match(sym, i) is None:
            v.add(sym, i)
    return v


def vocab_hash(v):
    h = 0xcbf29ce484222325
    for byte in "".join("%s\t%s\n" % (a, b) for a, b in zip(v.symbols, v.ids)).encode():
        h = ((h ^ byte) * 0x100000001b3) & 0xffffffffffffffff
    return "%016x" % h


def mapping(d, v):
    """(input genes x V) 0/1 matrix, and matched / missing / dropped / duplicates."""
    to = [v.match(sym, i) for sym, i in zip(d["symbols"], d["ids"])]
    rows = [k for k, g in enumerate(to) if g is not None]
    P = sp.csr_matrix((np.ones(len(rows)), (rows, [to[k] for k in rows])),
                      shape=(len(to), len(v.symbols)))
    matched = len(set(to[k] for k in rows))
    return P, dict(matched=matched, missing=len(v.symbols) - matched,
                   dropped=len(to) - len(rows), duplicates=len(rows) - matched)


# ---------------------------------------------------------------------------
# Shards

def read_manifest(folder):
    head, rows = {}, []
    labels, datasets = [], []
    table = False
    for line in open(os.path.join(folder, "manifest.tsv")).read().split("\n")[:-1]:
        f = line.split("\t")
        if f[0].startswith("#"):
            if f[0] == "#label":
                labels.append((f[2], int(f[3])))
            elif f[0] == "#dataset":
                datasets.append((f[2], f[3], int(f[4])))
            else:
                head[f[0][1:]] = f[1:]
        elif not table:
            table = True
        else:
            rows.append(dict(file=f[0], n_cells=int(f[1]), first_cell=int(f[2]), nnz=int(f[3]),
                             content_crc32=f[4], bytes=int(f[5]), file_crc32=f[6]))
    return head, labels, datasets, rows


def read_shards(folder, label_key):
    """Everything in the shards, concatenated; checks each shard file on the way."""
    import anndata as ad
    head, labels, datasets, rows = read_manifest(folder)
    out = dict(head=head, labels=labels, datasets=datasets, rows=rows, data=[], indices=[],
               cell=[], cell_id=[], total=[], dataset=[], label=[])
    ptr = [np.zeros(1, dtype=np.int64)]
    for si, r in enumerate(rows):
        path = os.path.join(folder, r["file"])
        raw = open(path, "rb").read()
        check(len(raw) == r["bytes"], "%s: bytes %d, manifest %d" % (path, len(raw), r["bytes"]))
        check("%08x" % zlib.crc32(raw) == r["file_crc32"], "%s: file_crc32" % path)
        f = h5py.File(path, "r")
        check(s(f.attrs["encoding-type"]) == "anndata" and s(f.attrs["encoding-version"]) == "0.1.0",
              "%s: root attributes" % path)
        X = f["X"]
        check(s(X.attrs["encoding-type"]) == "csr_matrix", "%s: X encoding" % path)
        check(list(X.attrs["shape"]) == [r["n_cells"], int(head["n_genes"][0])], "%s: X shape" % path)
        check(X["data"].dtype == np.int32 and X["indices"].dtype == np.int32 and
              X["indptr"].dtype == np.int64, "%s: X dtypes" % path)
        for name in ("data", "indices"):
            filters = X[name]._filters
            check("shuffle" in filters and "32015" in filters, "%s: X/%s filters %s" % (path, name, filters))
        data, indices, indptr = X["data"][:], X["indices"][:], X["indptr"][:]
        cell_id = f["obs/cell_id"][:]
        codes = f["obs/%s/codes" % label_key][:].astype(np.int32) if label_key else None
        crc = zlib.crc32(indptr.astype("<i8").tobytes())
        crc = zlib.crc32(indices.astype("<i4").tobytes(), crc)
        crc = zlib.crc32(data.astype("<i4").tobytes(), crc)
        crc = zlib.crc32(cell_id.astype("<i8").tobytes(), crc)
        if label_key:
            crc = zlib.crc32(codes.astype("<i4").tobytes(), crc)
        check("%08x" % crc == r["content_crc32"], "%s: content_crc32" % path)
        check(len(indptr) == r["n_cells"] + 1 and indptr[0] == 0 and indptr[-1] == r["nnz"],
              "%s: indptr" % path)
        check(np.all(data > 0), "%s: counts > 0" % path)
        for k in range(r["n_cells"]):
            row = indices[indptr[k]:indptr[k + 1]]
            if len(row) > 1 and not np.all(np.diff(row) > 0):
                check(False, "%s: cell %d genes not ascending" % (path, k))
                break
        check(list(cell_id) == list(range(r["first_cell"], r["first_cell"] + r["n_cells"])),
              "%s: cell ids" % path)
        u = f["uns/perfcell"]
        check(u["vocab_hash"][()].decode() == head["vocab_hash"][0] and
              int(u["shard_index"][()]) == si and int(u["first_cell"][()]) == r["first_cell"] and
              int(u["format_version"][()]) == 1, "%s: uns/perfcell" % path)
        cells = [s(c) for c in f["obs/cell"][:]]
        dcats = [s(c) for c in f["obs/dataset/categories"][:]]
        dcodes = f["obs/dataset/codes"][:]
        lcats = [s(c) for c in f["obs/%s/categories" % label_key][:]] if label_key else []
        out["data"].append(data)
        out["indices"].append(indices)
        ptr.append(indptr[1:] + ptr[-1][-1])
        out["cell"] += cells
        out["cell_id"] += list(cell_id)
        out["total"] += list(f["obs/total_counts"][:])
        out["dataset"] += [dcats[c] for c in dcodes]
        out["label"] += [lcats[c] if c >= 0 else None for c in codes] if label_key else []
        symbols = [s(g) for g in f["var/gene"][:]]
        gids = [s(g) for g in f["var/gene_ids"][:]]
        out.setdefault("symbols", symbols)
        out.setdefault("ids", gids)
        check(symbols == out["symbols"] and gids == out["ids"], "%s: var differs between shards" % path)
        # anndata shows the same cells, genes, counts and labels.
        a = ad.read_h5ad(path)
        check(list(a.obs_names) == cells, "%s: anndata obs_names" % path)
        check(list(a.var_names) == symbols, "%s: anndata var_names" % path)
        A = sp.csr_matrix(a.X)
        B = sp.csr_matrix((data, indices, indptr), shape=A.shape)
        check(A.dtype == np.int32 and (A != B).nnz == 0, "%s: anndata X" % path)
        if label_key:
            got = [None if v != v else str(v) for v in a.obs[label_key]]
            check(got == [lcats[c] if c >= 0 else None for c in codes], "%s: anndata labels" % path)
        check(list(a.obs["cell_id"]) == list(cell_id), "%s: anndata cell_id" % path)
    # One CSR over all shards.
    ptr = np.concatenate(ptr)
    n_genes = int(head["n_genes"][0])
    out["X"] = sp.csr_matrix((np.concatenate(out["data"]) if out["data"] else [],
                              np.concatenate(out["indices"]) if out["indices"] else [], ptr),
                             shape=(len(ptr) - 1, n_genes))
    return out


def compare(folder, inputs, v, label_key, names=None, report=None):
    """The shard folder holds exactly the inputs (list of dicts) mapped to vocabulary v."""
    got = read_shards(folder, label_key)
    head = got["head"]
    cells = sum(len(d["cells"]) for d in inputs)
    check(int(head["n_cells"][0]) == cells, "n_cells %s, expected %d" % (head["n_cells"], cells))
    check(head["vocab_hash"][0] == vocab_hash(v), "vocab_hash %s, expected %s" % (head["vocab_hash"], vocab_hash(v)))
    check(got["symbols"] == v.symbols and got["ids"] == v.ids, "var/gene, var/gene_ids vs vocabulary")
    check(Vocab.load(os.path.join(folder, "vocab.tsv")).symbols == v.symbols, "vocab.tsv in the folder")
    mats, stats = [], []
    for d in inputs:
        P, st = mapping(d, v)
        mats.append(sp.csr_matrix(d["X"] @ P))
        stats.append(st)
    want = sp.vstack(mats).tocsr() if mats else None
    want.eliminate_zeros()
    want.sort_indices()
    G = got["X"]
    check(G.shape == want.shape, "X shape %s, expected %s" % (G.shape, want.shape))
    if G.shape == want.shape:
        diff = (G.astype(np.float64) - want)
        check(abs(diff).sum() == 0, "counts differ in %d places" % abs(diff).nnz)
        # cell by cell, also the stored genes (no explicit zeros)
        bad = [k for k in range(G.shape[0]) if not np.array_equal(G.indices[G.indptr[k]:G.indptr[k + 1]],
                                                                   want.indices[want.indptr[k]:want.indptr[k + 1]])]
        check(not bad, "stored genes differ for %d cells, first %s" % (len(bad), bad[:3]))
    check(int(head["nnz"][0]) == want.nnz, "manifest nnz")
    want_cells = [c for d in inputs for c in d["cells"]]
    check(got["cell"] == want_cells, "cell names / order")
    check(got["cell_id"] == list(range(cells)), "cell ids")
    want_total = [int(t) for d in inputs for t in np.asarray(d["X"].sum(axis=1)).ravel()]
    check([int(t) for t in got["total"]] == want_total, "total_counts")
    if names:
        check(got["dataset"] == [n for n, d in zip(names, inputs) for _ in d["cells"]], "dataset names")
        check([x[0] for x in got["datasets"]] == names, "manifest datasets")
    if label_key:
        want_labels = [l for d in inputs for l in d["labels"]]
        check(got["label"] == want_labels, "labels (%d differ)" %
              sum(a != b for a, b in zip(got["label"], want_labels)))
        used = sorted(set(l for l in want_labels if l is not None))
        check([x[0] for x in got["labels"]] == used, "label categories %s" % [x[0] for x in got["labels"]])
        check([x[1] for x in got["labels"]] == [want_labels.count(l) for l in used], "label counts")
        check(head["label_key"] == [label_key], "manifest label_key")
    else:
        check(head["label_key"] == ["-"], "manifest label_key '-'")
    if report is not None:
        for k, (st, d) in enumerate(zip(stats, inputs)):
            line = [l for l in report.splitlines() if l.startswith("input %d '" % k)]
            check(len(line) == 1, "report line of input %d" % k)
            if line:
                want_txt = "genes: %d matched, %d missing, %d dropped, %d duplicates" % (
                    st["matched"], st["missing"], st["dropped"], st["duplicates"])
                check(want_txt in line[0], "report '%s' lacks '%s'" % (line[0], want_txt))
                m = mats[k].tocsr()
                m.eliminate_zeros()
                n_empty = int(np.sum(np.diff(m.indptr) == 0))
                check("%d cells (%d empty" % (len(d["cells"]), n_empty) in line[0],
                      "report empty cells: '%s', expected %d" % (line[0], n_empty))
    return got, stats


# ---------------------------------------------------------------------------
# Commands

def build(inputs, out, vocab, np_=1, extra=(), expect_ok=True):
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = MPIRUN + ["-np", str(np_), SHARD, "build"] + inputs + ["--vocab", vocab, "--out", out] + list(extra)
    return run(cmd, expect_ok)


def input_opts(a):
    o = []
    if a.genome:
        o += ["--genome", a.genome]
    if a.use_raw:
        o += ["--use-raw"]
    if a.layer:
        o += ["--layer", a.layer]
    return o


def cmd_roundtrip(a):
    out = os.path.join(TMP, "shards")
    d = read_input(a.input, a.genome, a.use_raw, a.layer, a.label_key, a.labels)
    if a.vocab:
        vpath = a.vocab
    else:
        vpath = os.path.join(TMP, "vocab.tsv")
        if os.path.exists(vpath):
            os.remove(vpath)
        run([SHARD, "vocab", a.input, "--out", vpath] + input_opts(a))
    v = Vocab.load(vpath)
    if not a.vocab:
        u = union_vocab(d)
        check(v.symbols == u.symbols and v.ids == u.ids, "vocabulary is the union of the input's genes")
    extra = input_opts(a) + ["--shard-cells", str(a.shard_cells)]
    if a.piece_cells:
        extra += ["--piece-cells", str(a.piece_cells)]
    label_key = None
    if a.labels:
        extra += ["--labels", a.labels]
        label_key = a.label_key or "label"
        if a.label_key:
            extra += ["--label-key", a.label_key]
        else:
            rows = text_lines(a.labels)
            label_key = rows[0][1] if rows[0][0].lower() in ("barcode", "cell") else "label"
    elif a.label_key:
        extra += ["--label-key", a.label_key]
        label_key = a.label_key
    p = build([a.input], out, vpath, a.np, extra)
    for text in a.expect_report or []:
        check(text in p.stdout, "report lacks '%s'" % text)
    compare(out, [d], v, label_key, report=p.stdout)
    # h5dump (HDF5's own tool) decodes the Zstandard chunks through the plugin.
    h = subprocess.run(["h5dump", "-d", "/X/data", "-c", "3", os.path.join(out, "shard-00000.h5ad")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    check(h.returncode == 0 and "DATA" in h.stdout, "h5dump reads X/data:\n" + h.stdout[-500:])


def cmd_invariance(a):
    vpath = os.path.join(TMP, "vocab.tsv")
    run([SHARD, "vocab", a.input, "--out", vpath])
    extra = ["--shard-cells", str(a.shard_cells)] + (["--label-key", a.label_key] if a.label_key else [])
    results = []
    for n, piece in ((1, 0), (2, 0), (3, 0), (3, 97)):
        out = os.path.join(TMP, "np%d_%d" % (n, piece))
        build([a.input], out, vpath, n, extra + (["--piece-cells", str(piece)] if piece else []))
        results.append((n, piece, read_shards(out, a.label_key)))
    base = results[0][2]
    check(len(base["rows"]) > 2, "several shards written (%d)" % len(base["rows"]))
    for n, piece, r in results[1:]:
        tag = "np %d piece %d" % (n, piece)
        check([x["content_crc32"] for x in r["rows"]] == [x["content_crc32"] for x in base["rows"]],
              tag + ": content_crc32 differs from np 1")
        check([(x["n_cells"], x["first_cell"], x["nnz"]) for x in r["rows"]] ==
              [(x["n_cells"], x["first_cell"], x["nnz"]) for x in base["rows"]], tag + ": shard table")
        check((r["X"] != base["X"]).nnz == 0, tag + ": X differs")
        for key in ("cell", "cell_id", "total", "dataset", "label"):
            check(r[key] == base[key], tag + ": obs " + key)
        check(r["labels"] == base["labels"] and r["datasets"] == base["datasets"], tag + ": manifest")
    d = read_input(a.input, label_key=a.label_key)
    compare(os.path.join(TMP, "np3_97"), [d], Vocab.load(vpath), a.label_key)


def cmd_variants(a):
    """CSC, dense and integer-layer .h5ad files made here from mouse bladder."""
    import anndata as ad
    src = ad.read_h5ad(os.path.join(DATA, "other/mouse_bladder_top2000.h5ad"))
    src = src[:700].copy()
    counts = sp.csr_matrix(src.X)
    lognorm = counts.multiply(1e4 / np.maximum(counts.sum(axis=1), 1)).tocsr()
    lognorm.data = np.log1p(lognorm.data)
    files = {}
    # X as CSC, float64; gene ids in a var column.
    b = ad.AnnData(sp.csc_matrix(counts, dtype=np.float64), obs=src.obs.copy(), var=src.var.copy())
    b.var["gene_ids"] = ["ENSMUSG%011d.%d" % (i, i % 3 + 1) for i in range(b.n_vars)]
    files["csc"] = os.path.join(TMP, "csc.h5ad")
    b.write_h5ad(files["csc"])
    # X dense int32.
    c = ad.AnnData(counts.toarray().astype(np.int32), obs=src.obs.copy(), var=src.var.copy(), dtype=np.int32)
    files["dense"] = os.path.join(TMP, "dense.h5ad")
    c.write_h5ad(files["dense"])
    # X log-normalised, counts in layers/counts as int64, and raw/X = counts.
    e = ad.AnnData(lognorm.astype(np.float32), obs=src.obs.copy(), var=src.var.copy())
    e.layers["counts"] = sp.csr_matrix(counts, dtype=np.int64)
    e.raw = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), var=src.var.copy())
    files["layer"] = os.path.join(TMP, "layer.h5ad")
    e.write_h5ad(files["layer"])
    for kind, opts in (("csc", []), ("dense", []), ("layer", ["--layer", "counts"]), ("layer", ["--use-raw"])):
        path = files[kind]
        print("== variant", kind, opts)
        vpath = os.path.join(TMP, "vocab_%s.tsv" % kind)
        if not os.path.exists(vpath):
            run([SHARD, "vocab", path, "--out", vpath] + (["--use-raw"] if "--use-raw" in opts else []))
        out = os.path.join(TMP, "out_%s" % kind)
        p = build([path], out, vpath, 2, opts + ["--label-key", "celltype", "--shard-cells", "300"])
        d = read_input(path, use_raw="--use-raw" in opts, layer="counts" if "--layer" in opts else None,
                       label_key="celltype")
        compare(out, [d], Vocab.load(vpath), "celltype", report=p.stdout)
        if kind == "csc":
            check(Vocab.load(vpath).ids[0] == "ENSMUSG00000000000.1", "ids from var/gene_ids")
    # The same file's X is refused, naming the layers that hold counts.
    p = build([files["layer"]], os.path.join(TMP, "out_refused"), os.path.join(TMP, "vocab_layer.tsv"), 2,
              ["--label-key", "celltype"], expect_ok=False)
    check(p.returncode != 0 and "X does not hold raw counts" in p.stdout and "non-integer" in p.stdout
          and "--layer counts" in p.stdout and "--use-raw" in p.stdout, "log-normalised X refused with hints")
    check(not os.path.exists(os.path.join(TMP, "out_refused")) and
          not os.path.exists(os.path.join(TMP, "out_refused.partial")), "no folder after a refusal")


def cmd_mismatch(a):
    """A vocabulary that differs from the input: missing, dropped and duplicate genes."""
    import anndata as ad
    src = ad.read_h5ad(os.path.join(DATA, "other/mouse_bladder_top2000.h5ad"))[:500].copy()
    names = list(src.var_names)
    # Input: gene 7 is a second copy of gene 3 (same symbol): a duplicate.
    names[7] = names[3]
    path = os.path.join(TMP, "dup.h5ad")
    with h5py.File(path, "w") as f:
        X = sp.csr_matrix(src.X, dtype=np.float32)
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = np.array(X.shape, dtype=np.int64)
        g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
        for frame, index in (("obs", list(src.obs_names)), ("var", names)):
            h = f.create_group(frame)
            h.attrs["encoding-type"], h.attrs["encoding-version"] = "dataframe", "0.2.0"
            h.attrs["_index"] = "_index"
            h.attrs["column-order"] = np.array([]) if frame == "var" else ["celltype"]
            h.create_dataset("_index", data=np.array(index, dtype=object), dtype=h5py.string_dtype())
        c = f.create_group("obs/celltype")
        c.attrs["encoding-type"], c.attrs["encoding-version"], c.attrs["ordered"] = "categorical", "0.2.0", False
        cats = list(src.obs.celltype.cat.categories)
        codes = src.obs.celltype.cat.codes.values.astype(np.int8)
        codes[::50] = -1  # missing labels
        c.create_dataset("categories", data=np.array(cats, dtype=object), dtype=h5py.string_dtype())
        c["codes"] = codes
        # The same labels as a string column, and as a pre-0.8 categorical
        # (integer codes, categories in uns/<col>_categories).
        f["obs"].create_dataset("ct_str", data=np.array([cats[k] if k >= 0 else "" for k in codes], dtype=object),
                                dtype=h5py.string_dtype())
        f["obs/ct_old"] = codes.astype(np.int16)
        f.create_group("uns").create_dataset("ct_old_categories", data=np.array(cats, dtype="S"))
    # Vocabulary: genes 0..99 of the input minus 10..19 (dropped), plus 5 unknown genes (missing).
    vpath = os.path.join(TMP, "vocab.tsv")
    vgenes = [n for i, n in enumerate(src.var_names[:100]) if not 10 <= i < 20 and i != 7]
    vgenes = vgenes[:50] + ["NOT_A_GENE_%d" % k for k in range(5)] + vgenes[50:]
    with open(vpath, "w") as fh:
        fh.write("".join(g + "\n" for g in vgenes))
    v = Vocab.load(vpath)
    d = read_input(path, label_key="celltype")
    P, st = mapping(d, v)
    # matched: genes 0..99 less 10..19 and 7; dropped: the other input genes less gene 7's copy
    expect = (89, 5, 2003 - 89 - 1, 1)  # matched, missing, dropped, duplicates
    check((st["matched"], st["missing"], st["dropped"], st["duplicates"]) == expect,
          "independent mapping %s, expected %s" % (st, expect))
    out = os.path.join(TMP, "shards")
    p = build([path], out, vpath, 2, ["--label-key", "celltype", "--shard-cells", "200"])
    check("genes: 89 matched, 5 missing, 1913 dropped, 1 duplicates" in p.stdout, "report numbers")
    got, _ = compare(out, [d], v, "celltype", report=p.stdout)
    # The duplicate's counts are summed: gene 3's column is input genes 3 + 7.
    col = v.symbols.index(names[3])
    want = np.asarray(d["X"][:, 3].todense()).ravel() + np.asarray(d["X"][:, 7].todense()).ravel()
    check(np.array_equal(np.asarray(got["X"][:, col].todense()).ravel(), want), "duplicate genes summed")
    missing = [v.symbols.index("NOT_A_GENE_%d" % k) for k in range(5)]
    check(got["X"][:, missing].nnz == 0, "missing genes are zero")
    check(sum(1 for t in got["total"]) == 500, "cells")
    check(got["label"].count(None) == 10, "cells with code -1 are unlabelled")
    # Labels from a string column and from a pre-0.8 categorical: the same labels.
    for key in ("ct_str", "ct_old"):
        outk = os.path.join(TMP, "shards_" + key)
        p = build([path], outk, vpath, 2, ["--label-key", key, "--shard-cells", "200"])
        check("labels: 490 labelled, 10 unlabelled" in p.stdout, key + ": labelled cells reported")
        d2 = dict(d)
        d2["labels"] = got["label"]
        compare(outk, [d2], v, key)


def cmd_multi(a):
    """Two inputs of different formats in one build: union vocabulary (ids on one
    side only), --min-cells, dataset names, labels from a TSV covering one input."""
    h5ad = os.path.join(DATA, "pbmc3k/pbmc3k_counts.h5ad")
    tenx = os.path.join(DATA, "10x_formats/3.0.0/filtered_feature_bc_matrix.h5")
    tsv = os.path.join(DATA, "pbmc3k/labels.tsv")
    d = [read_input(h5ad, labels_tsv=tsv), read_input(tenx, labels_tsv=tsv)]
    u = Vocab()
    for x in d:
        for sym, i in zip(x["symbols"], x["ids"]):
            if u.match(sym, i) is None:
                u.add(sym, i)
    vpath = os.path.join(TMP, "vocab.tsv")
    run([SHARD, "vocab", h5ad, tenx, "--out", vpath])
    v = Vocab.load(vpath)
    check(v.symbols == u.symbols and v.ids == u.ids, "union vocabulary of two inputs")
    check(any(v.ids) and not all(v.ids), "ids on one side only")
    # --min-cells: genes with counts in at least 50 cells over both inputs.
    detected = np.zeros(len(u.symbols))
    for x in d:
        P, _ = mapping(x, u)
        M = sp.csr_matrix(x["X"] @ P)
        M.eliminate_zeros()
        detected += np.diff(M.tocsc().indptr)
    keep = [g for g in range(len(u.symbols)) if detected[g] >= 50]
    vmin = os.path.join(TMP, "vocab_min.tsv")
    p = run([SHARD, "vocab", h5ad, tenx, "--out", vmin, "--min-cells", "50"])
    vm = Vocab.load(vmin)
    check(vm.symbols == [u.symbols[g] for g in keep], "--min-cells 50 keeps %d genes, expected %d"
          % (len(vm.symbols), len(keep)))
    check(run([SHARD, "vocab", h5ad, "--out", vmin], expect_ok=False).returncode != 0,
          "an existing vocabulary is not replaced without --force")
    out = os.path.join(TMP, "shards")
    p = build([h5ad, tenx], out, vmin, 3, ["--labels", tsv, "--shard-cells", "1500",
                                           "--dataset-name", "pbmc", "--dataset-name", "chr21"])
    check("1107 cells labelled" not in p.stdout and "0 cells labelled, 1107 unlabelled" in p.stdout,
          "cells missing from the TSV reported unlabelled")
    check("labels: 0 labelled, 1107 unlabelled" in p.stdout, "report: unlabelled cells")
    compare(out, d, vm, "celltype", names=["pbmc", "chr21"], report=p.stdout)


def expect_refusal(name, cmd, patterns, out=None):
    print("== refusal:", name)
    p = run(cmd, expect_ok=False)
    check(p.returncode != 0, "%s: exit status 0" % name)
    for pat in patterns:
        check(re.search(pat, p.stdout) is not None, "%s: message lacks /%s/" % (name, pat))
    if out:
        check(not os.path.exists(out), "%s: '%s' exists after the refusal" % (name, out))
        check(not os.path.exists(out + ".partial"), "%s: '%s.partial' left" % (name, out))


def cmd_refusals(a):
    pbmc = os.path.join(DATA, "pbmc3k/pbmc3k_counts.h5ad")
    lognorm = os.path.join(DATA, "other/pbmc68k_reduced_lognorm.h5ad")
    vpath = os.path.join(TMP, "vocab.tsv")
    run([SHARD, "vocab", pbmc, "--out", vpath])
    v68 = os.path.join(TMP, "vocab68.tsv")
    run([SHARD, "vocab", lognorm, "--out", v68])
    out = os.path.join(TMP, "out")
    B = MPIRUN + ["-np", "2", SHARD, "build"]
    expect_refusal("lognorm X", B + [lognorm, "--vocab", v68, "--out", out],
                   [r"pbmc68k_reduced_lognorm\.h5ad: X does not hold raw counts", r"negative",
                    r"non-integer", r"among 535,500 values", r"at cell 0 'AAAGCCTGGCTAAC-1', gene 'HES4'",
                    r"scaled", r"HINT: .*raw/X \(--use-raw\)"], out)
    expect_refusal("lognorm raw/X", B + [lognorm, "--vocab", v68, "--out", out, "--use-raw"],
                   [r"raw/X does not hold raw counts", r"174,148 non-integer values among 174,400 stored",
                    r"log-normalised", r"HINT: .*X \(without --use-raw"], out)
    expect_refusal("missing input", B + [os.path.join(TMP, "nope.h5ad"), "--vocab", vpath, "--out", out],
                   [r"input '.*nope\.h5ad' does not exist", r"HINT"], out)
    txt = os.path.join(TMP, "notes.txt")
    open(txt, "w").write("just some text\n")
    expect_refusal("unknown format", B + [txt, "--vocab", vpath, "--out", out],
                   [r"notes\.txt' has an unknown format", r"HINT: .*\.h5ad.*10x"], out)
    expect_refusal("missing label column", B + [pbmc, "--vocab", vpath, "--out", out, "--label-key", "cell_type"],
                   [r"no obs column 'cell_type'", r"'celltype'", r"'seurat_cluster'", r"HINT: pass --label-key"], out)
    expect_refusal("labels for a 10x file without a TSV",
                   B + [os.path.join(DATA, "pbmc3k/filtered_feature_bc_matrix.h5"), "--vocab", vpath, "--out", out,
                        "--label-key", "celltype"], [r"carry no cell labels", r"--labels"], out)
    expect_refusal("vocab is not a vocab", B + [pbmc, "--vocab", pbmc, "--out", out],
                   [r"is not a vocabulary: it is an HDF5 file", r"HINT: a vocabulary is a text file"], out)
    dup = os.path.join(TMP, "dup_vocab.tsv")
    open(dup, "w").write("CD3D\nMS4A1\nCD3D\n")
    expect_refusal("vocab with a duplicate gene", B + [pbmc, "--vocab", dup, "--out", out],
                   [r"dup_vocab\.tsv:3: duplicate gene 'CD3D'.*line 1", r"HINT"], out)
    blank = os.path.join(TMP, "blank_vocab.tsv")
    open(blank, "w").write("CD3D\n\nMS4A1\n")
    expect_refusal("vocab with a blank line", B + [pbmc, "--vocab", blank, "--out", out],
                   [r"blank_vocab\.tsv:2: blank line"], out)
    expect_refusal("two genomes without --genome",
                   B + [os.path.join(DATA, "10x_formats/1.2.0/multiple_genomes.h5"), "--vocab", vpath, "--out", out],
                   [r"holds 2 genomes \(another_genome, hg19_chr21\)", r"--genome all"], out)
    expect_refusal("unknown genome",
                   B + [os.path.join(DATA, "10x_formats/1.2.0/multiple_genomes.h5"), "--vocab", vpath, "--out", out,
                        "--genome", "mm10"], [r"no genome 'mm10' \(genomes: another_genome, hg19_chr21\)"], out)
    expect_refusal("missing layer", B + [pbmc, "--vocab", vpath, "--out", out, "--layer", "counts"],
                   [r"has no layers/counts"], out)
    # Malformed MatrixMarket folders (copies of the v2 folder).
    src = os.path.join(DATA, "10x_formats/1.2.0/filtered_gene_bc_matrices/hg19_chr21")
    mtx_lines = open(os.path.join(src, "matrix.mtx")).read().split("\n")
    cases = {
        "truncated": ("\n".join(mtx_lines[:-4]) + "\n", r"entries, but the size line declares 12 \(truncated"),
        "out_of_range": ("\n".join(mtx_lines[:3] + ["344 1 5"] + mtx_lines[4:]),
                         r"matrix\.mtx:4: entry \(344, 1\) outside the 343 x 12 matrix"),
        "bad_banner": ("%%MatrixMarket matrix coordinate pattern general\n" + "\n".join(mtx_lines[1:]),
                       r"field 'pattern' holds no counts"),
        "bad_sizes": ("\n".join(mtx_lines[:2] + ["343 13 12"] + mtx_lines[3:]),
                      r"the matrix is 343 x 13 but the folder lists 343 features and 12 barcodes"),
        "bad_entry": ("\n".join(mtx_lines[:5] + ["7 x 1"] + mtx_lines[6:]), r"bad entry '7 x 1'"),
    }
    for name, (text, pat) in cases.items():
        d = os.path.join(TMP, "mtx_" + name)
        os.makedirs(d, exist_ok=True)
        for fn in ("genes.tsv", "barcodes.tsv"):
            shutil.copy(os.path.join(src, fn), d)
        open(os.path.join(d, "matrix.mtx"), "w").write(text)
        vv = os.path.join(d, "v.tsv")
        if not os.path.exists(vv):
            shutil.copy(os.path.join(src, "genes.tsv"), vv)
            open(vv, "w").write("".join(l.split("\t")[0] + "\n" for l in open(os.path.join(src, "genes.tsv"))))
        expect_refusal("mtx " + name, B + [d, "--vocab", vv, "--out", out], [pat], out)
    # An existing output folder: refused without --force, replaced with it.
    small = os.path.join(DATA, "10x_formats/3.0.0/filtered_feature_bc_matrix.h5")
    vs = os.path.join(TMP, "vocab_small.tsv")
    run([SHARD, "vocab", small, "--out", vs])
    run(B + [small, "--vocab", vs, "--out", out])
    before = open(os.path.join(out, "manifest.tsv")).read()
    expect_refusal("existing output", B + [small, "--vocab", vs, "--out", out],
                   [r"output folder '.*' already exists", r"HINT: pass --force"])
    check(open(os.path.join(out, "manifest.tsv")).read() == before, "existing folder untouched")
    run(B + [small, "--vocab", vs, "--out", out, "--force", "--shard-cells", "500"])
    check(len(read_manifest(out)[3]) == 3, "--force replaced the folder (3 shards)")
    check(not os.path.exists(out + ".old") and not os.path.exists(out + ".partial"), "no leftovers")
    # A refusal during the build (counts) leaves the old folder in place.
    expect_refusal("failed rebuild keeps the old folder", B + [lognorm, "--vocab", v68, "--out", out, "--force"],
                   [r"does not hold raw counts"])
    check(len(read_manifest(out)[3]) == 3, "old folder kept after a failed --force build")
    # A folder holding other files is never replaced.
    other = os.path.join(TMP, "precious")
    os.makedirs(other, exist_ok=True)
    open(os.path.join(other, "notes.txt"), "w").write("keep me")
    expect_refusal("folder with other files", B + [small, "--vocab", vs, "--out", other, "--force"],
                   [r"holds 'notes\.txt', which is not part of a shard folder"])
    check(os.path.exists(os.path.join(other, "notes.txt")), "other files kept")
    # Option errors.
    expect_refusal("unknown option", [SHARD, "build", pbmc, "--vocab", vpath, "--out", out, "--shard-cell", "5"],
                   [r"unknown option '--shard-cell'", r"did you mean --shard-cells"])
    expect_refusal("bad number", [SHARD, "build", pbmc, "--vocab", vpath, "--out", out, "--level", "99"],
                   [r"bad value '99' for --level", r"from 1 to 22"])
    for sub in ([], ["vocab"], ["build"]):
        p = run([SHARD] + sub + ["--help"])
        check(p.returncode == 0 and "usage:" in p.stdout, "--help of %s" % (sub or "the program"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command")
    ap.add_argument("input", nargs="?")
    ap.add_argument("--genome")
    ap.add_argument("--use-raw", action="store_true")
    ap.add_argument("--layer")
    ap.add_argument("--label-key")
    ap.add_argument("--labels")
    ap.add_argument("--vocab")
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--shard-cells", type=int, default=1000)
    ap.add_argument("--piece-cells", type=int, default=0)
    ap.add_argument("--expect-report", action="append")
    a = ap.parse_args()
    {"roundtrip": cmd_roundtrip, "invariance": cmd_invariance, "variants": cmd_variants,
     "mismatch": cmd_mismatch, "refusals": cmd_refusals, "multi": cmd_multi}[a.command](a)
    if failures:
        print("%d check(s) failed" % len(failures), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
