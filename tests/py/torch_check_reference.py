#!/usr/bin/python3
"""Self-checks of the PyTorch reference model (tools/perfcell_torch.py).

The C tests trust the dumps written by tools/make_reference.py, so the
reference itself is checked here against independent facts:

  a. autograd gradients of the whole model equal central finite differences
     (torch.autograd.gradcheck, float64, full and nonzero modes), and FAVOR+'s
     gradient includes the paths through both maxima;
  b. packed cells give the same logits, hidden states, loss contributions and
     gradients as each cell run alone (per-cell key max);
  c. FAVOR+ approaches exact softmax attention as the number of features grows;
  d. the random-feature blocks are orthogonal, rows scaled by Gaussian norms;
  e. state_dict names and order are scBERT's;
  f. tokenisation, packing and masking follow DESIGN §3 and §4;
  g. the gene-embedding row G is never read and gets no gradient; the frozen
     option trains no gene embedding;
  h. float32 agrees with float64;
  i. a dump written by the CLI is self-consistent and re-running its recorded
     command reproduces it.

Exit status 0 only if every check passes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback

import h5py
import numpy as np
import torch
from torch.nn.utils import stateless

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_reference as mr  # noqa: E402
import perfcell_torch as pt  # noqa: E402

torch.set_num_threads(1)

TINY = dict(n_genes=6, dim=8, depth=2, heads=2, dim_head=4, nb_features=6, ff_dim=12, bins=5)


def build(cfg_kwargs: dict, seed: int = 0, dtype=torch.float64) -> pt.PerformerModel:
    model = pt.PerformerModel(pt.PerformerConfig(**cfg_kwargs)).to(torch.float64)
    pt.init_reference_parameters(model, torch.Generator().manual_seed(seed))
    return model.to(dtype)


def batch(n_genes: int, lengths, mode: str, seed: int, bins: int = 5):
    """Synthetic cells -> masked packed inputs (tokens, genes, offsets, target)."""
    counts = mr.synthetic_counts(n_genes, lengths, np.random.default_rng(seed))
    tokens, genes, offsets = pt.pack_cells(counts, mode, bins)
    masked, target = pt.apply_mlm_masking(tokens, offsets, bins,
                                          torch.Generator().manual_seed(seed))
    return masked, genes, offsets, target


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------
# a. gradients
# ---------------------------------------------------------------------------

def check_gradcheck_model() -> None:
    """Whole-model gradcheck over every trainable parameter, both modes."""
    for mode, lengths in (("full", [3, 2]), ("nonzero", [1, 3, 5])):
        model = build(TINY, seed=3)
        tokens, genes, offsets, target = batch(TINY["n_genes"], lengths, mode, seed=4)
        assert int((target >= 0).sum()) > 0
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_(True)
                       for n in names)

        def f(*flat):
            logits = stateless.functional_call(model, dict(zip(names, flat)),
                                               (tokens, genes, offsets))
            return pt.mlm_loss(logits, target), logits

        # Defaults (eps 1e-6, atol 1e-5, rtol 1e-3): finite differences of a
        # float64 function this smooth are accurate to ~1e-9.
        ok = torch.autograd.gradcheck(f, params, raise_exception=True)
        assert ok
        print(f"    gradcheck {mode}: {sum(p.numel() for p in params)} parameters, "
              f"{tokens.numel()} positions")


def check_gradcheck_favor() -> None:
    """FAVOR+ alone against finite differences, tightly; a detached max must fail.

    The tight tolerance (central differences in float64 are good to ~1e-10
    here) shows that the gradient paths through the row max and the cell max
    are included: dropping them (as with .detach()) changes gradients by far
    more than that.
    """
    g = torch.Generator().manual_seed(5)
    H, n, E, M = 2, 5, 4, 7
    q, k, v = (torch.randn(H, n, E, generator=g, dtype=torch.float64).requires_grad_(True)
               for _ in range(3))
    proj = pt.orthogonal_random_features(M, E, g)
    fn = lambda a, b, c: pt.favor_attention(a, b, c, proj)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)

    def favor_detached(a, b, c):
        c4 = E ** -0.25
        r = M ** -0.5
        ua, ub = (a * c4) @ proj.t(), (b * c4) @ proj.t()
        da = a.pow(2).sum(-1, keepdim=True) * c4 * c4 / 2
        db = b.pow(2).sum(-1, keepdim=True) * c4 * c4 / 2
        pa = r * (torch.exp(ua - da - ua.amax(-1, keepdim=True).detach()) + pt.FAVOR_EPS)
        pb = r * (torch.exp(ub - db - ub.amax().detach()) + pt.FAVOR_EPS)
        return (pa @ (pb.transpose(-1, -2) @ c)) / (pa @ pb.sum(-2).unsqueeze(-1))

    w = torch.randn(H, n, E, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((fn(q, k, v) * w).sum(), (q, k))
    detached = torch.autograd.grad((favor_detached(q, k, v) * w).sum(), (q, k))
    with torch.no_grad():
        assert torch.allclose(fn(q, k, v), favor_detached(q, k, v), rtol=0, atol=1e-14)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, detached))
    assert diff > 1e-6, f"gradient through the maxima is negligible ({diff:.3g})"
    print(f"    max-path contribution to dq, dk: {diff:.3g}")


# ---------------------------------------------------------------------------
# b. packing
# ---------------------------------------------------------------------------

def check_packed_equals_single() -> None:
    cfg = dict(TINY, n_genes=30, dim=16, heads=2, dim_head=8, nb_features=12, ff_dim=32)
    model = build(cfg, seed=6)
    tokens, genes, offsets, target = batch(30, [9, 1, 27, 4], "nonzero", seed=7)
    n_norm = int((target >= 0).sum())
    off = offsets.tolist()

    model.zero_grad()
    logits, hidden = model(tokens, genes, offsets, return_hidden=True)
    pt.mlm_loss(logits, target, n_norm).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for c in range(len(off) - 1):
        s, e = off[c], off[c + 1]
        lg, hd = model(tokens[s:e], genes[s:e], [0, e - s], return_hidden=True)
        # The same positions, so bitwise-equal math up to BLAS blocking.
        assert torch.allclose(lg, logits[s:e], rtol=0, atol=1e-12), f"cell {c} logits"
        assert torch.allclose(hd, hidden[s:e], rtol=0, atol=1e-12), f"cell {c} hidden"
        if int((target[s:e] >= 0).sum()):
            cell_loss = pt.mlm_loss(lg, target[s:e], n_norm)
            cell_loss.backward()  # accumulates: the sum over cells is the batch gradient
            total = total + cell_loss.detach()
    full_loss = pt.mlm_loss(logits, target, n_norm).detach()
    assert abs(float(total - full_loss)) < 1e-12, (float(total), float(full_loss))
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, packed_grads[n], rtol=1e-10, atol=1e-13), n


# ---------------------------------------------------------------------------
# c. FAVOR+ approximates softmax attention
# ---------------------------------------------------------------------------

def check_favor_converges() -> None:
    """Relative error against exact attention falls with the number of features.

    Small q and k (entries 0.25·N(0,1)) keep the estimator's variance and the
    ε bias small, so the Monte-Carlo error (~ m^-1/2) dominates. A biased
    feature draw (QR without the sign fix) plateaus near 0.04 here.
    """
    g = torch.Generator().manual_seed(8)
    H, n, E = 1, 32, 8
    errs = {16: [], 4096: []}
    for trial in range(6):
        q, k, v = (0.25 * torch.randn(H, n, E, generator=g, dtype=torch.float64)
                   for _ in range(3))
        exact = pt.exact_softmax_attention(q, k, v)
        for m in errs:
            proj = pt.orthogonal_random_features(m, E, g)
            errs[m].append(rel_err(pt.favor_attention(q, k, v, proj), exact))
    few, many = np.mean(errs[16]), np.mean(errs[4096])
    print(f"    relative error vs exact softmax: m=16 {few:.4f}, m=4096 {many:.4f}")
    # m^-1/2 predicts a 16x gap (measured ~15x); ask for 4x and a small error.
    assert many < few / 4, (few, many)
    assert many < 0.015, many


# ---------------------------------------------------------------------------
# d. orthogonal features
# ---------------------------------------------------------------------------

def check_orthogonal_features() -> None:
    E, M = 8, 20  # two full blocks and a block of 4 rows
    proj = pt.orthogonal_random_features(M, E, torch.Generator().manual_seed(9))
    assert proj.shape == (M, E)
    norms = proj.norm(dim=1)
    unit = proj / norms.unsqueeze(1)
    for s in range(0, M, E):
        block = unit[s:s + E]
        gram = block @ block.t()
        assert torch.allclose(gram, torch.eye(block.shape[0], dtype=gram.dtype), atol=1e-12), s
    # Different blocks are independent draws, not orthogonal to each other.
    assert float((unit[:E] @ unit[E:2 * E].t()).abs().max()) > 1e-3
    # Row lengths are norms of Gaussian E-vectors (chi with E degrees of
    # freedom: mean ~ sqrt(E - 1/2)), not a constant.
    assert float(norms.std()) > 1e-3
    assert 1.0 < float(norms.mean()) < 5.0
    # Each layer of a model holds its own matrix.
    model = build(TINY, seed=10)
    p0, p1 = (fa.projection_matrix for fa in model.fast_attentions())
    assert p0.shape == (TINY["nb_features"], TINY["dim_head"]) and not torch.equal(p0, p1)


# ---------------------------------------------------------------------------
# e. names
# ---------------------------------------------------------------------------

def check_state_dict_names() -> None:
    expected = [
        "token_emb.weight", "pos_emb.emb.weight",
        "performer.net.layers.0.0.norm.weight", "performer.net.layers.0.0.norm.bias",
        "performer.net.layers.0.0.fn.fast_attention.projection_matrix",
        "performer.net.layers.0.0.fn.to_q.weight", "performer.net.layers.0.0.fn.to_k.weight",
        "performer.net.layers.0.0.fn.to_v.weight", "performer.net.layers.0.0.fn.to_out.weight",
        "performer.net.layers.0.0.fn.to_out.bias",
        "performer.net.layers.0.1.norm.weight", "performer.net.layers.0.1.norm.bias",
        "performer.net.layers.0.1.fn.fn.w1.weight", "performer.net.layers.0.1.fn.fn.w1.bias",
        "performer.net.layers.0.1.fn.fn.w2.weight", "performer.net.layers.0.1.fn.fn.w2.bias",
        "performer.net.layers.1.0.norm.weight", "performer.net.layers.1.0.norm.bias",
        "performer.net.layers.1.0.fn.fast_attention.projection_matrix",
        "performer.net.layers.1.0.fn.to_q.weight", "performer.net.layers.1.0.fn.to_k.weight",
        "performer.net.layers.1.0.fn.to_v.weight", "performer.net.layers.1.0.fn.to_out.weight",
        "performer.net.layers.1.0.fn.to_out.bias",
        "performer.net.layers.1.1.norm.weight", "performer.net.layers.1.1.norm.bias",
        "performer.net.layers.1.1.fn.fn.w1.weight", "performer.net.layers.1.1.fn.fn.w1.bias",
        "performer.net.layers.1.1.fn.fn.w2.weight", "performer.net.layers.1.1.fn.fn.w2.bias",
        "norm.weight", "norm.bias", "to_out.weight", "to_out.bias",
    ]
    cfg = pt.PerformerConfig(n_genes=11, dim=12, depth=2, heads=3, dim_head=5, nb_features=7,
                             ff_dim=20, bins=5)
    sd = pt.PerformerModel(cfg).state_dict()
    assert list(sd.keys()) == expected, list(sd.keys())
    assert pt.expected_state_dict_keys(2) == expected
    d, inner, V = 12, 15, 7
    shapes = {"token_emb.weight": (V, d), "pos_emb.emb.weight": (12, d),
              "performer.net.layers.0.0.fn.fast_attention.projection_matrix": (7, 5),
              "performer.net.layers.0.0.fn.to_q.weight": (inner, d),
              "performer.net.layers.0.0.fn.to_out.weight": (d, inner),
              "performer.net.layers.0.1.fn.fn.w1.weight": (20, d),
              "performer.net.layers.0.1.fn.fn.w1.bias": (20,),
              "performer.net.layers.0.1.fn.fn.w2.weight": (d, 20),
              "to_out.weight": (V, d), "to_out.bias": (V,), "norm.weight": (d,)}
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, (name, tuple(sd[name].shape), shape)
    buffers = [n for n, _ in pt.PerformerModel(cfg).named_buffers()]
    assert buffers == [k for k in expected if k.endswith("projection_matrix")], buffers


# ---------------------------------------------------------------------------
# f. tokens, packing, masking
# ---------------------------------------------------------------------------

def check_tokens_packing_masking() -> None:
    # Bin edges that are exact in float64: 1e4·count/total = 2^t - 1.
    row = np.array([1, 3, 7, 15, 31, 0, 9943, 63], dtype=np.float64)  # total 10063
    row[6] = 1e4 - row[:6].sum() - row[7]                               # total exactly 1e4
    assert row.sum() == 1e4
    toks = pt.tokenize_counts(row, 5)
    assert toks.tolist() == [1, 2, 3, 4, 5, 0, 5, 5], toks.tolist()
    assert pt.tokenize_counts(np.array([0.9999e0, 1e4 - 0.9999]), 5)[0] == 0
    assert pt.tokenize_counts(np.zeros(4), 5).tolist() == [0, 0, 0, 0]

    counts = np.array([[0, 5, 0, 2], [0, 0, 0, 7], [1, 1, 1, 1]])
    t, g, o = pt.pack_cells(counts, "full", 5)
    assert o.tolist() == [0, 5, 10, 15]
    assert g.tolist() == [0, 1, 2, 3, 4] * 3
    assert t[4] == 0 and t[9] == 0 and t[14] == 0
    t, g, o = pt.pack_cells(counts, "nonzero", 5)
    assert o.tolist() == [0, 3, 5, 10]
    assert g.tolist() == [1, 3, 4, 3, 4, 0, 1, 2, 3, 4]
    assert t.tolist()[2] == 0 and t.tolist()[4] == 0 and t.tolist()[9] == 0

    # 100 and 200: float32 0.15f·n exceeds 15 and 30, so a float32 ceil gives
    # 16 and 31 (as torch's long·0.15 does); the rule is the exact ceil.
    assert [pt.n_masked_positions(n) for n in (0, 1, 6, 7, 20, 21, 40, 100, 200)] == \
        [0, 1, 1, 2, 3, 4, 6, 15, 30]
    lengths = [1, 7, 20, 40, 55]
    counts = mr.synthetic_counts(60, lengths, np.random.default_rng(11))
    tokens, genes, offsets = pt.pack_cells(counts, "nonzero", 5)
    n_mask = n_chosen = 0
    for rep in range(40):
        masked, target = pt.apply_mlm_masking(tokens, offsets, 5,
                                              torch.Generator().manual_seed(rep))
        off = offsets.tolist()
        for c in range(len(lengths)):
            s, e = off[c], off[c + 1]
            maskable = int(((tokens[s:e - 1] >= 1) & (tokens[s:e - 1] <= 5)).sum())
            chosen = target[s:e] >= 0
            assert int(chosen.sum()) == pt.n_masked_positions(maskable)
            assert not bool(chosen[-1]), "last position chosen"
            assert bool(((tokens[s:e][chosen] >= 1) & (tokens[s:e][chosen] <= 5)).all())
            assert torch.equal(target[s:e][chosen], tokens[s:e][chosen])
            assert torch.equal(masked[s:e][~chosen], tokens[s:e][~chosen])
            kept = masked[s:e][chosen]
            assert bool(((kept == 6) | (kept == tokens[s:e][chosen])).all())
            n_mask += int((kept == 6).sum())
            n_chosen += int(chosen.sum())
    frac = n_mask / n_chosen
    # n_chosen ~ 1000 Bernoulli(0.9) draws: 5 sigma ~ 0.05.
    assert 0.85 < frac < 0.95, frac


# ---------------------------------------------------------------------------
# g. gene embedding row G, frozen option
# ---------------------------------------------------------------------------

def check_gene_embedding() -> None:
    tokens, genes, offsets, target = batch(TINY["n_genes"], [2, 4], "nonzero", seed=12)
    model = build(TINY, seed=13)
    G = TINY["n_genes"]
    base = model(tokens, genes, offsets)
    with torch.no_grad():
        model.pos_emb.emb.weight[G].normal_()
    assert torch.equal(model(tokens, genes, offsets), base), "row G is read"
    pt.mlm_loss(model(tokens, genes, offsets), target).backward()
    grad = model.pos_emb.emb.weight.grad
    assert bool((grad[G] == 0).all()) and float(grad[:G].abs().max()) > 0

    frozen = build(dict(TINY, gene_emb="frozen"), seed=13)
    assert not frozen.pos_emb.emb.weight.requires_grad
    assert "pos_emb.emb.weight" in frozen.state_dict()
    pt.mlm_loss(frozen(tokens, genes, offsets), target).backward()
    assert frozen.pos_emb.emb.weight.grad is None


# ---------------------------------------------------------------------------
# h. float32
# ---------------------------------------------------------------------------

def check_float32() -> None:
    cfg = dict(n_genes=50, dim=32, depth=2, heads=4, dim_head=8, nb_features=16, ff_dim=64,
               bins=5)
    tokens, genes, offsets, target = batch(50, [10, 30], "full", seed=14)
    m64 = build(cfg, seed=15)
    m32 = build(cfg, seed=15, dtype=torch.float32)
    l64 = pt.mlm_loss(m64(tokens, genes, offsets), target)
    l32 = pt.mlm_loss(m32(tokens, genes, offsets), target)
    l64.backward()
    l32.backward()
    assert l32.dtype == torch.float32
    # float32 rounding (~6e-8 relative) amplified by a few layers: 1e-4 is loose.
    assert abs(float(l32) - float(l64)) < 1e-4 * abs(float(l64))
    for (n, a), (_, b) in zip(m32.named_parameters(), m64.named_parameters()):
        assert rel_err(a.grad.double(), b.grad) < 1e-3, n


# ---------------------------------------------------------------------------
# i. dumps
# ---------------------------------------------------------------------------

def check_dump(tmp: str) -> None:
    out = os.path.join(tmp, "ref_nonzero.h5")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_reference.py"), "--out", out,
           "--mode", "nonzero", "--genes", "20", "--dim", "12", "--depth", "2", "--heads", "2",
           "--dim-head", "6", "--features", "9", "--ff", "24", "--bins", "5", "--cells", "3",
           "--nonzero-lengths", "7,1,15", "--seed", "21"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    with h5py.File(out, "r") as f:
        a = dict(f.attrs)
        cfg = pt.PerformerConfig(n_genes=int(a["n_genes"]), dim=int(a["dim"]),
                                 depth=int(a["depth"]), heads=int(a["heads"]),
                                 dim_head=int(a["dim_head"]),
                                 nb_features=int(a["nb_features"]), ff_dim=int(a["ff_dim"]),
                                 bins=int(a["bins"]), gene_emb=str(a["gene_emb"]))
        assert a["mode"] == "nonzero" and a["dtype"] == "float64" and int(a["n_cells"]) == 3
        model = pt.PerformerModel(cfg).to(torch.float64)
        state = {k: torch.from_numpy(f[f"params/{k}"][()]) for k in f["params"].keys()}
        assert sorted(state) == sorted(pt.expected_state_dict_keys(cfg.depth))
        model.load_state_dict(state)
        tokens = torch.from_numpy(f["input/tokens"][()].astype(np.int64))
        genes = torch.from_numpy(f["input/genes"][()].astype(np.int64))
        offsets = torch.from_numpy(f["input/offsets"][()])
        target = torch.from_numpy(f["input/target"][()].astype(np.int64))
        n_norm = int(f["input/n_norm"][()])
        assert offsets.tolist() == [0, 8, 10, 26]
        assert n_norm == int((target >= 0).sum())
        assert (genes[offsets[1:] - 1] == cfg.n_genes).all()
        unmasked = pt.pack_cells(f["input/counts"][()], "nonzero", cfg.bins)[0]
        assert torch.equal(unmasked, torch.from_numpy(f["input/tokens_unmasked"][()]).long())
        trace = {}
        logits, hidden = model(tokens, genes, offsets, return_hidden=True, trace=trace)
        loss = pt.mlm_loss(logits, target, n_norm)
        loss.backward()
        # Recomputation in the same process and precision: equal to rounding.
        assert np.allclose(logits.detach().numpy(), f["output/logits"][()], rtol=0, atol=1e-13)
        assert np.allclose(hidden.detach().numpy(), f["output/hidden"][()], rtol=0, atol=1e-13)
        assert abs(loss.item() - float(f["output/loss"][()])) < 1e-13
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        grads = {}

        def collect(name, obj):  # returns None: visititems stops at a value
            if isinstance(obj, h5py.Dataset):
                grads[name] = obj[()]
        f["grad"].visititems(collect)
        assert set(grads) == trainable, set(grads) ^ trainable
        for n, p in model.named_parameters():
            assert np.allclose(p.grad.numpy(), grads[n], rtol=1e-12, atol=1e-14), n
            assert grads[n].shape == tuple(p.shape)
        assert not grads["pos_emb.emb.weight"][cfg.n_genes].any()
        n0 = int(offsets[1])
        for i in range(cfg.depth):
            for key, width in (("attn_in", cfg.dim), ("q", cfg.inner_dim), ("k", cfg.inner_dim),
                               ("v", cfg.inner_dim), ("attn_out", cfg.inner_dim),
                               ("h_after_attn", cfg.dim), ("h_out", cfg.dim)):
                ds = f[f"debug/layer{i}/{key}"][()]
                assert ds.shape == (n0, width), (i, key, ds.shape)
                assert np.allclose(ds, trace[f"layer{i}/{key}"].numpy(), rtol=0, atol=1e-13)
        command = str(a["command"])
    # The recorded command reproduces the file's arrays exactly.
    argv = shlex.split(command)
    again = os.path.join(tmp, "again.h5")
    argv[argv.index("--out") + 1] = again
    subprocess.run(argv, check=True, cwd=ROOT)
    with h5py.File(out, "r") as f1, h5py.File(again, "r") as f2:
        names = []
        f1.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for n in names:
            assert np.array_equal(f1[n][()], f2[n][()]), n

    frozen = os.path.join(tmp, "ref_frozen.h5")
    subprocess.run(cmd[:cmd.index("--out") + 1] + [frozen] + cmd[cmd.index("--out") + 2:]
                   + ["--frozen-gene-emb"], check=True, cwd=ROOT)
    with h5py.File(frozen, "r") as f:
        assert f.attrs["gene_emb"] == "frozen"
        assert "pos_emb.emb.weight" in f["params"] and "pos_emb.emb.weight" not in f["grad"]


# ---------------------------------------------------------------------------

def main() -> int:
    checks = [
        ("e. state_dict names and shapes", check_state_dict_names),
        ("d. orthogonal random features", check_orthogonal_features),
        ("f. tokens, packing, masking", check_tokens_packing_masking),
        ("g. gene embedding row G / frozen", check_gene_embedding),
        ("c. FAVOR+ converges to softmax", check_favor_converges),
        ("a. gradcheck FAVOR+ (both maxima)", check_gradcheck_favor),
        ("a. gradcheck whole model", check_gradcheck_model),
        ("b. packed == cell by cell", check_packed_equals_single),
        ("h. float32 vs float64", check_float32),
    ]
    failed = []
    tmp_parent = os.environ.get("TEST_TMP")
    with tempfile.TemporaryDirectory(dir=tmp_parent) as tmp:
        checks.append(("i. dump round trip", lambda: check_dump(tmp)))
        for name, fn in checks:
            t0 = time.time()
            try:
                fn()
                print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
            except Exception:  # report every failing check, not only the first
                failed.append(name)
                print(f"FAIL {name}", flush=True)
                traceback.print_exc()
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
