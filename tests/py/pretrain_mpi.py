#!/usr/bin/env python3
"""Integration tests of `perfcell pretrain` under mpirun on real pbmc3k shards.

    pretrain_mpi.py ranks      N ranks with micro-batch b equal 1 rank with accumulation N
    pretrain_mpi.py resume     SIGUSR1 at step k, then --resume: bitwise equal on the same
                               rank count, within 1e-5 on another
    pretrain_mpi.py kill       kill -9 of one rank: mpirun exits non-zero without hanging,
                               no process is left, and the resumed run ends where an
                               uninterrupted run ends
    pretrain_mpi.py metrics    the metrics file, its plot, and the resolved config
    pretrain_mpi.py nan        NaN/Inf in the loss or a gradient: named (step, rank, tensor);
                               run.nan_policy = stop exits non-zero with the last checkpoint
                               intact, skip warns, skips the step and finishes
    pretrain_mpi.py fulldisk   a checkpoint write that fails (file size limit; a small tmpfs
                               where mounts are allowed): a clear error, the previous
                               checkpoint intact, and the resumed run ends where an
                               uninterrupted run ends
    pretrain_mpi.py finetune   fine-tuning a frozen encoder from its hidden states computed
                               once equals computing them every epoch (1e-5), 2 ranks equal
                               1 rank, and SIGUSR1 then --resume is bitwise the
                               uninterrupted run
    pretrain_mpi.py finetune_lbfgs
                               the readout trained by L-BFGS: encoder and slot projection
                               unchanged, 2 ranks equal 1 rank (objective 1e-3), the logged objective
                               equals the head's training loss plus lambda/2 |W|^2, and
                               SIGUSR1 then --resume is bitwise the uninterrupted run

Environment (from tests/run.sh): BIN, DATA, TEST_TMP, MPIRUN; PERFCELL_MPI_TRANSPORT=tcp
runs every rank's messages over TCP. Exit code 0 = pass.
"""
import json
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
# PERFCELL_MPI_TRANSPORT=tcp: every message between ranks over TCP (loopback),
# as between hosts: the ob1 PML with the self and tcp BTLs only, and none of
# the components that work through shared memory (coll sm and han, osc sm,
# sharedfp sm; see ompi_info).
TRANSPORTS = {
    "shm": [],
    "tcp": ["--mca", "pml", "ob1", "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo",
            "--mca", "coll", "^sm,han", "--mca", "osc", "^sm", "--mca", "sharedfp", "^sm"],
}
MPIRUN += TRANSPORTS[os.environ.get("PERFCELL_MPI_TRANSPORT", "shm")]
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


def run_signalled(cmd, prefix, send=lambda p: p.send_signal(signal.SIGUSR1)):
    """Run cmd and call send(process) once, at the first log line starting with
    prefix (by default SIGUSR1 to mpirun, which forwards it). Returns (exit
    code, the log)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sent, out = False, []
    for line in p.stdout:
        out.append(line)
        if not sent and line.startswith(prefix):
            send(p)
            sent = True
    return p.wait(timeout=300), "".join(out)


def stop_step_of(log):
    """The step of the stop checkpoint a log announces, or None."""
    steps = [int(ln.split("checkpointing at step")[1].split()[0]) for ln in log.splitlines()
             if "checkpointing at step" in ln]
    return steps[-1] if steps else None


def stop_at_step(np_, run_dir, extra, k, how):
    """Start a run and stop it once step k is logged: how="usr1" sends SIGUSR1 to
    mpirun (which forwards it), how="term" sends SIGTERM to every rank itself,
    as a batch system does at pre-emption. Returns (exit code, the step of the
    stop checkpoint, the log)."""
    cmd = MPIRUN + ["-np", str(np_), PERFCELL, "pretrain"] + TINY + [
        f"data.shards={shards()}", f"run.dir={run_dir}"] + list(extra)

    def term_ranks(_):
        for pid in perfcell_pids(run_dir):
            os.kill(pid, signal.SIGTERM)

    rc, log = run_signalled(cmd, f"step {k}/", *([] if how == "usr1" else [term_ranks]))
    return rc, stop_step_of(log), log


def test_resume():
    steps = 24
    extra = [f"run.max_steps={steps}", "checkpoint.every_steps=100", "model.dim=32",
             "model.feature_redraw_interval=5", "run.log_every=1", "run.val_every=0"]
    base = os.path.join(TMP, "uninterrupted")
    r = pretrain(2, base, extra)
    check(r.returncode == 0, "uninterrupted run: exit 0")
    ref = params(final_ckpt(base, steps))
    for how, n_resume in (("usr1", 2), ("term", 2), ("usr1", 3), ("term", 1)):
        sig = "SIGUSR1 to mpirun" if how == "usr1" else "SIGTERM to every rank"
        d = os.path.join(TMP, f"stopped-{how}-{n_resume}")
        rc, k, log = stop_at_step(2, d, extra, 6, how)
        check(rc == 0 and k is not None and k < steps,
              f"{sig}: checkpoint at step {k} and exit 0 (rc {rc})")
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
    trials = int(os.environ.get("KILL_TRIALS", "10"))
    for trial in range(trials):
        d = os.path.join(TMP, f"kill-{trial}")
        k = rng.randrange(3, steps - 4)
        cmd = MPIRUN + ["-np", "2", PERFCELL, "pretrain"] + TINY + [
            f"data.shards={shards()}", f"run.dir={d}"] + extra
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed = None
        log = []
        for line in p.stdout:
            log.append(line)
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
        said = [ln.strip() for ln in log if "exited on signal 9" in ln]
        check(said, f"trial {trial}: the message names the rank killed by signal 9 ({' '.join(said)[:200]})")
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
    # Pass 2 reads the step's cells again from the shards: the z it re-encodes
    # must be pass 1's bitwise (a warning says otherwise), and the same global
    # batch on 1 and 3 ranks (sub-batches spanning micro-batches, blocks of 5
    # cells for micro-batches of 2, 3 and 4) takes the same steps.
    check("re-encoded" not in r.stdout + r.stderr, "pass 2 re-encodes pass 1's z bitwise")
    for mb, np_ in ((2, 3), (3, 1), (4, 3)):
        runs = {}
        for n in (1, np_) if np_ != 1 else (1, 2):
            if 12 % (mb * n) != 0:
                continue
            dd = os.path.join(TMP, f"contrastive-b{mb}-np{n}")
            r = pretrain(n, dd, ["run.max_steps=3", "run.val_every=0", "contrastive.weight=0.5",
                                 "contrastive.sub_batch=5", "contrastive.proj_dim=8", "contrastive.proj_hidden=16",
                                 "checkpoint.every_steps=3", "batch.global_batch=12", f"batch.micro_batch={mb}",
                                 "data.block_cells=5"])
            check(r.returncode == 0 and "re-encoded" not in r.stdout + r.stderr,
                  f"micro-batch {mb} on {n} rank(s): exit 0, no z mismatch ({r.stderr.strip()[-300:]})")
            if r.returncode == 0:
                runs[n] = params(final_ckpt(dd, 3))
        if len(runs) == 2:
            e = rel_l2(runs[max(runs)], runs[1])
            check(e < 1e-5, f"micro-batch {mb}: {max(runs)} ranks equal 1 rank (relative L2 {e:.2e})")


def inspect_ok(path):
    r = run([os.path.join(BIN, "perfcell-inspect"), path, "--verify"])
    return r.returncode == 0


def ckpt_files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


NAN_TENSOR = "performer.net.layers.1.0.fn.to_v.weight"


def test_nan():
    extra = ["run.max_steps=6", "run.log_every=1", "run.val_every=0", "checkpoint.every_steps=2"]
    env = dict(os.environ, PERFCELL_INJECT_NAN=f"4:1:{NAN_TENSOR}")
    mpi_env = MPIRUN + ["-x", "PERFCELL_INJECT_NAN"]

    def launch(run_dir, more, fault=True):
        cmd = (mpi_env if fault else MPIRUN) + ["-np", "2", PERFCELL, "pretrain"] + TINY + [
            f"data.shards={shards()}", f"run.dir={run_dir}"] + extra + more
        return run(cmd, env=env if fault else None)

    # stop: the step, the rank and the tensor are named; exit non-zero; the
    # checkpoint of step 2 is intact and the run resumes from it.
    d = os.path.join(TMP, "nan-stop")
    r = launch(d, ["run.nan_policy=stop"])
    out = r.stdout + r.stderr
    want = f"step 4: NaN or Inf in {NAN_TENSOR} (gradient) on rank 1"
    check(r.returncode != 0, f"nan_policy=stop: mpirun exits non-zero (rc {r.returncode})")
    check(want in out, f"message names step, tensor and rank: {want!r}")
    check("run.nan_policy = skip" in out, "the message says how to go on")
    time.sleep(0.5)
    check(not perfcell_pids(d), "no perfcell process left behind")
    ck = os.path.join(d, "checkpoints")
    check(ckpt_files(ck) == ["ckpt-00000002.h5", "latest"], f"checkpoint of step 2 kept, none after ({ckpt_files(ck)})")
    check(inspect_ok(os.path.join(ck, "ckpt-00000002.h5")), "checkpoint of step 2 verifies")
    r = launch(d, ["--resume", "auto"], fault=False)
    check(r.returncode == 0 and "at step 2" in r.stdout, "resumes from step 2 without the fault and finishes")

    # skip: a warning with the same names, the step is skipped (no update), the
    # run finishes with finite parameters and valid JSON metrics.
    d = os.path.join(TMP, "nan-skip")
    r = launch(d, ["run.nan_policy=skip"])
    out = r.stdout + r.stderr
    check(r.returncode == 0, f"nan_policy=skip: the run finishes (rc {r.returncode}: {r.stderr.strip()[-300:]})")
    check(want in out and "step skipped" in out, "warning names step, tensor and rank and says the step was skipped")
    import json
    try:
        rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    except (OSError, ValueError) as e:
        rows = []
        check(False, f"metrics.jsonl is JSON lines ({e})")
    skipped = [x["step"] for x in rows if x.get("skipped_steps")]
    check(skipped == [4] and all(x["grad_norm"] is None for x in rows if x.get("skipped_steps")),
          f"metrics mark the skipped step with a null gradient norm ({skipped})")
    final = final_ckpt(d, 6)
    if os.path.exists(final):
        p = params(final)
        check(all(np.isfinite(v).all() for v in p.values()), "parameters finite after the skipped step")
    else:
        check(False, "final checkpoint written")

    # A real non-finite loss (Adam with eps 0 divides 0 by 0 on gradients that
    # are exactly zero): the loss is named.
    d = os.path.join(TMP, "nan-eps0")
    r = launch(d, ["optim.eps=0"], fault=False)
    out = r.stdout + r.stderr
    check(r.returncode != 0 and "NaN or Inf in the loss on ranks 0,1" in out,
          "optim.eps=0: non-finite loss detected on both ranks, run stops")

    # A malformed fault specification is refused, not ignored.
    d = os.path.join(TMP, "nan-badspec")
    env["PERFCELL_INJECT_NAN"] = "4:1:no.such.tensor"
    r = launch(d, [])
    check(r.returncode != 0 and "no tensor named 'no.such.tensor'" in r.stderr,
          "unknown tensor in PERFCELL_INJECT_NAN is an error")


def test_fulldisk():
    steps = 4
    extra = [f"run.max_steps={steps}", "run.log_every=1", "run.val_every=0", "checkpoint.every_steps=2",
             "checkpoint.keep=2"]
    base = os.path.join(TMP, "disk-ref")
    r = pretrain(2, base, extra)
    check(r.returncode == 0, "uninterrupted reference run: exit 0")
    ref = params(final_ckpt(base, steps))
    cmd = " ".join(MPIRUN + ["-np", "2", PERFCELL, "pretrain"] + TINY + [f"data.shards={shards()}"] + extra)

    # A file size limit below the checkpoint size, set on the ranks once they
    # run (MPI start-up itself needs larger shared-memory files): the
    # checkpoint of step 2 cannot be written.
    d = os.path.join(TMP, "disk-ulimit")
    p = subprocess.Popen(MPIRUN + ["-np", "2", PERFCELL, "pretrain"] + TINY + [
        f"data.shards={shards()}", f"run.dir={d}"] + extra, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines = []
    limited = 0
    for line in p.stdout:
        lines.append(line)
        if not limited and line.startswith("validation at step 0"):
            import resource
            for pid in perfcell_pids(d):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
                limited += 1
    rc = p.wait(timeout=120)
    out = "".join(lines)
    check(limited == 2, f"file size limit set on both ranks ({limited})")
    check(rc != 0, f"file size limit: exits non-zero (rc {rc})")
    check("ckpt-00000002" in out and "File too large" in out,
          "error names the checkpoint file and the cause (" +
          " ".join(l.strip() for l in lines if "cannot write checkpoint" in l)[:300] + ")")
    ck = os.path.join(d, "checkpoints")
    check(ckpt_files(ck) == [], f"no partial checkpoint left ({ckpt_files(ck)})")

    # A disk that fills up after the first checkpoint: a tmpfs of 4 MiB holds
    # one tiny checkpoint (2.7 MiB) but not a second beside it.
    probe = run(["unshare", "-m", "true"])
    if probe.returncode != 0:
        print(f"note: cannot create a mount namespace here ({probe.stderr.strip()}); tmpfs case not run")
        return
    d = os.path.join(TMP, "disk-tmpfs")
    mnt = os.path.join(TMP, "disk-tmpfs-mnt")
    saved = os.path.join(d, "saved-checkpoints")
    os.makedirs(mnt, exist_ok=True)
    os.makedirs(saved, exist_ok=True)
    script = (f"mount -t tmpfs -o size=4m tmpfs {mnt} || exit 99; {cmd} run.dir={d} checkpoint.dir={mnt}; "
              f"rc=$?; cp -a {mnt}/. {saved}/; exit $rc")
    r = run(["unshare", "-m", "bash", "-c", script])
    if r.returncode == 99:
        print(f"note: cannot mount a tmpfs here ({r.stderr.strip()}); tmpfs case not run")
        return
    out = r.stdout + r.stderr
    check(r.returncode != 0, f"full tmpfs: exits non-zero (rc {r.returncode})")
    check("ckpt-00000004" in out and "No space left on device" in out,
          f"error names the checkpoint file and the cause ({r.stderr.strip()[:300]})")
    check(ckpt_files(saved) == ["ckpt-00000002.h5", "latest"],
          f"only the previous checkpoint and its pointer remain ({ckpt_files(saved)})")
    check(inspect_ok(os.path.join(saved, "ckpt-00000002.h5")), "previous checkpoint verifies")
    # Resume from the saved checkpoint on a disk with room: same end as the
    # uninterrupted run.
    r = run(MPIRUN + ["-np", "2", PERFCELL, "pretrain"] + TINY + [
        f"data.shards={shards()}", f"run.dir={d}", f"checkpoint.dir={saved}", "--resume", "auto"] + extra)
    check(r.returncode == 0 and "at step 2" in r.stdout, "resumes from the previous checkpoint")
    if r.returncode == 0:
        check(bitwise(params(os.path.join(saved, f"ckpt-{steps:08d}.h5")), ref),
              "resumed after the full disk: bitwise equal to uninterrupted")


def finetune_setup():
    """A 2-step pretraining and a split file of 340 labelled cells (240 train,
    60 validation, 40 test); None when the pretraining fails."""
    pre = os.path.join(TMP, "ft-pre")
    r = pretrain(1, pre, ["run.max_steps=2", "data.max_tokens=0", "run.val_every=0"])
    check(r.returncode == 0, f"pretraining for the fine-tuning tests: exit 0 ({r.stderr.strip()[-300:]})")
    if r.returncode != 0:
        return None
    with h5py.File(os.path.join(DATA, "pbmc3k", "pbmc3k_counts.h5ad"), "r") as f:
        names = [x.decode() for x in f["obs"]["barcode"][:340]]
    split = os.path.join(TMP, "split.tsv")
    with open(split, "w", encoding="utf-8") as f:
        for i, n in enumerate(names):
            f.write(f"{n}\t{'train' if i < 240 else 'val' if i < 300 else 'test'}\n")
    return pre, split


def test_finetune():
    setup = finetune_setup()
    if setup is None:
        return
    pre, split = setup
    epochs, per_epoch = 3, 10
    extra = ["--init", final_ckpt(pre, 2), f"finetune.split_file={split}", "finetune.freeze=all",
             "finetune.head=linear", f"finetune.epochs={epochs}", "finetune.patience=0", "data.max_tokens=0",
             "model.feature_redraw_interval=0", "batch.micro_batch=4", "batch.global_batch=24",
             "checkpoint.every_steps=0", "run.log_every=1", "optim.lr=3e-3"]

    def finetune_cmd(np_, run_dir, more=()):
        return MPIRUN + ["-np", str(np_), PERFCELL, "finetune"] + TINY + [
            f"data.shards={shards()}", f"run.dir={run_dir}"] + extra + list(more)

    last = epochs * per_epoch
    runs = {}
    for name, np_, more in (("cached1", 1, []), ("uncached1", 1, ["finetune.cache_mib=0"]),
                            ("cached2", 2, []), ("dropout1", 1, ["model.dropout_ff=0.1"])):
        d = os.path.join(TMP, f"ft-{name}")
        r = run(finetune_cmd(np_, d, more))
        cached = "computed once" in r.stdout
        check(r.returncode == 0 and cached == (name.startswith("cached")),
              f"fine-tuning {name}: exit 0, hidden states {'cached' if cached else 'computed every epoch'} "
              f"({r.stderr.strip()[-300:]})")
        if name == "dropout1":
            check("runs every epoch: the model has dropout" in r.stdout, "dropout: the log says why nothing is cached")
        if r.returncode == 0:
            runs[name] = params(final_ckpt(d, last))
            runs[name + "@1"] = params(final_ckpt(d, per_epoch))
    if len(runs) < 8:
        return
    # The cache encodes cells in other micro-batches than training does, so
    # the states agree to float rounding only (~1e-7), as N ranks and 1 do;
    # the head (the trainable tensors) is compared after the first epoch,
    # and the encoder must not move.
    head = {k: v for k, v in runs["cached1"].items() if k.startswith("cls.")}
    check(len(head) == 4, f"the linear head's tensors: {sorted(head)}")
    pre_p = params(final_ckpt(pre, 2))
    check(all(np.array_equal(v, pre_p[k]) for k, v in runs["cached1"].items() if k in pre_p),
          "the frozen encoder's tensors are the pretrained ones, bitwise")
    for a, b in (("uncached1", "cached1"), ("cached2", "cached1")):
        e = rel_l2({k: runs[a + "@1"][k] for k in head}, {k: runs[b + "@1"][k] for k in head})
        check(e < 1e-5, f"fine-tuning {a} vs {b} after {per_epoch} steps: head relative L2 {e:.2e} < 1e-5")

    d = os.path.join(TMP, "ft-stopped")
    rc, log = run_signalled(finetune_cmd(2, d), "step 14 (")
    stop_step = stop_step_of(log)
    check(rc == 0 and stop_step is not None and stop_step < last,
          f"fine-tuning, SIGUSR1 to mpirun: checkpoint at step {stop_step} and exit 0 (rc {rc})")
    if stop_step is None:
        print(log[-2000:])
        return
    r = run(finetune_cmd(2, d, ["--resume", "auto"]))
    check(r.returncode == 0 and "computed once" in r.stdout, f"fine-tuning resumed from step {stop_step}")
    if r.returncode == 0:
        check(bitwise(params(final_ckpt(d, last)), runs["cached2"]),
              "fine-tuning stopped and resumed on the same ranks: bitwise equal to uninterrupted")


def latest_ckpt(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(d) if n.startswith("ckpt-") and n.endswith(".h5"))
    return os.path.join(d, names[-1])


def test_finetune_lbfgs():
    setup = finetune_setup()
    if setup is None:
        return
    pre, split = setup
    lam = 1e-2
    extra = ["--init", final_ckpt(pre, 2), f"finetune.split_file={split}", "finetune.freeze=all",
             "finetune.head=linear", "finetune.solver=lbfgs", "finetune.lbfgs_iters=40", "finetune.epochs=3",
             "finetune.patience=0", "finetune.class_weights=false", f"optim.weight_decay={lam}",
             "data.max_tokens=0", "model.feature_redraw_interval=0", "batch.micro_batch=4",
             "batch.global_batch=24", "checkpoint.every_steps=0"]

    def cmd(np_, run_dir, more=()):
        return MPIRUN + ["-np", str(np_), PERFCELL, "finetune"] + TINY + [
            f"data.shards={shards()}", f"run.dir={run_dir}"] + extra + list(more)

    runs, logs = {}, {}
    for np_ in (1, 2):
        d = os.path.join(TMP, f"lbfgs{np_}")
        r = run(cmd(np_, d))
        check(r.returncode == 0 and "L-BFGS" in r.stdout,
              f"fine-tuning by L-BFGS on {np_} rank(s): exit 0 ({r.stderr.strip()[-300:]})")
        if r.returncode != 0:
            return
        runs[np_], logs[np_] = params(latest_ckpt(d)), r.stdout
    pre_p = params(final_ckpt(pre, 2))
    check(all(np.array_equal(v, pre_p[k]) for k, v in runs[1].items() if k in pre_p),
          "L-BFGS: the frozen encoder's tensors are the pretrained ones, bitwise")
    d1 = os.path.join(TMP, "lbfgs1", "checkpoints")
    kept = sorted(n for n in os.listdir(d1) if n.startswith("ckpt-"))
    first = params(os.path.join(d1, kept[0]))
    slot = ("cls.slot.weight", "cls.slot.bias")
    check(len(kept) >= 2 and all(np.array_equal(first[k], runs[1][k]) for k in slot),
          f"L-BFGS: the slot projection does not move between epochs ({kept[0]} and {kept[-1]})")
    # On 2 ranks the cache encodes other micro-batches (hidden states equal to
    # float rounding), so the readout start and every step differ by rounding.
    e = rel_l2({k: runs[2][k] for k in slot}, {k: runs[1][k] for k in slot})
    check(e < 1e-5, f"L-BFGS: slot projection (expression readout), 2 ranks vs 1: relative L2 {e:.2e} < 1e-5")

    def last_round(log):
        """The objective, cross-entropy and L2 term of the last L-BFGS round logged."""
        ln = [ln for ln in log.splitlines() if ": L-BFGS " in ln][-1]
        return (float(ln.split("objective ")[1].split()[0]), float(ln.split("cross-entropy ")[1].split()[0]),
                float(ln.split(" + L2 ")[1].split(",")[0]))

    # Both stop at the solver's tolerance (max |gradient| 1e-4), not at the
    # exact minimum: the objectives agree to about that.
    (f1, ce, l2), (f2, _, _) = last_round(logs[1]), last_round(logs[2])
    check(abs(f2 - f1) <= 1e-3 * f1, f"L-BFGS objective, 2 ranks vs 1: {f2:.8g} vs {f1:.8g} (within 1e-3)")
    fc = ("cls.fc.weight", "cls.fc.bias")
    e = rel_l2({k: runs[2][k] for k in fc}, {k: runs[1][k] for k in fc})
    check(e < 1e-2, f"L-BFGS readout, 2 ranks vs 1: relative L2 {e:.2e} < 1e-2")
    # The objective's parts, as logged, against the stored readout and the
    # head's own forward pass (metrics.jsonl's training loss, unweighted).
    want_l2 = 0.5 * lam * float((runs[1]["cls.fc.weight"] ** 2).sum())
    check(abs(l2 - want_l2) <= 1e-5 * want_l2, f"L-BFGS: L2 term {l2:.8g} = lambda/2 |W|^2 {want_l2:.8g}")
    with open(os.path.join(TMP, "lbfgs1", "metrics.jsonl"), encoding="utf-8") as f:
        epochs = [json.loads(ln) for ln in f if '"val_macro_f1"' in ln]
    head_loss = epochs[-1]["loss"]
    check(abs(ce - head_loss) <= 1e-4 * head_loss + 2e-6,
          f"L-BFGS: its cross-entropy {ce:.8g} = the head's training loss {head_loss:.6f}")

    # SIGUSR1 after the first epoch: the next round stops, its start is
    # checkpointed, and --resume repeats it: bitwise the uninterrupted run.
    d = os.path.join(TMP, "lbfgs-stopped")
    rc, log = run_signalled(cmd(2, d), "epoch 0: L-BFGS")
    stopped = "restarts from its beginning on resume" in log
    check(rc == 0 and stopped, f"L-BFGS, SIGUSR1 to mpirun: the round's start checkpointed, exit 0 (rc {rc})")
    if not stopped:
        print(log[-2000:])
        return
    r = run(cmd(2, d, ["--resume", "auto"]))
    check(r.returncode == 0, f"L-BFGS fine-tuning resumed ({r.stderr.strip()[-300:]})")
    if r.returncode == 0:
        check(bitwise(params(latest_ckpt(d)), runs[2]),
              "L-BFGS fine-tuning stopped and resumed: bitwise equal to uninterrupted")


def main():
    os.makedirs(TMP, exist_ok=True)
    tests = {"ranks": test_ranks, "resume": test_resume, "kill": test_kill, "metrics": test_metrics,
             "contrastive": test_contrastive, "nan": test_nan, "fulldisk": test_fulldisk, "finetune": test_finetune,
             "finetune_lbfgs": test_finetune_lbfgs}
    if len(sys.argv) != 2 or sys.argv[1] not in tests:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(tests)}")
    tests[sys.argv[1]]()
    print(f"{len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
