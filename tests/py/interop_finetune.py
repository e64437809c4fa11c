#!/usr/bin/python3
"""From scBERT weights to a perfcell fine-tuned model, and back to PyTorch.

    interop_finetune.py SCRATCH_DIR

The user's path: a pretrained model (.pth) is imported with
tools/scbert_import.py, shards are built from real pbmc3k cells with the same
vocabulary (so the vocabulary hashes agree), and `perfcell finetune --init`
trains scBERT's head on them for one epoch. The fine-tuned checkpoint that
perfcell wrote (with optimizer state, scalars and a data cursor) is exported
with tools/scbert_export.py and must

  - load with strict=True into the PyTorch model with scBERT's head, whose
    softmax on 20 cells equals `perfcell predict --probabilities` on the
    native checkpoint (1e-5 absolute: float32 on both sides, 6 printed
    decimals; see interop_forward.py);
  - import again into a checkpoint with bitwise the same tensors and
    projections, on which `perfcell predict` writes byte for byte the same
    predictions as on the native one.

Then the linear head with a learning rate of 0: its slot projection must be
the least-squares readout of each gene position's expression token from the
PyTorch reference's hidden states of the first 256 training cells.
"""
import os
import subprocess
import sys

import numpy as np
import torch

from interop_common import (BIN, CONFIG, N_GENES, PBMC, ScbertHead, check, finish, hidden_states, perfcell,
                            pretrain_model, pt, scbert_interop, state_dict, tool_ok, write_cells, write_vocab)

PROB_TOL = 1e-5
TRAIN_CELLS = 300


def finetune_config(path, shards, run_dir, finetune, extra="") -> str:
    """A fine-tuning config for the reference model's size in full mode."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"[data]\nshards = {shards}\nmode = full\n"
                f"[model]\ndim = {CONFIG.dim}\ndepth = {CONFIG.depth}\nheads = {CONFIG.heads}\n"
                f"dim_head = {CONFIG.dim_head}\nnb_features = {CONFIG.nb_features}\nff_dim = {CONFIG.ff_dim}\n"
                f"bins = {CONFIG.bins}\ngene_emb = frozen\n"
                f"[finetune]\n{finetune}{extra}[batch]\nmicro_batch = 8\n[run]\ndir = {run_dir}\n")
    return path


def main() -> None:
    import anndata as ad
    import scipy.sparse as sp

    tmp = sys.argv[1]
    vocab = os.path.join(tmp, "vocab.tsv")
    write_vocab(vocab)
    cells = os.path.join(tmp, "cells.h5ad")
    adata = write_cells(cells)
    a = ad.read_h5ad(PBMC)
    train = ad.AnnData(X=sp.csr_matrix(a.X[:TRAIN_CELLS, :N_GENES]), obs=a.obs.iloc[:TRAIN_CELLS][["celltype"]].copy(),
                       var=a.var.iloc[:N_GENES].copy())
    train_path = os.path.join(tmp, "train.h5ad")
    train.write_h5ad(train_path)
    shards = os.path.join(tmp, "shards")
    r = subprocess.run([os.path.join(BIN, "perfcell-shard"), "build", train_path, "--vocab", vocab, "--out", shards,
                        "--label-key", "celltype", "--quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"perfcell-shard build failed: {r.stderr}")

    pth = os.path.join(tmp, "pretrained.pth")
    torch.save({"model_state_dict": state_dict(pretrain_model(seed=11))}, pth)
    ck = os.path.join(tmp, "pretrained.h5")
    tool_ok(["import", pth, "--vocab", vocab, "--out", ck])
    run_dir = os.path.join(tmp, "ft")
    config = finetune_config(os.path.join(tmp, "finetune.ini"), shards, run_dir, "head = scbert\nepochs = 1\n")
    perfcell(["finetune", "--config", config, "--init", ck])
    best = os.path.join(run_dir, "best")
    native = scbert_interop.read_checkpoint(scbert_interop.resolve_checkpoint(best))
    check(native.kind == "finetune" and native.has_optim and native.step > 0,
          f"fine-tuned checkpoint: {native.kind}, step {native.step}, optimizer {native.has_optim}")

    out = os.path.join(tmp, "finetuned.pth")
    labels = os.path.join(tmp, "labels.txt")
    tool_ok(["export", best, "--out", out, "--labels-out", labels])
    sd = torch.load(out)
    classes = open(labels, encoding="utf-8").read().splitlines()
    check(classes == native.labels, f"exported labels {classes}")
    hidden = native.tensors["to_out.fc2.weight"].shape[0]
    model = pt.PerformerModel(CONFIG)
    model.to_out = ScbertHead(CONFIG.dim, N_GENES + 1, hidden, len(classes))
    model.load_state_dict(sd, strict=True)
    model.eval()
    h, _ = hidden_states(model, adata.X, "full")
    with torch.no_grad():
        p_ref = torch.softmax(model.to_out(h.view(adata.n_obs, -1, CONFIG.dim)), dim=-1).numpy()

    pred_native = os.path.join(tmp, "pred_native.tsv")
    perfcell(["predict", "--checkpoint", best, "--input", cells, "--out", pred_native, "--probabilities"])
    with open(pred_native, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    header, rows = rows[0], rows[1:]
    cols = [header.index(f"p_{c}") for c in classes]
    p = np.array([[float(r[i]) for i in cols] for r in rows])
    diff = np.abs(p - p_ref).max()
    print(f"perfcell predict (native fine-tuned checkpoint) vs exported weights in PyTorch: max |difference| "
          f"{diff:.3g}")
    check(bool(diff < PROB_TOL), f"probabilities differ by {diff:.3g} >= {PROB_TOL}")

    again = os.path.join(tmp, "reimported.h5")
    tool_ok(["import", out, "--vocab", vocab, "--labels", labels, "--out", again])
    back = scbert_interop.read_checkpoint(again)
    check(list(back.tensors) == list(native.tensors), "re-imported tensor names or order differ")
    for name, x in native.tensors.items():
        check(name in back.tensors and back.tensors[name].tobytes() == x.tobytes(), f"{name} differs")
    check(all(a.tobytes() == b.tobytes() for a, b in zip(native.projections, back.projections)),
          "projections differ")
    check(back.vocab_hash == native.vocab_hash, "vocabulary hash differs")
    pred_again = os.path.join(tmp, "pred_again.tsv")
    perfcell(["predict", "--checkpoint", again, "--input", cells, "--out", pred_again, "--probabilities"])
    check(open(pred_again, "rb").read() == open(pred_native, "rb").read(),
          "predict on the re-imported checkpoint differs from the native one")
    check_slot_init(tmp, shards, ck, train)
    finish("fine-tuning from imported weights; the fine-tuned model exports and re-imports exactly; "
           "the linear head starts as the expression readout")


def check_slot_init(tmp, shards, ck, train) -> None:
    split = os.path.join(tmp, "split.tsv")
    with open(split, "w", encoding="utf-8") as f:
        for i, name in enumerate(train.obs_names):
            f.write(f"{name}\t{'train' if i < 280 else 'val'}\n")
    run_dir = os.path.join(tmp, "ft_linear")
    config = finetune_config(os.path.join(tmp, "finetune_linear.ini"), shards, run_dir,
                             f"head = linear\nfreeze = all\nepochs = 1\nsplit_file = {split}\n", "[optim]\nlr = 0\n")
    r = perfcell(["finetune", "--config", config, "--init", ck])
    check("fitted on 51200 positions" in r.stdout, "the readout is fitted on the 256 x 200 gene positions")
    native = scbert_interop.read_checkpoint(scbert_interop.resolve_checkpoint(os.path.join(run_dir, "best")))
    w = native.tensors["cls.slot.weight"].astype(np.float64).ravel()
    b = float(native.tensors["cls.slot.bias"].ravel()[0])
    h, _ = hidden_states(pretrain_model(seed=11), train.X[:256], "full")
    tokens, genes, _ = pt.pack_cells(train.X[:256], "full", CONFIG.bins)
    keep = (genes < N_GENES).numpy()
    z = np.hstack([h.numpy().astype(np.float64)[keep], np.ones((int(keep.sum()), 1))])
    y = tokens.numpy()[keep].astype(np.float64)
    a = z.T @ z
    a += (1e-6 * np.trace(a) / a.shape[0] + 1e-12) * np.eye(a.shape[0])
    want = np.linalg.solve(a, z.T @ y)
    got = np.append(w, b)
    e = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"linear head's slot projection vs least squares on the reference's hidden states: relative L2 {e:.2e}")
    check(e < 1e-3, f"slot projection differs from the least-squares readout by {e:.2e} (relative L2)")


if __name__ == "__main__":
    main()
