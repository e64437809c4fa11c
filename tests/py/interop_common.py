"""Fixtures shared by the scBERT interoperability tests (tests/suite_interop.sh).

Models are tools/perfcell_torch.py's PerformerModel at a tiny size, with
scBERT's state_dict names; the fine-tuning variant swaps the MLM head for
scBERT's classification head (ScbertHead below: conv over each position,
ReLU, fc1, ReLU, fc2, ReLU, fc3), as scBERT's finetune.py does. The
vocabulary is the first 200 genes of ../shared/data/pbmc3k/pbmc3k_counts.h5ad
and the cells are 19 real cells of it plus one with no counts in those genes,
raw counts restricted to the vocabulary.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)
import perfcell_torch as pt  # noqa: E402
import scbert_interop  # noqa: E402

BIN = os.path.join(ROOT, os.environ.get("BIN", "bin"))
PYTHON = os.environ.get("PYTHON", "/usr/bin/python3")
DATA = os.environ.get("DATA", os.path.join(ROOT, "..", "shared", "data"))
PBMC = os.path.join(DATA, "pbmc3k", "pbmc3k_counts.h5ad")
N_GENES = 200
CONFIG = pt.PerformerConfig(n_genes=N_GENES, dim=32, depth=2, heads=4, dim_head=8, nb_features=24,
                            ff_dim=64, bins=5)
HEAD_HIDDEN = 16
CLASSES = ["T cell", "B cell", "Monocyte", "NK/other"]

failures: List[str] = []


def check(cond: bool, msg: str) -> None:
    if not cond:
        failures.append(msg)
        print("FAIL:", msg, file=sys.stderr)


def finish(what: str) -> None:
    """Exit 1 if any check failed, else print a summary line."""
    if failures:
        print(f"{len(failures)} checks failed", file=sys.stderr)
        sys.exit(1)
    print(f"OK: {what}")


# ---------------------------------------------------------------------------
# Models

class ScbertHead(nn.Module):
    """scBERT's classification head (finetune.py's `Identity`), same tensor names."""

    def __init__(self, dim: int, seq_len: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.fc1 = nn.Linear(seq_len, scbert_interop.CLS_SCBERT_FC1)
        self.fc2 = nn.Linear(scbert_interop.CLS_SCBERT_FC1, hidden)
        self.fc3 = nn.Linear(hidden, n_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, G+1, d) final hidden states -> logits (B, classes)."""
        x = F.relu(self.conv1(hidden[:, None, :, :])).flatten(1)    # (B, G+1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def pretrain_model(seed: int = 1) -> pt.PerformerModel:
    torch.manual_seed(seed)
    m = pt.PerformerModel(CONFIG)
    pt.init_reference_parameters(m, torch.Generator().manual_seed(seed))
    return m.eval()


def finetune_model(seed: int = 2) -> pt.PerformerModel:
    """The encoder with to_out replaced by scBERT's head (weights spread so that
    the class probabilities of the test cells range widely)."""
    m = pretrain_model(seed)
    g = torch.Generator().manual_seed(seed + 100)
    head = ScbertHead(CONFIG.dim, N_GENES + 1, HEAD_HIDDEN, len(CLASSES))
    with torch.no_grad():
        for name, p in head.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            std = 3.0 * fan_in ** -0.5 if p.dim() > 1 else 0.3
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64))
    m.to_out = head
    return m.eval()


def scbert_counter_model(m: pt.PerformerModel) -> pt.PerformerModel:
    """Add performer-pytorch's redraw counter buffer, as scBERT's PerformerLM has."""
    m.performer.register_buffer("calls_since_last_redraw", torch.tensor(0))
    return m


def state_dict(m: nn.Module) -> "Dict[str, torch.Tensor]":
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def hidden_states(m: pt.PerformerModel, counts, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (T, d) of the packed cells and their offsets."""
    tokens, genes, offsets = pt.pack_cells(counts, mode, CONFIG.bins)
    with torch.no_grad():
        h = m.norm(m.performer(m.token_emb(tokens) + m.pos_emb(genes),
                               pt.offsets_to_bounds(offsets, tokens.shape[0])))
    return h, offsets


# ---------------------------------------------------------------------------
# Files

def write_vocab(path: str) -> List[str]:
    import anndata as ad

    a = ad.read_h5ad(PBMC, backed="r")
    genes = [str(g) for g in a.var_names[:N_GENES]]
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{g}\n" for g in genes))
    return genes


def write_cells(path: str):
    """20 cells x 200 genes as an .h5ad (raw counts, CSR); returns the AnnData."""
    import anndata as ad
    import scipy.sparse as sp

    a = ad.read_h5ad(PBMC)
    x = a.X[:, :N_GENES].tocsr()
    nnz = np.diff(x.indptr)
    cells = np.concatenate([np.arange(19), np.flatnonzero(nnz == 0)[:1]])
    b = ad.AnnData(X=sp.csr_matrix(x[cells], dtype=np.float32), obs=a.obs.iloc[cells][["celltype"]].copy(),
                   var=a.var.iloc[:N_GENES].copy())
    b.write_h5ad(path)
    return b


def write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{s}\n" for s in lines))


# ---------------------------------------------------------------------------
# Running the tools and perfcell

def tool(args: Sequence[str]) -> Tuple[int, str, str]:
    """tools/scbert_interop.py in this process (torch loads once): (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = scbert_interop.run(list(args))
        except SystemExit as e:   # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def tool_ok(args: Sequence[str]) -> str:
    rc, out, err = tool(args)
    if rc != 0:
        raise SystemExit(f"scbert_interop.py {' '.join(args)} failed ({rc}):\n{err}")
    return out + err


def script(name: str, args: Sequence[str]) -> subprocess.CompletedProcess:
    """tools/NAME as its own process, as a user runs it."""
    return subprocess.run([PYTHON, os.path.join(TOOLS, name), *args], capture_output=True, text=True)


def perfcell(args: Sequence[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([os.path.join(BIN, "perfcell"), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"perfcell {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def inspect_verify(path: str) -> Tuple[int, str]:
    """`perfcell-inspect PATH --verify`, perfcell's full checkpoint read: (status, output)."""
    r = subprocess.run([os.path.join(BIN, "perfcell-inspect"), path, "--verify"], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row ||a - b|| / ||b||."""
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def leftovers(folder: str) -> List[str]:
    """Temporary files a writer left behind."""
    return sorted(n for n in os.listdir(folder) if ".tmp" in n)
