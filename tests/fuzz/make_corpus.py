#!/usr/bin/env python3
"""Make the fuzzing seed corpora in tests/fuzz/corpus/<target>/ from the real
data sets of ../shared/data, with perfcell's own programs where perfcell
writes the format (shards, manifests, vocabularies, checkpoints) and with
anndata / h5py where the format is a user's input (.h5ad, 10x HDF5).

    /usr/bin/python3 tests/fuzz/make_corpus.py [--bin bin] [--data ../shared/data]

Seeds are kept small (a few KB each: libFuzzer mutates small inputs much
faster) and the whole corpus well under 2 MB. Regenerating replaces the
corpus; checkpoints carry their creation time, so they differ byte for byte
from one run to the next.
"""
import argparse
import glob
import gzip
import os
import shutil
import subprocess
import sys
import tempfile

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus")


def run(cmd, **kw):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def put(target, name, src=None, data=None):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    dst = os.path.join(d, name)
    if src is not None:
        shutil.copyfile(src, dst)
    else:
        with open(dst, "wb") as f:
            f.write(data)
    print("  %-40s %7d bytes" % (os.path.relpath(dst, CORPUS), os.path.getsize(dst)))


def pbmc_subset(data, n_cells, n_genes):
    """The first n_cells of pbmc3k and the n_genes genes with most counts in them."""
    a = anndata.read_h5ad(os.path.join(data, "pbmc3k", "pbmc3k_counts.h5ad"))
    a = a[:n_cells].copy()
    tot = np.asarray(a.X.sum(axis=0)).ravel()
    keep = np.sort(np.argsort(-tot, kind="stable")[:n_genes])
    a = a[:, keep].copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return anndata.AnnData(X=a.X, obs=a.obs[["celltype"]].copy(), var=pd.DataFrame(index=a.var_names))


def h5ad_seeds(data, w):
    a = pbmc_subset(data, 12, 24)
    p = os.path.join(w, "csr.h5ad")
    a.write_h5ad(p)
    put("h5ad", "pbmc3k_12x24_csr.h5ad", p)
    b = a.copy()
    b.X = sp.csc_matrix(b.X)
    b.write_h5ad(p)
    put("h5ad", "pbmc3k_12x24_csc.h5ad", p)
    b = a.copy()
    b.X = b.X.toarray()
    b.write_h5ad(p)
    put("h5ad", "pbmc3k_12x24_dense.h5ad", p)
    # Counts in layers/counts and raw/X, log-normalised values in X.
    b = a.copy()
    b.layers["counts"] = b.X.copy()
    b.raw = b
    x = b.X.toarray()
    x = np.log1p(1e4 * x / np.maximum(x.sum(axis=1, keepdims=True), 1))
    b.X = x.astype(np.float32)
    b.write_h5ad(p)
    put("h5ad", "pbmc3k_12x24_layers_raw.h5ad", p)
    # A real non-count matrix: scanpy's reduced PBMC 68k (scaled X, log raw/X).
    c = anndata.read_h5ad(os.path.join(data, "other", "pbmc68k_reduced_lognorm.h5ad"))
    c = c[:10, :16].copy()
    c = anndata.AnnData(X=np.asarray(c.X, dtype=np.float32), obs=c.obs[["bulk_labels"]].copy(),
                        var=pd.DataFrame(index=c.var_names))
    c.write_h5ad(p)
    put("h5ad", "pbmc68k_reduced_10x16_scaled.h5ad", p)


def tenx_h5_seeds(data, w):
    put("10x_h5", "v2_hg19_chr21.h5", os.path.join(data, "10x_formats", "1.2.0", "filtered_gene_bc_matrices_h5.h5"))
    # CellRanger v3 layout, cut to the first 16 cells and 40 features.
    src = os.path.join(data, "10x_formats", "3.0.0", "filtered_feature_bc_matrix.h5")
    p = os.path.join(w, "v3.h5")
    n_cells, n_feat = 16, 40
    with h5py.File(src, "r") as f, h5py.File(p, "w", libver="earliest") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        m = f["matrix"]
        ip = m["indptr"][: n_cells + 1]
        idx = m["indices"][: ip[-1]]
        val = m["data"][: ip[-1]]
        keep = idx < n_feat
        new_ip = np.concatenate([[0], np.cumsum([keep[ip[i]:ip[i + 1]].sum() for i in range(n_cells)])])
        gm = g.create_group("matrix")
        gm["barcodes"] = m["barcodes"][:n_cells]
        gm["data"] = val[keep]
        gm["indices"] = idx[keep]
        gm["indptr"] = new_ip.astype(m["indptr"].dtype)
        gm["shape"] = np.array([n_feat, n_cells], dtype=m["shape"].dtype)
        gf = gm.create_group("features")
        gf["_all_tag_keys"] = m["features"]["_all_tag_keys"][()]
        for k in ("feature_type", "genome", "id", "name"):
            gf[k] = m["features"][k][:n_feat]
    put("10x_h5", "v3_16cells_40features.h5", p)


def mtx_seeds(data):
    # The harness input: flags byte, then matrix.mtx, NUL, barcodes, NUL, genes
    # (see fuzz_mtx.c). Flags 0: v2 names, nothing gzipped.
    d = os.path.join(data, "10x_formats", "1.2.0", "filtered_gene_bc_matrices", "hg19_chr21")
    mtx = open(os.path.join(d, "matrix.mtx"), "rb").read()
    bc = open(os.path.join(d, "barcodes.tsv"), "rb").read()
    genes = open(os.path.join(d, "genes.tsv"), "rb").read()
    put("mtx", "v2_hg19_chr21", data=b"\x00" + mtx + b"\x00" + bc + b"\x00" + genes)
    # The CellRanger 3.0.0 folder cut to 6 cells and 60 features (flags 3: v3
    # names, gzipped matrix).
    d = os.path.join(data, "10x_formats", "3.0.0", "filtered_feature_bc_matrix")
    lines = gzip.open(os.path.join(d, "matrix.mtx.gz"), "rb").read().split(b"\n")
    head = [l for l in lines if l.startswith(b"%")]
    body = [l for l in lines if l and not l.startswith(b"%")]
    rows, cols, _ = body[0].split()
    entries = [l.split() for l in body[1:]]
    entries = [e for e in entries if int(e[1]) <= 6 and int(e[0]) <= 60]
    mtx = b"\n".join(head + [b"60 6 %d" % len(entries)] + [b" ".join(e) for e in entries]) + b"\n"
    bc = b"".join(gzip.open(os.path.join(d, "barcodes.tsv.gz"), "rb").readlines()[:6])
    feat = b"".join(gzip.open(os.path.join(d, "features.tsv.gz"), "rb").readlines()[:60])
    put("mtx", "v3_6cells_60features", data=b"\x03" + mtx + b"\x00" + bc + b"\x00" + feat)
    # pbmc3k's folder cut to 8 cells and the 80 first genes, with its labels
    # file (flags 31: all gzipped, v3 names, labels read with column celltype).
    d = os.path.join(data, "pbmc3k", "filtered_feature_bc_matrix")
    n_cells, n_genes = 8, 80
    head, entries, sized = [], [], False
    with gzip.open(os.path.join(d, "matrix.mtx.gz"), "rb") as f:
        for line in f:  # entries are in cell order: stop after the 8th cell
            if line.startswith(b"%"):
                head.append(line.rstrip(b"\n"))
            elif not sized:
                sized = True  # the size line, written anew below
            else:
                g, c, _ = line.split()
                if int(c) > n_cells:
                    break
                if int(g) <= n_genes:
                    entries.append(line.rstrip(b"\n"))
    mtx = b"\n".join(head + [b"%d %d %d" % (n_genes, n_cells, len(entries))] + entries) + b"\n"
    bc = b"".join(gzip.open(os.path.join(d, "barcodes.tsv.gz"), "rb").readlines()[:n_cells])
    feat = b"".join(gzip.open(os.path.join(d, "features.tsv.gz"), "rb").readlines()[:n_genes])
    labels = open(os.path.join(data, "pbmc3k", "labels.tsv"), "rb").readlines()[: n_cells + 1]
    put("mtx", "pbmc3k_8cells_80genes_labels",
        data=b"\x1f" + mtx + b"\x00" + bc + b"\x00" + feat + b"\x00" + b"".join(labels))


def tool_seeds(bindir, data, w):
    """Shards, manifests, vocabularies and checkpoints written by perfcell."""
    a = pbmc_subset(data, 240, 48)
    src = os.path.join(w, "pbmc240.h5ad")
    a.write_h5ad(src)
    vocab = os.path.join(w, "vocab.tsv")
    shards = os.path.join(w, "shards")
    shard_bin = os.path.join(bindir, "perfcell-shard")
    run([shard_bin, "vocab", src, "--out", vocab, "--quiet"])
    run([shard_bin, "build", src, "--vocab", vocab, "--out", shards, "--shard-cells", "60",
         "--label-key", "celltype", "--quiet"])
    put("shard", "pbmc3k_60cells_48genes_labels.h5ad", os.path.join(shards, "shard-00000.h5ad"))
    put("manifest", "pbmc3k_4shards_labels.tsv", os.path.join(shards, "manifest.tsv"))
    put("vocab", "pbmc3k_48genes.tsv", vocab)
    # No labels, genes with Ensembl ids (10x v2 chr21, one shard of 5 cells).
    tenx = os.path.join(data, "10x_formats", "1.2.0", "filtered_gene_bc_matrices_h5.h5")
    vocab2 = os.path.join(w, "vocab2.tsv")
    shards2 = os.path.join(w, "shards2")
    run([shard_bin, "vocab", tenx, "--out", vocab2, "--quiet"])
    with open(vocab2) as f:
        lines = f.readlines()
    put("vocab", "hg19_chr21_ids_first40.tsv", data="".join(lines[:40]).encode())
    run([shard_bin, "build", tenx, "--vocab", vocab2, "--out", shards2, "--shard-cells", "5", "--quiet"])
    put("shard", "hg19_chr21_5cells.h5ad", os.path.join(shards2, "shard-00001.h5ad"))
    put("manifest", "hg19_chr21_3shards.tsv", os.path.join(shards2, "manifest.tsv"))

    # A 2-step pretraining and a 1-epoch fine-tuning with the tiny model.
    perfcell = os.path.join(bindir, "perfcell")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OPENBLAS_NUM_THREADS="1")
    tiny = os.path.join(ROOT, "configs", "tiny.ini")
    pre = os.path.join(w, "pre")
    run(["mpirun", "-np", "1", perfcell, "pretrain", "--config", tiny, "data.shards=" + shards,
         "run.dir=" + pre, "run.max_steps=2", "run.val_every=0", "model.dim=8", "model.depth=1",
         "model.ff_dim=16", "model.nb_features=8"], env=env, stdout=subprocess.DEVNULL)
    ck = os.path.join(pre, "checkpoints", "ckpt-00000002.h5")
    put("checkpoint", "pretrain_step2.h5", ck)
    ft = os.path.join(w, "ft")
    run(["mpirun", "-np", "1", perfcell, "finetune", "--config", tiny, "--init", ck, "data.shards=" + shards,
         "run.dir=" + ft, "finetune.epochs=1", "batch.global_batch=12", "model.dim=8", "model.depth=1",
         "model.ff_dim=16", "model.nb_features=8", "finetune.hidden=8"], env=env, stdout=subprocess.DEVNULL)
    best = sorted(glob.glob(os.path.join(ft, "best", "*.h5")))
    put("checkpoint", "finetune_best.h5", best[0])
    # A checkpoint of the format before the root checksum, as perfcell wrote it
    # (tests/data/README.md): the reader still takes these.
    put("checkpoint", "pretrain_step2_before_root_crc.h5",
        os.path.join(ROOT, "tests", "data", "ckpt_before_root_crc.h5"))


def config_seeds():
    for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.ini"))):
        put("config", os.path.basename(p), p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "bin"))
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    args = ap.parse_args()
    shutil.rmtree(CORPUS, ignore_errors=True)
    with tempfile.TemporaryDirectory() as w:
        h5ad_seeds(args.data, w)
        tenx_h5_seeds(args.data, w)
        mtx_seeds(args.data)
        tool_seeds(os.path.abspath(args.bin), args.data, w)
        config_seeds()
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(CORPUS, "*", "*")))
    print("corpus: %d bytes" % total)
    if total > 2 << 20:
        sys.exit("corpus larger than 2 MiB")


if __name__ == "__main__":
    main()
