#!/usr/bin/env python3
"""Integration tests of `perfcell pretrain` under mpirun on real pbmc3k shards.

    pretrain_mpi.py ranks      N ranks with micro-batch b equal 1 rank with accumulation N
    pretrain_mpi.py resume     SIGUSR1 at step k, then --resume: bitwise equal on the same
                               rank count, within 1e-5 on another
    pretrain_mpi.py kill       kill -9 of one rank: mpirun exits non-zero without hanging,
                               no process is left, and the resumed run ends where an
                               uninterrupted run ends
    pretrain_mpi.py metrics    the metrics file, its plot, and the resolved config

Environment (from tests/run.sh): BIN, DATA, TEST_TMP, MPIRUN. Exit code 0 = pass.
"""
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

BIN = os.environ.get("BIN", "bin")
DATA = os.environ.get("DATA", "../shared/data")
TMP = os.environ.get("TEST_TMP", "/tmp/perfcell-test")
MPIRUN = os.environ.get("MPIRUN", "mpirun --oversubscribe --bind-to none").split()
PERFCELL = os.path.abspath(os.path.join(BIN, "perfcell"))
TINY = ["--config", "configs/tiny.ini"]
failures = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg, flush=True)
    if not cond:
        failures.append(msg)


def run(cmd, timeout=300, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def shards():
    """pbmc3k shards in several files, built once per test."""
    out = os.path.join(TMP, "shards")
    if os.path.exists(os.path.join(out, "manifest.tsv")):
        return out
    vocab = os.path.join(TMP, "vocab.tsv")
    src = os.path.join(DATA, "pbmc3k", "pbmc3k_counts.h5ad")
    r = run([os.path.join(BIN, "perfcell-shard"), "vocab", src, "--out", vocab])
    assert r.returncode == 0, r.stderr
    r = run([os.path.join(BIN, "perfcell-shard"), "build", src, "--vocab", vocab, "--out", out,
             "--shard-cells", "1000", "--label-key", "celltype"])
    assert r.returncode == 0, r.stderr
    return out


def pretrain(np_, run_dir, extra=(), resume=False, timeout=300):
    cmd = MPIRUN + ["-np", str(np_), PERFCELL, "pretrain"] + TINY + [
        f"data.shards={shards()}", f"run.dir={run_dir}"] + list(extra)
    if resume:
        cmd += ["--resume", "auto"]
    return run(cmd, timeout=timeout)


def params(path):
    with h5py.File(path, "r") as f:
        return {k: f["model"][k][()].astype(np.float64) for k in f["model"]}


def rel_l2(a, b):
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a)
    den = sum((b[k] ** 2).sum() for k in b)
    return float(np.sqrt(num / den))


def bitwise(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def final_ckpt(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"ckpt-{step:08d}.h5")


def test_ranks():
    steps = 5
    ref = None
    for n in (1, 2, 3):
        d = os.path.join(TMP, f"ranks{n}")
        r = pretrain(n, d, [f"run.max_steps={steps}"])
        check(r.returncode == 0, f"{n} rank(s): exit 0 ({r.stderr.strip()[-300:]})")
        if r.returncode != 0:
            continue
        p = params(final_ckpt(d, steps))
        if ref is None:
            ref = p
            continue
        # Ranks change only the order of floating-point sums (accumulation over
        # micro-batches, the all-reduce): differences are rounding, ~1e-7.
        e = rel_l2(p, ref)
        check(e < 1e-5, f"{n} ranks vs 1 rank after {steps} steps: relative L2 {e:.2e} < 1e-5")


def usr1_at_step(np_, run_dir, extra, k):
    """Start a run, send SIGUSR1 to mpirun once step k is logged; return the stop step."""
    cmd = MPIRUN + ["-np", str(np_), PERFCELL, "pretrain"] + TINY + [
        f"data.shards={shards()}", f"run.dir={run_dir}"] + list(extra)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sent = False
    stop_step = None
    out = []
    for line in p.stdout:
        out.append(line)
        if not sent and line.startswith(f"step {k}/"):
            p.send_signal(signal.SIGUSR1)
            sent = True
        if "checkpointing at step" in line:
            stop_step = int(line.split("checkpointing at step")[1].split()[0])
    rc = p.wait(timeout=300)
    return rc, stop_step, "".join(out)


def test_resume():
    steps = 24
    extra = [f"run.max_steps={steps}", "checkpoint.every_steps=100", "model.dim=32",
             "model.feature_redraw_interval=5", "run.log_every=1", "run.val_every=0"]
    base = os.path.join(TMP, "uninterrupted")
    r = pretrain(2, base, extra)
    check(r.returncode == 0, "uninterrupted run: exit 0")
    ref = params(final_ckpt(base, steps))
    for n_resume in (2, 3, 1):
        d = os.path.join(TMP, f"stopped-{n_resume}")
        rc, k, log = usr1_at_step(2, d, extra, 6)
        check(rc == 0 and k is not None and k < steps,
              f"SIGUSR1: checkpoint at step {k} and exit 0 (rc {rc})")
        if k is None:
            print(log[-2000:])
            continue
        r = pretrain(n_resume, d, extra, resume=True)
        check(r.returncode == 0 and f"at step {k}" in r.stdout,
              f"resumed on {n_resume} rank(s) from step {k}")
        p = params(final_ckpt(d, steps))
        if n_resume == 2:
            check(bitwise(p, ref), "stopped and resumed on the same ranks: bitwise equal to uninterrupted")
        else:
            e = rel_l2(p, ref)
            check(e < 1e-5, f"resumed on {n_resume} rank(s): relative L2 {e:.2e} < 1e-5")


def perfcell_pids(run_dir):
    r = run(["pgrep", "-f", f"run.dir={run_dir}"])
    pids = [int(x) for x in r.stdout.split()]
    # pgrep -f also matches mpirun itself: keep the ranks (their parent is mpirun).
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode()
        except OSError:
            continue
        if argv0.endswith("/perfcell"):
            out.append(pid)
    return out


def test_kill():
    steps = 30
    extra = [f"run.max_steps={steps}", "checkpoint.every_steps=4", "checkpoint.keep=2",
             "model.dim=32", "run.log_every=1", "run.val_every=0"]
    base = os.path.join(TMP, "kill-ref")
    r = pretrain(2, base, extra)
    check(r.returncode == 0, "reference run: exit 0")
    ref = params(final_ckpt(base, steps))
    rng = random.Random(int(os.environ.get("KILL_SEED", "7")))
    trials = int(os.environ.get("KILL_TRIALS", "3"))
    for trial in range(trials):
        d = os.path.join(TMP, f"kill-{trial}")
        k = rng.randrange(3, steps - 4)
        cmd = MPIRUN + ["-np", "2", PERFCELL, "pretrain"] + TINY + [
            f"data.shards={shards()}", f"run.dir={d}"] + extra
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed = None
        for line in p.stdout:
            if killed is None and line.startswith(f"step {k}/"):
                ranks = perfcell_pids(d)
                if ranks:
                    killed = rng.choice(ranks)
                    os.kill(killed, signal.SIGKILL)
        t0 = time.time()
        try:
            rc = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = None
        check(killed is not None, f"trial {trial}: killed a rank at step {k}")
        check(rc not in (0, None), f"trial {trial}: mpirun exits non-zero (rc {rc}) in {time.time() - t0:.1f}s")
        time.sleep(0.5)
        left = perfcell_pids(d)
        check(not left, f"trial {trial}: no perfcell process left behind ({left})")
        r = pretrain(2, d, extra, resume=True)
        check(r.returncode == 0, f"trial {trial}: resumed run finishes ({r.stderr.strip()[-300:]})")
        if r.returncode == 0:
            check(bitwise(params(final_ckpt(d, steps)), ref),
                  f"trial {trial}: resumed after kill -9 at step {k}: bitwise equal to uninterrupted")


def test_metrics():
    d = os.path.join(TMP, "metrics")
    r = pretrain(2, d, ["run.max_steps=6", "run.val_every=3"])
    check(r.returncode == 0, "run: exit 0")
    import json
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    train = [x for x in rows if "loss" in x]
    val = [x for x in rows if "val_loss" in x]
    check([x["step"] for x in train] == [1, 2, 3, 4, 5, 6], "a training line per step (log_every 1)")
    check([x["step"] for x in val] == [0, 3, 6], f"validation at steps 0, 3 and 6 ({[x['step'] for x in val]})")
    keys = {"loss", "acc", "lr", "grad_norm", "cells_per_s", "tokens_per_s"}
    check(all(keys <= x.keys() for x in train), "training lines carry loss, acc, lr, grad_norm, cells/s, tokens/s")
    check(os.path.exists(os.path.join(d, "config.ini")), "resolved config saved in the run folder")
    png = os.path.join(d, "metrics.png")
    r = run([sys.executable, "tools/plot_metrics.py", os.path.join(d, "metrics.jsonl"), "-o", png])
    check(r.returncode == 0 and os.path.getsize(png) > 10000, "plot_metrics.py writes a PNG")
    # Fresh start into a run folder with checkpoints is refused.
    r = pretrain(1, d, ["run.max_steps=6"])
    check(r.returncode != 0 and "--resume auto" in r.stderr, "fresh start over existing checkpoints refused")
    # Resume after the end: nothing to do, exits 0 and keeps the metrics.
    r = pretrain(1, d, ["run.max_steps=6"], resume=True)
    check(r.returncode == 0, "resume of a finished run exits 0")


def test_contrastive():
    """MLM + contrastive pretraining end to end, and its resume."""
    d = os.path.join(TMP, "contrastive")
    extra = ["run.max_steps=4", "run.val_every=2", "contrastive.weight=0.5", "contrastive.sub_batch=3",
             "contrastive.proj_dim=8", "contrastive.proj_hidden=16", "checkpoint.every_steps=2"]
    r = pretrain(2, d, extra)
    check(r.returncode == 0, f"contrastive pretraining on 2 ranks: exit 0 ({r.stderr.strip()[-300:]})")
    import json
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    check(any("contrastive_loss" in x for x in rows), "training lines carry the contrastive loss")
    val = [x for x in rows if "val_alignment" in x]
    check(len(val) >= 2 and all(k in val[0] for k in ("val_contrastive_loss", "val_pos_sim", "val_neg_sim",
                                                       "val_uniformity")),
          "validation logs contrastive loss, positive/negative similarity, alignment and uniformity")
    ref = params(final_ckpt(d, 4))
    d2 = os.path.join(TMP, "contrastive-resumed")
    r = pretrain(2, d2, extra[:1] + ["run.max_steps=2"] + extra[2:])
    r = pretrain(2, d2, extra, resume=True)
    check(r.returncode == 0 and bitwise(params(final_ckpt(d2, 4)), ref),
          "contrastive run resumed at step 2 is bitwise equal to the uninterrupted one")


def main():
    os.makedirs(TMP, exist_ok=True)
    tests = {"ranks": test_ranks, "resume": test_resume, "kill": test_kill, "metrics": test_metrics,
             "contrastive": test_contrastive}
    if len(sys.argv) != 2 or sys.argv[1] not in tests:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(tests)}")
    tests[sys.argv[1]]()
    print(f"{len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
