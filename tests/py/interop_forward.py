#!/usr/bin/python3
"""Imported scBERT weights give perfcell the same forward pass as PyTorch.

    interop_forward.py SCRATCH_DIR

A tiny PerformerModel (tools/perfcell_torch.py) is saved as a .pth, imported
with tools/scbert_import.py, and `perfcell embed` runs on 20 real pbmc3k
cells (19 cells plus one without counts in the 200-gene vocabulary, raw
counts, .h5ad): its last-position embeddings must equal the reference's
final hidden state at each cell's last position, tokenised by the reference's
own pack_cells / tokenize_counts, in full and in nonzero mode. The output
opens with anndata with the input's cells.

A fine-tuning model with a random scBERT head and class names goes through
`perfcell predict --probabilities`: the probabilities equal the reference's
softmax of the head (conv over positions, ReLU, fc1, ReLU, fc2, ReLU, fc3),
and --threshold marks exactly the cells whose top probability is below it
"Unassigned" (none at 0), the others with the arg-max class. The same for
perfcell's pooled head (cls.*: mean over the cell's positions, fc1, ReLU,
fc2) imported in nonzero mode.

Tolerances. Both sides compute in float32 from the same float32 weights
(perfcell's model is float32 throughout; the reference runs in float32 so
that it sees the same rounded weights and inputs). They differ only by
summation order and the exp / erf implementations, about 1e-7 relative per
operation; through two blocks the embeddings agree to ~4e-7 relative L2.
1e-5 leaves room for other BLAS builds, while a wrongly mapped tensor is far
outside it (q and k swapped in the last block alone: 5-8 % relative).
Probabilities are compared to 1e-5 absolute: predict prints them with 6
decimals (rounding 5e-7), and the head adds float32 sums over 201 positions
(about 2e-6 seen).
"""
import csv
import os
import sys

import numpy as np
import torch

from interop_common import (CLASSES, CONFIG, check, finetune_model, finish, hidden_states, perfcell, pt,
                            pretrain_model, rel_l2, scbert_counter_model, state_dict, tool_ok, write_cells,
                            write_lines, write_vocab)

REL_L2_TOL = 1e-5
PROB_TOL = 1e-5


def read_tsv(path: str):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def main() -> None:
    import anndata as ad

    tmp = sys.argv[1]
    vocab = os.path.join(tmp, "vocab.tsv")
    genes = write_vocab(vocab)
    cells = os.path.join(tmp, "cells.h5ad")
    adata = write_cells(cells)
    check(list(adata.var_names) == genes, "fixture genes")

    # Embeddings, full and nonzero mode
    model = pretrain_model(seed=5)
    pth = os.path.join(tmp, "model.pth")
    torch.save(state_dict(model), pth)
    for mode in ("full", "nonzero"):
        ck = os.path.join(tmp, f"{mode}.h5")
        tool_ok(["import", pth, "--vocab", vocab, "--out", ck, "--mode", mode])
        emb = os.path.join(tmp, f"emb_{mode}.h5ad")
        perfcell(["embed", "--checkpoint", ck, "--input", cells, "--out", emb])
        h, offsets = hidden_states(model, adata.X, mode)
        want = h[offsets[1:] - 1].numpy()
        e = ad.read_h5ad(emb)
        check(e.n_obs == adata.n_obs and list(e.obs_names) == list(adata.obs_names),
              f"{mode}: embed's cells are not the input's")
        x = e.obsm["X_perfcell"]
        check(x.shape == (adata.n_obs, CONFIG.dim) and x.dtype == np.float32,
              f"{mode}: obsm['X_perfcell'] is {x.dtype} {x.shape}")
        if x.shape == want.shape:
            rel = rel_l2(x.astype(np.float64), want.astype(np.float64))
            print(f"{mode} mode: embed vs reference, max relative L2 {rel.max():.3g} over {len(rel)} cells")
            check(bool(rel.max() < REL_L2_TOL), f"{mode}: relative L2 {rel.max():.3g} >= {REL_L2_TOL}")

    # Prediction with scBERT's head
    fm = scbert_counter_model(finetune_model(seed=6))
    fpth = os.path.join(tmp, "finetune.pth")
    torch.save({"epoch": 1, "model_state_dict": state_dict(fm)}, fpth)
    labels = os.path.join(tmp, "labels.txt")
    write_lines(labels, CLASSES)
    fck = os.path.join(tmp, "finetune.h5")
    tool_ok(["import", fpth, "--vocab", vocab, "--labels", labels, "--out", fck])
    h, offsets = hidden_states(fm, adata.X, "full")
    with torch.no_grad():
        p_ref = torch.softmax(fm.to_out(h.view(adata.n_obs, -1, CONFIG.dim)), dim=-1).numpy()
    top = p_ref.max(axis=1)
    arg = p_ref.argmax(axis=1)
    srt = np.sort(p_ref, axis=1)
    check(bool((srt[:, -1] - srt[:, -2]).min() > 1e-3), "fixture: a cell's two top classes are nearly tied")
    print(f"reference top probabilities {[round(float(v), 3) for v in np.sort(top)]}")

    def predict(threshold: str):
        out = os.path.join(tmp, f"pred_{threshold}.tsv")
        perfcell(["predict", "--checkpoint", fck, "--input", cells, "--out", out, "--probabilities",
                  "--threshold", threshold])
        rows = read_tsv(out)
        check([r["cell"] for r in rows] == list(adata.obs_names), f"predict {threshold}: cells")
        return rows

    rows = predict("0")
    p = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    diff = np.abs(p - p_ref).max()
    print(f"predict vs reference softmax: max |difference| {diff:.3g}")
    check(bool(diff < PROB_TOL), f"probabilities differ by {diff:.3g} >= {PROB_TOL}")
    check(all(r["prediction"] != "Unassigned" for r in rows), "threshold 0 left cells Unassigned")
    check([r["prediction"] for r in rows] == [CLASSES[k] for k in arg], "arg-max classes differ")
    check(bool(np.abs(np.array([float(r["probability"]) for r in rows]) - top).max() < PROB_TOL),
          "probability column is not the top probability")

    # A threshold between two cells' top probabilities, far from both
    s = np.sort(top)
    gaps = [(s[i + 1] - s[i], i) for i in range(len(s) // 4, 3 * len(s) // 4)]
    gap, i = max(gaps)
    check(bool(gap > 1e-3), f"fixture: no clear gap between top probabilities ({gap:.3g})")
    t = (s[i] + s[i + 1]) / 2
    rows = predict(f"{t:.6f}")
    low = top < t
    check(0 < low.sum() < len(low), "fixture: threshold splits nothing")
    for c, r in enumerate(rows):
        want = "Unassigned" if low[c] else CLASSES[arg[c]]
        check(r["prediction"] == want, f"threshold {t:.6f}: cell {r['cell']} top {top[c]:.6f} is "
                                       f"'{r['prediction']}', expected '{want}'")
    print(f"threshold {t:.6f}: {int(low.sum())} of {len(low)} cells Unassigned, as the reference says")

    # perfcell's pooled head (cls.*) in nonzero mode: mean over each cell's positions -> fc1 -> ReLU -> fc2
    g = torch.Generator().manual_seed(21)
    psd = {k: v for k, v in state_dict(pretrain_model(seed=7)).items() if not k.startswith("to_out.")}
    hid, k = 24, len(CLASSES)
    for name, shape, std in (("cls.fc1.weight", (hid, CONFIG.dim), 3.0 * CONFIG.dim ** -0.5),
                             ("cls.fc1.bias", (hid,), 0.3), ("cls.fc2.weight", (k, hid), 3.0 * hid ** -0.5),
                             ("cls.fc2.bias", (k,), 0.3)):
        psd[name] = (std * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    ppth = os.path.join(tmp, "pooled.pth")
    torch.save(psd, ppth)
    pck = os.path.join(tmp, "pooled.h5")
    tool_ok(["import", ppth, "--vocab", vocab, "--labels", labels, "--out", pck, "--mode", "nonzero",
             "--pooling", "mean"])
    pm = pt.PerformerModel(CONFIG)
    res = pm.load_state_dict({k: v for k, v in psd.items() if not k.startswith("cls.")}, strict=False)
    check(sorted(res.missing_keys) == ["to_out.bias", "to_out.weight"] and not res.unexpected_keys,
          f"pooled fixture: {res}")
    h, offsets = hidden_states(pm.eval(), adata.X, "nonzero")
    pooled = torch.stack([h[s:e].mean(dim=0) for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    z = torch.relu(pooled @ psd["cls.fc1.weight"].t() + psd["cls.fc1.bias"])
    p_ref = torch.softmax(z @ psd["cls.fc2.weight"].t() + psd["cls.fc2.bias"], dim=-1).numpy()
    out = os.path.join(tmp, "pred_pooled.tsv")
    perfcell(["predict", "--checkpoint", pck, "--input", cells, "--out", out, "--probabilities", "--threshold", "0"])
    p = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in read_tsv(out)])
    diff = np.abs(p - p_ref).max()
    print(f"pooled head, nonzero mode: predict vs reference softmax, max |difference| {diff:.3g}")
    check(bool(diff < PROB_TOL), f"pooled head: probabilities differ by {diff:.3g} >= {PROB_TOL}")
    finish("perfcell embed and predict on imported weights equal the PyTorch reference")


if __name__ == "__main__":
    main()
