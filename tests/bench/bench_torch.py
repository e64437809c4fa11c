#!/usr/bin/python3
"""PyTorch side of perfcell's benchmarks: training-step time and peak memory.

Times forward + MLM loss + backward (no optimizer) of the reference model
(tools/perfcell_torch.py) in float32 eager PyTorch on one thread, the same
model the C code trains. Each measurement runs in a fresh subprocess so that
peak RSS (ru_maxrss) belongs to one configuration. One machine-readable line
per measurement goes to stdout, for example

    torch mode=full genes=2000 tokens=2001 step_s=1.234 fwd_s=0.401 ... peak_rss_mb=812.3

step_s is wall-clock time; step_cpu_s is this process's CPU time (user +
system), which stays meaningful on a machine shared with other jobs.
Progress goes to stderr.

    bench_torch.py                              scBERT config at G=16906 and G=2000
    bench_torch.py --genes 2000 --steps 5       one config, more steps
    bench_torch.py --genes 2000 --nonzero-h5ad ../shared/data/pbmc3k/pbmc3k_counts.h5ad
    bench_torch.py --genes 2000 --performer-pytorch /path/to/performer-pytorch

The full scBERT config (16,907 positions) takes tens of seconds per step and
several GiB on one core; lower --steps / --warmup to keep runs short.
"""

from __future__ import annotations

import argparse
import inspect
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--genes", type=int, nargs="+", default=[16906, 2000],
                   help="gene vocabulary sizes to time in full mode (default: 16906 2000)")
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--features", type=int, default=266)
    p.add_argument("--ff", type=int, default=800)
    p.add_argument("--bins", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nonzero-h5ad", metavar="PATH",
                   help="also time nonzero mode on the first cells of this .h5ad (CSR or dense X)")
    p.add_argument("--nonzero-cells", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=1, help="cells per step in nonzero mode")
    p.add_argument("--performer-pytorch", metavar="PATH",
                   help="checkout of performer-pytorch: time its PerformerLM instead of ours")
    p.add_argument("--no-full", action="store_true", help="skip the full-mode runs")
    p.add_argument("--timeout", type=float, default=None, help="seconds per measurement")
    p.add_argument("--child", choices=("full", "nonzero", "lucidrains"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Child processes: one measurement each
# ---------------------------------------------------------------------------

def _setup_torch():
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import perfcell_torch as pt
    return torch, pt


def _config(args, pt, n_genes):
    return pt.PerformerConfig(n_genes=n_genes, dim=args.dim, depth=args.depth, heads=args.heads,
                              dim_head=args.dim_head, nb_features=args.features,
                              ff_dim=args.ff, bins=args.bins)


def _full_mode_cell(args, torch, pt, n_genes):
    """One synthetic cell in full mode with ~10 % nonzero genes, scBERT-masked."""
    import numpy as np
    import make_reference as mr
    rng = np.random.default_rng(args.seed)
    counts = mr.synthetic_counts(n_genes, [max(1, n_genes // 10)], rng)
    tokens, genes, offsets = pt.pack_cells(counts, "full", args.bins)
    masked, target = pt.apply_mlm_masking(tokens, offsets, args.bins,
                                          torch.Generator().manual_seed(args.seed))
    return masked, genes, offsets, target


def child_full(args) -> None:
    torch, pt = _setup_torch()
    n_genes = args.genes[0]
    model = pt.PerformerModel(_config(args, pt, n_genes))  # float32, PyTorch default init
    model.train()
    tokens, genes, offsets, target = _full_mode_cell(args, torch, pt, n_genes)
    base = peak_rss_mb()
    steps, fwd, cpu = [], [], []
    for i in range(args.warmup + args.steps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = pt.mlm_loss(model(tokens, genes, offsets), target)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        c2 = time.process_time()
        log(f"  torch full G={n_genes} step {i + 1}/{args.warmup + args.steps}: "
            f"{t2 - t0:.3f}s (forward {t1 - t0:.3f}s, cpu {c2 - c0:.3f}s)"
            f"{' warm-up' if i < args.warmup else ''}")
        if i >= args.warmup:
            steps.append(t2 - t0)
            fwd.append(t1 - t0)
            cpu.append(c2 - c0)
    print(f"torch mode=full genes={n_genes} tokens={tokens.numel()} dim={args.dim} "
          f"depth={args.depth} heads={args.heads} features={args.features} "
          f"masked={int((target >= 0).sum())} steps={len(steps)} "
          f"step_s={sum(steps) / len(steps):.4f} min_step_s={min(steps):.4f} "
          f"fwd_s={sum(fwd) / len(fwd):.4f} step_cpu_s={sum(cpu) / len(cpu):.4f} "
          f"base_rss_mb={base:.1f} "
          f"peak_rss_mb={peak_rss_mb():.1f} threads=1", flush=True)


def read_h5ad_rows(path: str, n_cells: int):
    """First n_cells rows of X of an .h5ad as a dense float64 array (CSR or dense X)."""
    import h5py
    import numpy as np
    with h5py.File(path, "r") as f:
        x = f["X"]
        if isinstance(x, h5py.Dataset):
            return np.asarray(x[:n_cells], dtype=np.float64)
        enc = x.attrs.get("encoding-type", "")
        enc = enc.decode() if isinstance(enc, bytes) else enc
        if enc != "csr_matrix":
            raise SystemExit(f"{path}: X is {enc!r}; this benchmark reads csr_matrix or dense X")
        n_rows, n_cols = (int(v) for v in x.attrs["shape"])
        n_cells = min(n_cells, n_rows)
        indptr = x["indptr"][:n_cells + 1]
        data = x["data"][indptr[0]:indptr[-1]]
        indices = x["indices"][indptr[0]:indptr[-1]]
        dense = np.zeros((n_cells, n_cols), dtype=np.float64)
        for c in range(n_cells):
            s, e = indptr[c] - indptr[0], indptr[c + 1] - indptr[0]
            dense[c, indices[s:e]] = data[s:e]
        return dense


def child_nonzero(args) -> None:
    torch, pt = _setup_torch()
    counts = read_h5ad_rows(args.nonzero_h5ad, args.nonzero_cells)
    n_cells, n_genes = counts.shape
    model = pt.PerformerModel(_config(args, pt, n_genes))
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    batches = []
    for s in range(0, n_cells, args.micro_batch):
        tokens, genes, offsets = pt.pack_cells(counts[s:s + args.micro_batch], "nonzero",
                                               args.bins)
        masked, target = pt.apply_mlm_masking(tokens, offsets, args.bins, gen)
        batches.append((masked, genes, offsets, target))

    def step(b):
        masked, genes, offsets, target = b
        model.zero_grad(set_to_none=True)
        pt.mlm_loss(model(masked, genes, offsets), target).backward()

    for b in batches[:2]:  # warm-up: first allocations, lazy initialisation
        step(b)
    c0 = time.process_time()
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    n_tokens = sum(int(b[0].numel()) for b in batches)
    print(f"torch mode=nonzero genes={n_genes} cells={n_cells} micro_batch={args.micro_batch} "
          f"mean_tokens={n_tokens / n_cells:.1f} cells_per_s={n_cells / elapsed:.3f} "
          f"step_s={elapsed / len(batches):.4f} step_cpu_s={cpu / len(batches):.4f} "
          f"peak_rss_mb={peak_rss_mb():.1f} threads=1",
          flush=True)


def child_lucidrains(args) -> None:
    """Time performer-pytorch's PerformerLM on the same full-mode cell.

    Differences that remain: its own position embedding (learned absolute,
    or gene2vec in scBERT's copy, which is switched off here as it needs
    scBERT's data file) and its feature-redraw bookkeeping.
    """
    torch, pt = _setup_torch()
    import torch.nn.functional as F
    sys.path.insert(0, os.path.abspath(args.performer_pytorch))
    try:
        from performer_pytorch import PerformerLM
    except Exception as exc:  # missing checkout or missing einops and friends
        print(f"performer_pytorch skipped: cannot import from {args.performer_pytorch}: "
              f"{type(exc).__name__}: {exc}", flush=True)
        return
    n_genes = args.genes[0]
    wanted = dict(num_tokens=args.bins + 2, max_seq_len=n_genes + 1, dim=args.dim,
                  depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                  nb_features=args.features, ff_mult=args.ff // args.dim,
                  g2v_position_emb=False, qkv_bias=False)
    accepted = inspect.signature(PerformerLM.__init__).parameters
    model = PerformerLM(**{k: v for k, v in wanted.items() if k in accepted})
    model.train()
    tokens, _, _, target = _full_mode_cell(args, torch, pt, n_genes)
    chosen = target >= 0
    x = tokens.unsqueeze(0)
    base = peak_rss_mb()
    steps, cpu = [], []
    for i in range(args.warmup + args.steps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        logits = model(x)[0]
        loss = F.cross_entropy(logits[chosen], target[chosen], reduction="sum") / int(chosen.sum())
        loss.backward()
        dt = time.perf_counter() - t0
        log(f"  performer_pytorch G={n_genes} step {i + 1}: {dt:.3f}s")
        if i >= args.warmup:
            steps.append(dt)
            cpu.append(time.process_time() - c0)
    print(f"performer_pytorch mode=full genes={n_genes} tokens={tokens.numel()} "
          f"steps={len(steps)} step_s={sum(steps) / len(steps):.4f} "
          f"min_step_s={min(steps):.4f} step_cpu_s={sum(cpu) / len(cpu):.4f} "
          f"base_rss_mb={base:.1f} "
          f"peak_rss_mb={peak_rss_mb():.1f} threads=1", flush=True)


# ---------------------------------------------------------------------------
# Parent: one subprocess per measurement
# ---------------------------------------------------------------------------

def spawn(kind: str, args: argparse.Namespace, extra) -> int:
    common = ["--dim", args.dim, "--depth", args.depth, "--heads", args.heads,
              "--dim-head", args.dim_head, "--features", args.features, "--ff", args.ff,
              "--bins", args.bins, "--warmup", args.warmup, "--steps", args.steps,
              "--seed", args.seed]
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind] + \
        [str(a) for a in common + list(extra)]
    env = dict(os.environ, **THREAD_ENV)
    env["PYTHONPATH"] = os.path.join(ROOT, "tools")
    try:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"torch mode={kind} {' '.join(map(str, extra))} timeout_s={args.timeout}",
              flush=True)
        return 1
    sys.stdout.write(done.stdout)
    sys.stdout.flush()
    if done.returncode != 0:
        log(f"measurement {kind} {extra} failed with exit code {done.returncode}")
    return done.returncode


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "full":
        child_full(args)
        return 0
    if args.child == "nonzero":
        child_nonzero(args)
        return 0
    if args.child == "lucidrains":
        child_lucidrains(args)
        return 0
    status = 0
    if not args.no_full:
        for g in args.genes:
            kind = "lucidrains" if args.performer_pytorch else "full"
            extra = ["--genes", g]
            if args.performer_pytorch:
                extra += ["--performer-pytorch", args.performer_pytorch]
            log(f"timing {kind} G={g} ({args.warmup} warm-up + {args.steps} steps)")
            status |= spawn(kind, args, extra)
    if args.nonzero_h5ad:
        log(f"timing nonzero mode on {args.nonzero_h5ad} ({args.nonzero_cells} cells)")
        status |= spawn("nonzero", args, ["--nonzero-h5ad", args.nonzero_h5ad,
                                          "--nonzero-cells", args.nonzero_cells,
                                          "--micro-batch", args.micro_batch])
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
