#!/usr/bin/python3
"""Write a reference dump of perfcell's model for the C tests.

    /usr/bin/python3 tools/make_reference.py --out ref.h5 --mode full \\
        --genes 24 --dim 16 --depth 2 --heads 2 --dim-head 8 --features 12 \\
        --ff 32 --bins 5 --cells 3 --seed 1

The model is tools/perfcell_torch.py (DESIGN.md §3), computed in float64 by
default. Synthetic cells are tokenised and packed (DESIGN §3), masked with
scBERT's rule (DESIGN §4), run forward, and the MLM loss is differentiated.
The HDF5 file holds (all floating arrays stored as float64):

    /                  attrs: every config value, seed, dtype, the command line
    params/<name>      every parameter and buffer under its scBERT state_dict
                       name, PyTorch shape (Linear weight is (out, in))
    input/counts       (n_cells, G) int32  raw synthetic counts
    input/tokens_unmasked (T,) int32      tokens before masking
    input/tokens       (T,) int32          masked tokens fed to the model
    input/genes        (T,) int32          gene-embedding row; G at each cell's last position
    input/offsets      (n_cells+1,) int64  cell c owns positions offsets[c]:offsets[c+1]
    input/target       (T,) int32          original token at chosen positions, -1 elsewhere
    input/n_norm       ()  int64           number of chosen positions (loss divisor)
    output/logits      (T, B+2)
    output/hidden      (T, d)              after the final LayerNorm
    output/loss        ()
    grad/<name>        d loss / d parameter, every trainable parameter
    debug/h0           (n0, d)             embedding sum, first cell only
    debug/layer{i}/... first cell only (n0 positions):
        attn_in (n0, d) LN1 output;  q, k, v (n0, H·E);  phi_q, phi_k (H, n0, M);
        attn_out (n0, H·E) before to_out;  h_after_attn (n0, d);
        ff_in (n0, d) LN2 output;  ff_hidden (n0, F) after GELU;  h_out (n0, d)

In q, k, v and attn_out head h owns columns h·E:(h+1)·E.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional, Sequence

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perfcell_torch as pt  # noqa: E402

MAX_SMALL_COUNT = 50


# ---------------------------------------------------------------------------
# Synthetic cells
# ---------------------------------------------------------------------------

def synthetic_counts(n_genes: int, nonzero_per_cell: Sequence[int],
                     rng: np.random.Generator) -> np.ndarray:
    """Sparse count matrix (n_cells, n_genes) with a realistic token spread.

    Cell c has exactly nonzero_per_cell[c] nonzero genes at random places.
    Their counts are log-uniform in 1..50, except that one gene of every
    cell with two or more nonzero genes is highly expressed so that the
    cell's total lies near 6,000–14,000. A tiny vocabulary is a window on a
    real cell, whose library size comes mostly from genes outside it; the
    large gene plays that part, so that small counts fall in the low bins
    (count 1 gives token 0 or 1, count 50 gives token 5) instead of all
    saturating at B.
    """
    counts = np.zeros((len(nonzero_per_cell), n_genes), dtype=np.int64)
    for c, k in enumerate(nonzero_per_cell):
        if not 1 <= k <= n_genes:
            raise ValueError(f"cell {c}: {k} nonzero genes, need 1..{n_genes}")
        where = rng.choice(n_genes, size=k, replace=False)
        small = np.floor(np.exp(rng.uniform(0.0, np.log(MAX_SMALL_COUNT + 1), size=k)))
        small = np.clip(small, 1, MAX_SMALL_COUNT).astype(np.int64)
        if k >= 2:
            target_total = rng.uniform(6000.0, 14000.0)
            small[0] = max(int(round(target_total - small[1:].sum())), MAX_SMALL_COUNT + 1)
        counts[c, where] = small
    return counts


def default_nonzero_lengths(n_cells: int, n_genes: int, mode: str,
                            rng: np.random.Generator) -> List[int]:
    """Number of nonzero genes per cell when the command line gives none.

    nonzero mode: the first cell (the one traced in debug/) of moderate
    length, a cell with a single nonzero gene, one with most genes nonzero,
    the rest random; full mode: 10–50 % of genes nonzero.
    """
    if mode == "full":
        lo, hi = max(1, n_genes // 10), max(1, n_genes // 2)
        return [int(rng.integers(lo, hi + 1)) for _ in range(n_cells)]
    pattern = [max(1, min(n_genes, n_genes // 3)), 1, max(1, (9 * n_genes) // 10)]
    rest = [int(rng.integers(1, max(1, n_genes // 2) + 1)) for _ in range(n_cells)]
    return (pattern + rest)[:n_cells]


# ---------------------------------------------------------------------------
# Dump
# ---------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--mode", choices=("full", "nonzero"), required=True)
    p.add_argument("--genes", type=int, required=True, help="vocabulary size G")
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--dim-head", type=int, required=True)
    p.add_argument("--features", type=int, required=True, help="random features M")
    p.add_argument("--ff", type=int, required=True, help="feed-forward width")
    p.add_argument("--bins", type=int, default=5)
    p.add_argument("--cells", type=int, required=True)
    p.add_argument("--nonzero-lengths", default=None,
                   help="comma-separated number of nonzero genes per cell "
                        "(a nonzero-mode cell has that many positions plus the last one)")
    p.add_argument("--seed", type=int, default=1)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--learned-gene-emb", dest="gene_emb", action="store_const",
                   const="learned", help="gene embedding is trained (default)")
    g.add_argument("--frozen-gene-emb", dest="gene_emb", action="store_const",
                   const="frozen", help="gene embedding is frozen (scBERT): no grad/ entry")
    p.set_defaults(gene_emb="learned")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of the computation (stored arrays are float64)")
    args = p.parse_args(argv)
    if args.cells < 1:
        p.error("--cells must be at least 1")
    if args.nonzero_lengths is not None:
        args.nonzero_lengths = [int(x) for x in args.nonzero_lengths.split(",") if x]
        if len(args.nonzero_lengths) != args.cells:
            p.error(f"--nonzero-lengths gives {len(args.nonzero_lengths)} cells, "
                    f"--cells says {args.cells}")
    return args


def make_reference(args: argparse.Namespace, command: str) -> dict:
    """Build the model and data from ``args``, run them, write ``args.out``.

    Returns a small summary (token count, loss) for the caller to print.
    """
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    cfg = pt.PerformerConfig(n_genes=args.genes, dim=args.dim, depth=args.depth,
                             heads=args.heads, dim_head=args.dim_head,
                             nb_features=args.features, ff_dim=args.ff, bins=args.bins,
                             gene_emb=args.gene_emb)
    # Three independent streams: data, parameters, masking.
    data_rng = np.random.default_rng(args.seed)
    param_gen = torch.Generator().manual_seed(args.seed)
    mask_gen = torch.Generator().manual_seed(args.seed + 1)

    lengths = args.nonzero_lengths or default_nonzero_lengths(args.cells, args.genes,
                                                              args.mode, data_rng)
    counts = synthetic_counts(args.genes, lengths, data_rng)
    tokens_raw, genes, offsets = pt.pack_cells(counts, args.mode, args.bins)
    tokens, target = pt.apply_mlm_masking(tokens_raw, offsets, args.bins, mask_gen)
    n_norm = int((target >= 0).sum())
    if n_norm == 0:
        raise SystemExit("no maskable position in these cells; use other lengths or seed")

    model = pt.PerformerModel(cfg).to(torch.float64)
    pt.init_reference_parameters(model, param_gen)
    model = model.to(dtype)
    model.train()  # dropout rates are 0: train and eval modes agree

    trace: dict = {}
    logits, hidden = model(tokens, genes, offsets, return_hidden=True, trace=trace)
    loss = pt.mlm_loss(logits, target, n_norm)
    loss.backward()

    def f64(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float64).cpu().numpy()

    with h5py.File(args.out, "w") as f:
        attrs = {
            "mode": args.mode, "n_genes": cfg.n_genes, "dim": cfg.dim, "depth": cfg.depth,
            "heads": cfg.heads, "dim_head": cfg.dim_head, "nb_features": cfg.nb_features,
            "ff_dim": cfg.ff_dim, "bins": cfg.bins, "n_tokens": cfg.n_tokens,
            "mask_token": cfg.mask_token, "n_cells": args.cells, "seed": args.seed,
            "gene_emb": cfg.gene_emb, "dtype": args.dtype,
            "favor_eps": pt.FAVOR_EPS, "layernorm_eps": pt.LAYERNORM_EPS,
            "emb_dropout": cfg.emb_dropout, "attn_dropout": cfg.attn_dropout,
            "ff_dropout": cfg.ff_dropout, "command": command,
            "script": "tools/make_reference.py (model: tools/perfcell_torch.py)",
            "torch_version": str(torch.__version__),
        }
        for key, value in attrs.items():
            f.attrs[key] = value

        for name, tensor in model.state_dict().items():
            f.create_dataset(f"params/{name}", data=f64(tensor))

        inp = f.create_group("input")
        inp.create_dataset("counts", data=counts.astype(np.int32))
        inp.create_dataset("tokens_unmasked", data=tokens_raw.numpy().astype(np.int32))
        inp.create_dataset("tokens", data=tokens.numpy().astype(np.int32))
        inp.create_dataset("genes", data=genes.numpy().astype(np.int32))
        inp.create_dataset("offsets", data=offsets.numpy().astype(np.int64))
        inp.create_dataset("target", data=target.numpy().astype(np.int32))
        inp.create_dataset("n_norm", data=np.int64(n_norm))

        out = f.create_group("output")
        out.create_dataset("logits", data=f64(logits))
        out.create_dataset("hidden", data=f64(hidden))
        out.create_dataset("loss", data=np.float64(loss.item()))

        for name, p in model.named_parameters():
            if p.requires_grad:
                f.create_dataset(f"grad/{name}", data=f64(p.grad))

        for key, value in trace.items():
            f.create_dataset(f"debug/{key}", data=f64(value))

    return {"tokens": int(tokens.shape[0]), "cells": args.cells, "n_norm": n_norm,
            "loss": loss.item(), "lengths": [int(b - a) for a, b in
                                             zip(offsets[:-1].tolist(), offsets[1:].tolist())]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    shown = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join([sys.executable, "tools/make_reference.py"] + shown)
    summary = make_reference(args, command)
    print(f"wrote {args.out}: {summary['cells']} cells, {summary['tokens']} positions "
          f"(per cell {summary['lengths']}), {summary['n_norm']} chosen, "
          f"loss {summary['loss']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
