"""PyTorch reference implementation of perfcell's model (DESIGN.md §3 and §4).

This module is the independent, readable statement of the model that the C
implementation is checked against (tools/make_reference.py writes dumps from
it) and the PyTorch side of the benchmarks (tests/bench/bench_torch.py).

The model is scBERT's Performer: token embedding plus gene embedding, `depth`
pre-norm blocks of FAVOR+ self-attention and a GELU feed-forward network, a
final LayerNorm and a linear masked-expression head. Parameter and buffer
names follow scBERT's PyTorch ``state_dict`` exactly, so that

    model.state_dict().keys() == [
        'token_emb.weight', 'pos_emb.emb.weight',
        'performer.net.layers.{i}.0.norm.weight', ... ,
        'norm.weight', 'norm.bias', 'to_out.weight', 'to_out.bias']

(see :func:`expected_state_dict_keys`).

Cells are packed without padding. A micro-batch is three integer arrays:

    tokens  (T,)          expression token of every position, 0..B+1
    genes   (T,)          row of the gene embedding (0..G-1; G for the last position)
    offsets (n_cells+1,)  cell c owns positions offsets[c]:offsets[c+1]

Linear layers, LayerNorms and embeddings act on the packed (T, d) matrix;
attention acts on each cell's segment separately, so the result for a cell
does not depend on which other cells share its micro-batch.

Dimension letters used in shape comments: T packed tokens, n tokens of one
cell, d model width, H heads, E head width (dim_head), M random features,
F feed-forward width, V = B+2 token classes, G genes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Added to every random feature (scBERT / performer-pytorch's kernel epsilon):
# keeps the normaliser φ(q)·Σφ(k) away from zero.
FAVOR_EPS = 1e-4
LAYERNORM_EPS = 1e-5
# Masked-expression pretraining (DESIGN §4).
MASK_PROB = 0.15
REPLACE_PROB = 0.9

GENE_EMB_MODES = ("learned", "frozen")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclass
class PerformerConfig:
    """Model hyper-parameters; the defaults are scBERT's published model."""

    n_genes: int = 16906      # G: gene vocabulary size (sequence length G+1 in full mode)
    dim: int = 200            # d
    depth: int = 6            # L
    heads: int = 10           # H
    dim_head: int = 64        # E
    nb_features: int = 266    # M random features per layer
    ff_dim: int = 800         # F (scBERT: 4·d)
    bins: int = 5             # B: tokens 0..B are expression bins, B+1 is MASK/PAD
    gene_emb: str = "learned"  # "learned" or "frozen" (scBERT loads gene2vec, frozen)
    emb_dropout: float = 0.0
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.gene_emb not in GENE_EMB_MODES:
            raise ValueError(f"gene_emb must be one of {GENE_EMB_MODES}, got {self.gene_emb!r}")
        for name in ("n_genes", "dim", "depth", "heads", "dim_head", "nb_features", "ff_dim",
                     "bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def n_tokens(self) -> int:
        """Number of token classes V = B+2 (bins 0..B and MASK)."""
        return self.bins + 2

    @property
    def mask_token(self) -> int:
        """The MASK (and PAD) token, B+1."""
        return self.bins + 1

    @property
    def inner_dim(self) -> int:
        """Width of q, k and v: H·E."""
        return self.heads * self.dim_head

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# FAVOR+ (softmax kernel)
# ---------------------------------------------------------------------------

def orthogonal_random_features(nb_features: int, dim_head: int,
                               generator: Optional[torch.Generator] = None,
                               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Draw a Performer projection matrix (nb_features, dim_head).

    Rows come in blocks of ``dim_head`` mutually orthogonal unit vectors: each
    block is Qᵀ from the QR decomposition (with diag(R) > 0, so that Q is
    uniformly distributed) of a dim_head × dim_head standard Gaussian matrix;
    blocks are stacked until there are ``nb_features`` rows (the last block
    truncated). Each row is then scaled by the norm of an
    independent Gaussian dim_head-vector, so that rows have the length
    distribution of Gaussian vectors (unbiased softmax-kernel estimate) while
    keeping the variance reduction of orthogonality.

    The QR runs in float64 whatever ``dtype`` is, then the result is cast.
    """
    n_full, rest = divmod(nb_features, dim_head)
    blocks = []
    for i in range(n_full + (1 if rest else 0)):
        gauss = torch.randn(dim_head, dim_head, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss, mode="reduced")
        # Householder QR (LAPACK) fixes the signs of R's diagonal its own way,
        # which biases Q's directions (Q[0, 0] comes out negative every time)
        # and leaves the kernel estimate an error floor that more features do
        # not remove. Flipping columns so that diag(R) > 0 makes Q uniformly
        # (Haar) distributed, the Q of Gram-Schmidt.
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        rows = q.t()
        blocks.append(rows if i < n_full else rows[:rest])
    directions = torch.cat(blocks, dim=0)
    lengths = torch.randn(nb_features, dim_head, generator=generator,
                          dtype=torch.float64).norm(dim=1)
    return (lengths.unsqueeze(1) * directions).to(dtype)


def softmax_kernel_features(x: torch.Tensor, projection: torch.Tensor,
                            is_query: bool) -> torch.Tensor:
    """Positive random features φ(x) of one cell, for all heads at once.

    x: (H, n, E) queries or keys of one cell; projection: (M, E).
    Returns φ: (H, n, M) with, for c = E^-1/4 and r = M^-1/2,

        u    = c · x · Pᵀ
        diag = |x|² · c² / 2
        φ    = r · (exp(u − diag − max) + ε)

    where max is, for queries, the maximum of each row of u over the M
    features, and for keys the maximum of u over all heads, positions and
    features of the cell. Both maxima are kept in the autograd graph (as in
    scBERT). For the key, the shift does not cancel exactly because of ε,
    so the per-cell (not per-micro-batch) max is what makes a cell's result
    independent of its batch-mates.
    """
    dim_head = x.shape[-1]
    c = dim_head ** -0.25
    r = projection.shape[0] ** -0.5
    u = torch.matmul(x * c, projection.t())                       # (H, n, M)
    diag = x.pow(2).sum(dim=-1, keepdim=True) * (c * c / 2.0)     # (H, n, 1)
    # torch.max as in scBERT: the row max sends its gradient to the one index
    # it returns (cheaper than amax's tie-splitting); the full max splits it
    # evenly among ties. Ties have probability zero with continuous inputs.
    if is_query:
        shift = torch.max(u, dim=-1, keepdim=True).values         # (H, n, 1)
    else:
        shift = torch.max(u)                                      # scalar, per cell
    return r * (torch.exp(u - diag - shift) + FAVOR_EPS)


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    projection: torch.Tensor,
                    trace: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Non-causal FAVOR+ attention of one cell.

    q, k, v: (H, n, E); projection: (M, E). Returns (H, n, E):

        S    = Σₙ φ(k)ₙ                (H, M)
        ctx  = φ(k)ᵀ · v               (H, M, E)
        out  = (φ(q) · ctx) / (φ(q) · S)

    Costs O(n·M·E) instead of the O(n²·E) of exact attention.
    """
    phi_q = softmax_kernel_features(q, projection, is_query=True)   # (H, n, M)
    phi_k = softmax_kernel_features(k, projection, is_query=False)  # (H, n, M)
    k_sum = phi_k.sum(dim=-2)                                       # (H, M)
    denom = torch.matmul(phi_q, k_sum.unsqueeze(-1))                # (H, n, 1)
    ctx = torch.matmul(phi_k.transpose(-1, -2), v)                  # (H, M, E)
    out = torch.matmul(phi_q, ctx) / denom                          # (H, n, E)
    if trace is not None:
        trace["phi_q"] = phi_q.detach().clone()
        trace["phi_k"] = phi_k.detach().clone()
    return out


def exact_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√E)·v, the quantity FAVOR+ estimates (for tests only)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(torch.softmax(scores, dim=-1), v)


# ---------------------------------------------------------------------------
# Modules (their nesting reproduces scBERT's parameter names)
# ---------------------------------------------------------------------------

class FastAttention(nn.Module):
    """Holds one layer's random projection (buffer ``projection_matrix``, (M, E))."""

    def __init__(self, dim_head: int, nb_features: int) -> None:
        super().__init__()
        self.register_buffer("projection_matrix",
                             orthogonal_random_features(nb_features, dim_head,
                                                        dtype=torch.get_default_dtype()))

    @torch.no_grad()
    def redraw(self, generator: Optional[torch.Generator] = None) -> None:
        """Replace the projection with a fresh draw (same shape and dtype)."""
        m, e = self.projection_matrix.shape
        self.projection_matrix.copy_(
            orthogonal_random_features(m, e, generator, dtype=self.projection_matrix.dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                trace: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        return favor_attention(q, k, v, self.projection_matrix, trace)


class SelfAttention(nn.Module):
    """Multi-head FAVOR+ self-attention over packed cells.

    Head h owns columns h·E:(h+1)·E of q, k, v and of the concatenated
    attention output that enters ``to_out``.
    """

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dim_head = cfg.dim_head
        # Registration order mirrors scBERT so that state_dict orders match.
        self.fast_attention = FastAttention(cfg.dim_head, cfg.nb_features)
        self.to_q = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.to_k = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.to_v = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.to_out = nn.Linear(cfg.inner_dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.attn_dropout)

    def forward(self, x: torch.Tensor, bounds: Sequence[Tuple[int, int]],
                trace: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """x: (T, d) packed LN1 output; bounds: (start, end) of each cell."""
        q_all = self.to_q(x)                                   # (T, H·E)
        k_all = self.to_k(x)
        v_all = self.to_v(x)
        outs = []
        for c, (s, e) in enumerate(bounds):
            n = e - s

            def heads_first(t: torch.Tensor) -> torch.Tensor:
                return t[s:e].view(n, self.heads, self.dim_head).transpose(0, 1)  # (H, n, E)

            cell_trace = {} if (trace is not None and c == 0) else None
            out = self.fast_attention(heads_first(q_all), heads_first(k_all),
                                      heads_first(v_all), cell_trace)
            outs.append(out.transpose(0, 1).reshape(n, self.heads * self.dim_head))
            if cell_trace is not None:
                trace.update(cell_trace)
        attn = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (T, H·E)
        if trace is not None:
            s, e = bounds[0]
            trace["q"] = q_all[s:e].detach().clone()
            trace["k"] = k_all[s:e].detach().clone()
            trace["v"] = v_all[s:e].detach().clone()
            trace["attn_out"] = attn[s:e].detach().clone()
        return self.dropout(self.to_out(attn))


class FeedForward(nn.Module):
    """w2(dropout(GELU(w1(x)))), GELU with the exact erf form."""

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ff_dim)
        self.dropout = nn.Dropout(cfg.ff_dropout)
        self.w2 = nn.Linear(cfg.ff_dim, cfg.dim)

    def forward(self, x: torch.Tensor, trace: Optional[Dict[str, torch.Tensor]] = None,
                first_cell: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        hidden = F.gelu(self.w1(x))                            # (T, F)
        if trace is not None:
            s, e = first_cell
            trace["ff_hidden"] = hidden[s:e].detach().clone()
        return self.w2(self.dropout(hidden))


class FeedForwardSlot(nn.Module):
    """Holds the feed-forward network as ``.fn``.

    scBERT wraps its feed-forward network in a sequence-chunking module; this
    wrapper (without chunking, which changes no result) exists only so that
    the parameters are named ``layers.{i}.1.fn.fn.w1`` as in scBERT.
    """

    def __init__(self, fn: FeedForward) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(x, **kwargs)


class PreNorm(nn.Module):
    """fn(LayerNorm(x)); the residual addition happens in the caller."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.fn = fn


class LayerStack(nn.Module):
    """``layers``: one ModuleList [PreNorm(attention), PreNorm(feed-forward)] per block."""

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(cfg.dim, SelfAttention(cfg)),
                           PreNorm(cfg.dim, FeedForwardSlot(FeedForward(cfg)))])
            for _ in range(cfg.depth))

    def forward(self, h: torch.Tensor, bounds: Sequence[Tuple[int, int]],
                trace: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        s0, e0 = bounds[0]
        for i, (attn, ff) in enumerate(self.layers):
            layer_trace = {} if trace is not None else None
            a_in = attn.norm(h)
            h = h + attn.fn(a_in, bounds, layer_trace)
            if layer_trace is not None:
                layer_trace["attn_in"] = a_in[s0:e0].detach().clone()
                layer_trace["h_after_attn"] = h[s0:e0].detach().clone()
            f_in = ff.norm(h)
            h = h + ff.fn(f_in, trace=layer_trace, first_cell=(s0, e0))
            if layer_trace is not None:
                layer_trace["ff_in"] = f_in[s0:e0].detach().clone()
                layer_trace["h_out"] = h[s0:e0].detach().clone()
                for key, value in layer_trace.items():
                    trace[f"layer{i}/{key}"] = value
        return h


class Performer(nn.Module):
    """``performer.net.layers...``: the block stack under scBERT's names."""

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        self.net = LayerStack(cfg)

    def forward(self, h, bounds, trace=None):
        return self.net(h, bounds, trace)


class GeneEmbedding(nn.Module):
    """Gene ("positional") embedding ``pos_emb.emb.weight`` of shape (G+1, d).

    Row G belongs to the extra last position of every cell and is zero. The
    lookup multiplies by a mask (gene != G), so row G is never read: the last
    position's gene vector is exactly zero whatever the stored row holds, and
    the gradient of row G is exactly zero (the model does not depend on it,
    which also keeps finite-difference checks consistent). The stored row is
    initialised to zero so that exported weights match scBERT's layout.
    """

    def __init__(self, n_genes: int, dim: int, frozen: bool) -> None:
        super().__init__()
        self.n_genes = n_genes
        self.emb = nn.Embedding(n_genes + 1, dim)
        with torch.no_grad():
            self.emb.weight[n_genes].zero_()
        if frozen:
            self.emb.weight.requires_grad_(False)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        vectors = F.embedding(genes, self.emb.weight)          # (T, d)
        is_gene = (genes != self.n_genes).unsqueeze(-1).to(vectors.dtype)
        return vectors * is_gene


class PerformerModel(nn.Module):
    """scBERT's PerformerLM on packed cells.

    forward(tokens, genes, offsets) -> logits (T, B+2) [, hidden (T, d)]

        h0     = token_emb[token] + gene_emb[gene]          (then emb dropout)
        block: h += dropout(to_out(FAVOR(LN1(h))))
               h += w2(dropout(GELU(w1(LN2(h)))))
        hidden = LN(h);  logits = to_out(hidden)
    """

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.n_tokens, cfg.dim)
        self.pos_emb = GeneEmbedding(cfg.n_genes, cfg.dim, frozen=(cfg.gene_emb == "frozen"))
        self.dropout = nn.Dropout(cfg.emb_dropout)
        self.performer = Performer(cfg)
        self.norm = nn.LayerNorm(cfg.dim, eps=LAYERNORM_EPS)
        self.to_out = nn.Linear(cfg.dim, cfg.n_tokens)

    def fast_attentions(self) -> List[FastAttention]:
        """The FastAttention module of every layer, in layer order."""
        return [layer[0].fn.fast_attention for layer in self.performer.net.layers]

    @torch.no_grad()
    def redraw_projections(self, generator: Optional[torch.Generator] = None) -> None:
        """Redraw every layer's random features (one matrix per layer)."""
        for fa in self.fast_attentions():
            fa.redraw(generator)

    def forward(self, tokens: torch.Tensor, genes: torch.Tensor,
                offsets: Union[torch.Tensor, Sequence[int]], return_hidden: bool = False,
                trace: Optional[Dict[str, torch.Tensor]] = None):
        """Run packed cells.

        tokens, genes: (T,) integer tensors; offsets: (n_cells+1,) with
        offsets[0] == 0 and offsets[-1] == T. If ``trace`` is a dict, the
        intermediate values of the first cell are stored in it (detached):
        ``h0`` and ``layer{i}/{attn_in,q,k,v,phi_q,phi_k,attn_out,
        h_after_attn,ff_in,ff_hidden,h_out}``.
        """
        bounds = offsets_to_bounds(offsets, tokens.shape[0])
        h = self.token_emb(tokens) + self.pos_emb(genes)       # (T, d)
        h = self.dropout(h)
        if trace is not None:
            s, e = bounds[0]
            trace["h0"] = h[s:e].detach().clone()
        h = self.performer(h, bounds, trace)
        hidden = self.norm(h)
        logits = self.to_out(hidden)                           # (T, V)
        return (logits, hidden) if return_hidden else logits


def offsets_to_bounds(offsets: Union[torch.Tensor, Sequence[int]],
                      total: int) -> List[Tuple[int, int]]:
    """Check packed offsets and return each cell's (start, end)."""
    off = [int(o) for o in (offsets.tolist() if torch.is_tensor(offsets) else offsets)]
    if len(off) < 2 or off[0] != 0 or off[-1] != total:
        raise ValueError(f"offsets must run from 0 to {total} over at least one cell, got {off}")
    bounds = list(zip(off[:-1], off[1:]))
    if any(e <= s for s, e in bounds):
        raise ValueError(f"every cell needs at least one position, offsets {off}")
    return bounds


def expected_state_dict_keys(depth: int) -> List[str]:
    """scBERT's state_dict names, in order (without its redraw counter buffer)."""
    keys = ["token_emb.weight", "pos_emb.emb.weight"]
    for i in range(depth):
        a = f"performer.net.layers.{i}.0"
        f = f"performer.net.layers.{i}.1"
        keys += [f"{a}.norm.weight", f"{a}.norm.bias",
                 f"{a}.fn.fast_attention.projection_matrix",
                 f"{a}.fn.to_q.weight", f"{a}.fn.to_k.weight", f"{a}.fn.to_v.weight",
                 f"{a}.fn.to_out.weight", f"{a}.fn.to_out.bias",
                 f"{f}.norm.weight", f"{f}.norm.bias",
                 f"{f}.fn.fn.w1.weight", f"{f}.fn.fn.w1.bias",
                 f"{f}.fn.fn.w2.weight", f"{f}.fn.fn.w2.bias"]
    keys += ["norm.weight", "norm.bias", "to_out.weight", "to_out.bias"]
    return keys


# ---------------------------------------------------------------------------
# Initialisation for reference dumps
# ---------------------------------------------------------------------------

@torch.no_grad()
def init_reference_parameters(model: PerformerModel, generator: torch.Generator) -> None:
    """Deterministic, deliberately non-trivial initialisation for dumps and tests.

    Linear weights ~ N(0, 1/fan_in) so that q and k are of order one and the
    attention is far from uniform; linear biases and LayerNorm biases
    ~ 0.1·N(0,1) and LayerNorm weights ~ 1 + 0.1·N(0,1), so that every
    parameter's gradient is non-trivial; embeddings ~ 0.5·N(0,1) with the gene
    embedding's row G zero; fresh orthogonal random features per layer.
    """

    def normal_(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(mean + std * torch.randn(t.shape, generator=generator, dtype=torch.float64))

    for name, p in model.named_parameters():
        if name.endswith("emb.weight"):
            normal_(p, 0.5)
        elif "norm." in name:
            normal_(p, 0.1, 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith(".weight"):
            normal_(p, p.shape[1] ** -0.5)
        elif name.endswith(".bias"):
            normal_(p, 0.1)
        else:
            raise AssertionError(f"no initialisation rule for {name}")
    model.pos_emb.emb.weight[model.cfg.n_genes].zero_()
    model.redraw_projections(generator)


# ---------------------------------------------------------------------------
# Tokenisation and packing (DESIGN §3)
# ---------------------------------------------------------------------------

def tokenize_counts(counts: np.ndarray, bins: int) -> np.ndarray:
    """Expression tokens of one cell's counts over the vocabulary.

    x = log2(1 + 1e4·count/total) with total the cell's sum over vocabulary
    genes; token = min(floor(x), B). Computed in float64 as
    (1e4·count)/total, multiplying first, so that exact cases (count/total a
    power-of-two fraction of 1e-4) land exactly on the bin edge. A cell with
    no counts gets all-zero tokens.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return np.zeros(counts.shape, dtype=np.int64)
    x = np.log2(1.0 + (1e4 * counts) / total)
    return np.minimum(np.floor(x), bins).astype(np.int64)


def _rows(counts) -> List[np.ndarray]:
    """Dense float64 rows of a 2-D array, list of rows or scipy sparse matrix."""
    if hasattr(counts, "toarray"):
        counts = counts.toarray()
    return [np.asarray(row, dtype=np.float64).ravel() for row in counts]


def pack_cells(counts, mode: str, bins: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the packed (tokens, genes, offsets) of cells given raw counts.

    counts: (n_cells, G) numpy array, list of rows, or scipy sparse matrix.
    mode 'full': positions are genes 0..G-1 in vocabulary order; mode
    'nonzero': only genes with a nonzero count, in vocabulary order. In both
    modes one last position follows: token 0, gene index G (zero embedding).
    Returns int64 tensors tokens (T,), genes (T,), offsets (n_cells+1,).
    """
    if mode not in ("full", "nonzero"):
        raise ValueError(f"mode must be 'full' or 'nonzero', got {mode!r}")
    tokens, genes, offsets = [], [], [0]
    for row in _rows(counts):
        n_genes = row.shape[0]
        tok = tokenize_counts(row, bins)
        idx = np.arange(n_genes) if mode == "full" else np.flatnonzero(row)
        tokens.append(np.append(tok[idx], 0))
        genes.append(np.append(idx, n_genes))
        offsets.append(offsets[-1] + idx.shape[0] + 1)
    return (torch.from_numpy(np.concatenate(tokens).astype(np.int64)),
            torch.from_numpy(np.concatenate(genes).astype(np.int64)),
            torch.tensor(offsets, dtype=torch.int64))


# ---------------------------------------------------------------------------
# Masked-expression pretraining (DESIGN §4)
# ---------------------------------------------------------------------------

def n_masked_positions(n_maskable: int) -> int:
    """ceil(0.15·n) in exact integer arithmetic, ceil(3n/20).

    Floating point would be fragile here: 0.15 is not representable, and in
    float32 0.15f·n can exceed an integer that 0.15·n equals exactly.
    """
    return (3 * n_maskable + 19) // 20


def apply_mlm_masking(tokens: torch.Tensor, offsets: Union[torch.Tensor, Sequence[int]],
                      bins: int, generator: Optional[torch.Generator] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """scBERT masking of packed cells, drawn from torch's RNG.

    In each cell the maskable positions are those with tokens 1..B, never the
    cell's last position; ceil(0.15·n_maskable) of them are chosen uniformly
    without replacement; each chosen position independently becomes MASK
    (B+1) with probability 0.9 and keeps its token otherwise (scBERT's
    Bernoulli rule). Returns (masked tokens, target) where target holds the
    original token at chosen positions and -1 elsewhere.
    """
    bounds = offsets_to_bounds(offsets, tokens.shape[0])
    masked = tokens.clone()
    target = torch.full_like(tokens, -1)
    for s, e in bounds:
        cell = tokens[s:e - 1]
        maskable = torch.nonzero((cell >= 1) & (cell <= bins)).flatten() + s
        k = n_masked_positions(maskable.numel())
        if k == 0:
            continue
        chosen = maskable[torch.randperm(maskable.numel(), generator=generator)[:k]]
        chosen, _ = torch.sort(chosen)
        target[chosen] = tokens[chosen]
        replace = torch.rand(k, generator=generator, dtype=torch.float64) < REPLACE_PROB
        masked[chosen[replace]] = bins + 1
    return masked, target


def mlm_loss(logits: torch.Tensor, target: torch.Tensor,
             n_norm: Union[int, float, None] = None) -> torch.Tensor:
    """Sum of cross-entropy over chosen positions (target >= 0) divided by n_norm.

    n_norm is the number of chosen positions in the global batch (all ranks,
    all micro-batches); it defaults to the local count, which is the same in
    a single process.
    """
    chosen = target >= 0
    if n_norm is None:
        n_norm = int(chosen.sum())
    if n_norm <= 0:
        raise ValueError("mlm_loss needs at least one chosen position (n_norm > 0)")
    ce = F.cross_entropy(logits[chosen], target[chosen].long(), reduction="sum")
    return ce / n_norm
