#!/usr/bin/env python3
"""Cell-type annotation evaluation: the logistic-regression baseline and the
split that perfcell fine-tunes on, so that both are scored on the same cells.

    annotation_eval.py split INPUT.h5ad --label-key celltype --out DIR
        Stratified 80/20 train/test split (scikit-learn train_test_split,
        random_state 2021); the training part is split again into train and
        validation (--val-fraction, stratified, same seed) for early stopping.
        Writes DIR/split.tsv (cell, train|val|test) for finetune.split_file, and
        DIR/baseline.json with the logistic regression's test accuracy and
        macro-F1 (log2(1 + CP10k) features, trained on train+val).

    annotation_eval.py compare DIR/baseline.json RUN_DIR/report_test.tsv
        Prints perfcell's test accuracy and macro-F1 beside the baseline's.
"""
import argparse
import json
import os
import sys

import numpy as np


def load_counts(path, label_key):
    import anndata
    import scipy.sparse as sp
    a = anndata.read_h5ad(path)
    if label_key not in a.obs.columns:
        sys.exit(f"{path}: no obs column '{label_key}' (columns: {', '.join(a.obs.columns)})")
    X = a.X if sp.issparse(a.X) else sp.csr_matrix(a.X)
    X = sp.csr_matrix(X, dtype=np.float64)
    y = a.obs[label_key].astype(str).to_numpy()
    return X, y, a.obs_names.to_numpy()


def cmd_split(a):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split
    X, y, cells = load_counts(a.input, a.label_key)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, stratify=y, random_state=a.seed)
    tr2, va = train_test_split(tr, test_size=a.val_fraction, stratify=y[tr], random_state=a.seed)
    os.makedirs(a.out, exist_ok=True)
    split = np.array(["train"] * len(y), dtype=object)
    split[va] = "val"
    split[te] = "test"
    with open(os.path.join(a.out, "split.tsv"), "w") as f:
        f.write("cell\tsplit\n")
        for c, s in zip(cells, split):
            f.write(f"{c}\t{s}\n")
    # log2(1 + CP10k), as in the data README.
    tot = np.asarray(X.sum(axis=1)).ravel()
    tot[tot == 0] = 1
    import scipy.sparse as sp
    Xn = sp.diags(1e4 / tot) @ X
    Xn.data = np.log2(1 + Xn.data)
    lr = LogisticRegression(max_iter=a.max_iter)
    lr.fit(Xn[tr], y[tr])
    pred = lr.predict(Xn[te])
    res = {
        "input": a.input, "label_key": a.label_key, "seed": a.seed, "cells": int(len(y)),
        "train": int(len(tr2)), "val": int(len(va)), "test": int(len(te)),
        "baseline": "LogisticRegression on log2(1+CP10k), trained on train+val",
        "test_accuracy": float(accuracy_score(y[te], pred)),
        "test_macro_f1": float(f1_score(y[te], pred, average="macro")),
    }
    with open(os.path.join(a.out, "baseline.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"split: {len(tr2)} train, {len(va)} validation, {len(te)} test cells -> {a.out}/split.tsv")
    print(f"logistic regression: test accuracy {res['test_accuracy']:.4f}, macro-F1 {res['test_macro_f1']:.4f}")


def read_report(path):
    vals = {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 2 and parts[0] in ("cells", "accuracy", "macro_f1"):
                vals[parts[0]] = float(parts[1])
    if "macro_f1" not in vals:
        sys.exit(f"{path}: not a perfcell report (no macro_f1 line)")
    return vals


def cmd_compare(a):
    base = json.load(open(a.baseline))
    rep = read_report(a.report)
    print(f"{'test cells':<22}{int(rep.get('cells', 0)):>10}")
    print(f"{'':<22}{'accuracy':>10}{'macro-F1':>10}")
    print(f"{'logistic regression':<22}{base['test_accuracy']:>10.4f}{base['test_macro_f1']:>10.4f}")
    print(f"{'perfcell':<22}{rep['accuracy']:>10.4f}{rep['macro_f1']:>10.4f}")
    diff = rep["macro_f1"] - base["test_macro_f1"]
    print(f"perfcell macro-F1 is {abs(diff):.4f} {'above' if diff >= 0 else 'below'} the baseline")
    if a.require_parity and diff < 0:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("input")
    s.add_argument("--label-key", default="celltype")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=2021)
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--max-iter", type=int, default=1000)
    c = sub.add_parser("compare")
    c.add_argument("baseline")
    c.add_argument("report")
    c.add_argument("--require-parity", action="store_true", help="exit 1 when perfcell is below the baseline")
    a = ap.parse_args()
    {"split": cmd_split, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
