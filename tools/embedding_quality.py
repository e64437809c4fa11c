#!/usr/bin/env python3
"""How well cell embeddings separate labelled cell types.

    embedding_quality.py NAME=cells.h5ad [NAME=cells.h5ad ...] [--split validation]

For each `perfcell embed` output: k-nearest-neighbour accuracy (k = 15,
cosine distance, 5-fold stratified cross-validation) and the silhouette score
(cosine) of obsm['X_perfcell'] against obs['label'], on the cells of the given
split (obs['split'], written for shard inputs; default: the cells pretraining
held out) or on all cells (--split all). Prints one line per embedding.
"""
import argparse
import sys

import numpy as np


def score(path, split):
    import anndata
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    a = anndata.read_h5ad(path)
    if "X_perfcell" not in a.obsm or "label" not in a.obs:
        sys.exit(f"{path}: needs obsm['X_perfcell'] and obs['label'] (embed a labelled input)")
    keep = np.ones(a.n_obs, dtype=bool)
    if split != "all":
        if "split" not in a.obs:
            sys.exit(f"{path}: no obs['split'] (embed a shard folder, or pass --split all)")
        keep = (a.obs["split"] == split).to_numpy()
    X = np.asarray(a.obsm["X_perfcell"])[keep]
    y = a.obs["label"].astype(str).to_numpy()[keep]
    ok = y != "nan"
    X, y = X[ok], y[ok]
    classes, counts = np.unique(y, return_counts=True)
    folds = int(min(5, counts.min())) if counts.min() >= 2 else 2
    y_fit = y
    if counts.min() < folds:  # classes too rare to stratify are left out of the CV
        rare = set(classes[counts < folds])
        m = np.array([c not in rare for c in y])
        X, y_fit = X[m], y[m]
    knn = KNeighborsClassifier(n_neighbors=min(15, len(y_fit) // 2), metric="cosine")
    acc = cross_val_score(knn, X, y_fit, cv=StratifiedKFold(folds, shuffle=True, random_state=0)).mean()
    sil = silhouette_score(X, y_fit, metric="cosine")
    return len(y_fit), acc, sil


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("embeddings", nargs="+", help="NAME=path.h5ad")
    ap.add_argument("--split", default="validation", help="validation, train or all")
    a = ap.parse_args()
    print(f"{'embedding':<28}{'cells':>7}{'kNN acc':>10}{'silhouette':>12}")
    for item in a.embeddings:
        name, _, path = item.partition("=")
        if not path:
            name, path = path or item, item
        n, acc, sil = score(path, a.split)
        print(f"{name:<28}{n:>7}{acc:>10.4f}{sil:>12.4f}")


if __name__ == "__main__":
    main()
