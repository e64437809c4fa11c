#!/usr/bin/env python3
"""One writer per folder: the run lock, refused starts, and outputs written
without harm, on real pbmc3k data.

    lock_tests.py pretrain   two `perfcell pretrain` started at once into one run folder:
                             one is refused naming the holder's host and pid, the other
                             runs on unharmed (its config.ini, metrics, checkpoints)
    lock_tests.py stale      kill -9 of the holder leaves its lock file; a resumed run takes
                             it over (flock locks die with their process)
    lock_tests.py ckptdir    two runs in two run folders sharing a checkpoint.dir: the
                             second is refused and leaves no run folder
    lock_tests.py finetune   the same as pretrain for `perfcell finetune`
    lock_tests.py shard      two `perfcell-shard build` started at once into one --out
                             (writes slowed by an LD_PRELOAD shim): one refused naming the
                             other, the other's folder verifies, nothing else left behind
    lock_tests.py refused    starts refused because the folder holds checkpoints (no
                             --resume) or because of the rank count leave the run folder
                             byte-identical, and leave no folder where there was none
    lock_tests.py force      embed / predict refuse an existing --out without --force
                             (it stays as it was) and replace it with --force
    lock_tests.py input      embed / predict never write over the input or the checkpoint,
                             also through a symlink or a hard link, even with --force
    lock_tests.py folder     a missing output folder: the same message from embed and
                             predict, nothing created
    lock_tests.py fullwrite  an output write that fails (a full tmpfs in a private mount
                             namespace; a file-size limit) leaves the previous output
                             intact and no temporary file

Environment (from tests/run.sh): BIN, DATA, TEST_TMP, MPIRUN. Exit code 0 = pass.
"""
import glob
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

BIN = os.environ.get("BIN", "bin")
DATA = os.environ.get("DATA", "../shared/data")
TMP = os.path.abspath(os.environ.get("TEST_TMP", "/tmp/perfcell-lock-test"))
MPIRUN = os.environ.get("MPIRUN", "mpirun --oversubscribe --bind-to none").split()
PERFCELL = os.path.abspath(os.path.join(BIN, "perfcell"))
SHARD = os.path.abspath(os.path.join(BIN, "perfcell-shard"))
INSPECT = os.path.abspath(os.path.join(BIN, "perfcell-inspect"))
TINY = ["--config", "configs/tiny.ini"]
H5AD = os.path.join(DATA, "pbmc3k", "pbmc3k_counts.h5ad")
failures = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg, flush=True)
    if not cond:
        failures.append(msg)


def run(cmd, timeout=300, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def status_ok(rc):
    """A refusal: an exit status between 1 and 127 (not a signal, not a crash)."""
    return 1 <= rc <= 127


def tree_hash(d):
    """Every path under d (files, folders, links) with the bytes of each file."""
    if not os.path.exists(d):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(d):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, d).encode() + b"\0")
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def file_hash(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shards():
    """pbmc3k shards (with labels), built once per test."""
    out = os.path.join(TMP, "shards")
    if os.path.exists(os.path.join(out, "manifest.tsv")):
        return out
    vocab = os.path.join(TMP, "vocab.tsv")
    r = run([SHARD, "vocab", H5AD, "--out", vocab, "--force"])
    assert r.returncode == 0, r.stderr
    r = run([SHARD, "build", H5AD, "--vocab", vocab, "--out", out, "--shard-cells", "1000",
             "--label-key", "celltype"])
    assert r.returncode == 0, r.stderr
    return out


def pretrain_cmd(np_, run_dir, extra=()):
    return MPIRUN + ["-np", str(np_), PERFCELL, "pretrain"] + TINY + [
        f"data.shards={shards()}", f"run.dir={run_dir}"] + list(extra)


def pretrained():
    """A 2-step pretraining checkpoint, made once per test."""
    d = os.path.join(TMP, "pre")
    ck = os.path.join(d, "checkpoints", "ckpt-00000002.h5")
    if not os.path.exists(ck):
        r = run(pretrain_cmd(1, d, ["run.max_steps=2"]))
        assert r.returncode == 0, r.stderr
    return ck


FT_EXTRA = ["finetune.freeze=all", "finetune.head=linear", "finetune.patience=0",
            "data.max_tokens=0", "model.feature_redraw_interval=0", "batch.micro_batch=4",
            "batch.global_batch=24", "checkpoint.every_steps=0"]


def finetune_cmd(np_, run_dir, extra=()):
    return MPIRUN + ["-np", str(np_), PERFCELL, "finetune"] + TINY + [
        "--init", pretrained(), f"data.shards={shards()}", f"run.dir={run_dir}"] + FT_EXTRA + list(extra)


def finetuned():
    """A fine-tuned checkpoint (one epoch), made once per test."""
    d = os.path.join(TMP, "ft")
    best = os.path.join(d, "best")
    if not glob.glob(os.path.join(best, "ckpt-*.h5")):
        r = run(finetune_cmd(1, d, ["finetune.epochs=1"]))
        assert r.returncode == 0, r.stderr
    return best


def perfcell_alive(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"perfcell" in f.read()
    except OSError:
        return False


def stop(p):
    """End a started command: SIGTERM to mpirun, then SIGKILL if it lingers."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


def race(cmds, lock_path, timeout=240):
    """Start the commands at once; wait until one has ended. Returns the
    processes, the index of the one that ended (None if none did within the
    timeout), and the holder text of lock_path read while the other ran."""
    logs = [open(os.path.join(TMP, f"race{i}.log"), "w+") for i in range(len(cmds))]
    ps = [subprocess.Popen(c, stdout=logs[i], stderr=subprocess.STDOUT, text=True)
          for i, c in enumerate(cmds)]
    t0, ended, holder = time.time(), None, ""
    while time.time() - t0 < timeout and ended is None:
        for i, p in enumerate(ps):
            if p.poll() is not None:
                ended = i
                break
        time.sleep(0.2)
    if ended is not None and os.path.exists(lock_path):
        with open(lock_path) as f:
            holder = f.read().strip()
    return ps, logs, ended, holder


def read_log(f):
    f.seek(0)
    return f.read()


def check_refusal(log, rc, holder, what):
    check(status_ok(rc), f"{what}: the second command exits with a status in 1..127 (got {rc})")
    check("in use by another perfcell command" in log,
          f"{what}: the message says the folder is in use ({log.strip()[-400:]})")
    host = socket.gethostname()
    parts = holder.split()
    check(len(parts) == 2 and parts[0] == host, f"{what}: the lock file names this host ('{holder}')")
    if len(parts) == 2:
        check(f"pid {parts[1]} on host {host}" in log, f"{what}: the message names the holder's pid {parts[1]} and host")
        check(perfcell_alive(parts[1]), f"{what}: the named pid {parts[1]} is the running perfcell")


def jsonl_ok(path):
    import json
    try:
        with open(path) as f:
            steps = [json.loads(ln)["step"] for ln in f if ln.strip()]
    except (OSError, ValueError, KeyError):
        return False
    return len(steps) > 0 and steps == sorted(steps)


def train_race(kind):
    """Two runs of `kind` started at once into one run folder, with different
    seeds: one refused naming the holder, the other unharmed."""
    d = os.path.join(TMP, f"{kind}_race")
    lock = os.path.join(d, "perfcell.lock")
    if kind == "pretrain":
        cmds = [pretrain_cmd(1, d, ["run.max_steps=100000", f"run.seed={s}"]) for s in (11, 12)]
    else:
        cmds = [finetune_cmd(1, d, ["finetune.epochs=100000", f"run.seed={s}"]) for s in (11, 12)]
    ps, logs, ended, holder = race(cmds, lock)
    try:
        check(ended is not None, f"{kind}: one of two runs into one folder ends (refused) while the other runs")
        if ended is None:
            return
        other = 1 - ended
        check(ps[other].poll() is None, f"{kind}: the other run is still running")
        rc = ps[ended].wait(timeout=30)
        check_refusal(read_log(logs[ended]), rc, holder, kind)
        # The winner goes on: a checkpoint after the refusal, then a clean stop.
        ck = os.path.join(d, "checkpoints")
        t0 = time.time()
        while ps[other].poll() is None and time.time() - t0 < 240 and not glob.glob(os.path.join(ck, "ckpt-*.h5")):
            time.sleep(0.5)
        ps[other].send_signal(signal.SIGUSR1)
        rc2 = ps[other].wait(timeout=240)
        log2 = read_log(logs[other])
        check(rc2 == 0, f"{kind}: the running run checkpoints and exits 0 on SIGUSR1 (rc {rc2}: {log2.strip()[-300:]})")
        seed = 11 if other == 0 else 12
        with open(os.path.join(d, "config.ini")) as f:
            cfg = f.read()
        check(f"seed = {seed}\n" in cfg, f"{kind}: config.ini is the running run's (seed {seed})")
        check(jsonl_ok(os.path.join(d, "metrics.jsonl")), f"{kind}: metrics.jsonl is whole JSON lines in step order")
        check(not os.path.exists(lock), f"{kind}: the lock file is gone after the run")
        cks = sorted(glob.glob(os.path.join(ck, "ckpt-*.h5")))
        r = run([INSPECT, cks[-1], "--verify"]) if cks else None
        check(r is not None and r.returncode == 0, f"{kind}: the newest checkpoint verifies ({cks[-1:]})")
    finally:
        for p in ps:
            stop(p)


def wait_holder(lock, p, not_pid=None, timeout=240):
    """The pid in the lock file once a holder other than not_pid wrote it (or None)."""
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None:
        try:
            with open(lock) as f:
                parts = f.read().split()
            if len(parts) == 2 and parts[1] != not_pid:
                return parts[1]
        except OSError:
            pass
        time.sleep(0.2)
    return None


def test_stale():
    """kill -9 of the holder leaves its lock file behind; it blocks nothing."""
    d = os.path.join(TMP, "stale")
    lock = os.path.join(d, "perfcell.lock")
    p = subprocess.Popen(pretrain_cmd(1, d, ["run.max_steps=100000", "checkpoint.every_steps=1"]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ck = os.path.join(d, "checkpoints")
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 240 and not glob.glob(os.path.join(ck, "ckpt-*.h5")):
            time.sleep(0.2)
        pid = wait_holder(lock, p)
        check(pid is not None, "the running pretrain holds the lock")
        if pid is None:
            return
        os.kill(int(pid), signal.SIGKILL)
        p.wait(timeout=120)
    finally:
        stop(p)
    check(os.path.exists(lock), "kill -9 leaves the lock file behind")
    q = subprocess.Popen(pretrain_cmd(1, d, ["run.max_steps=100000", "checkpoint.every_steps=1"]) + ["--resume", "auto"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid2 = wait_holder(lock, q, not_pid=pid)
        check(pid2 is not None, f"a resumed run takes the lock over from the dead holder {pid}")
        lines = []
        for line in q.stdout:  # SIGUSR1 once it trains (its handler is installed)
            lines.append(line)
            if line.startswith("step "):
                q.send_signal(signal.SIGUSR1)
                break
        out = "".join(lines) + q.communicate(timeout=240)[0]
        check(q.returncode == 0 and "resume:" in out, f"the resumed run ran and stopped cleanly ({q.returncode}: {out.strip()[-300:]})")
        check(not os.path.exists(lock), "its lock file is gone after it")
    finally:
        stop(q)


def test_ckptdir():
    """Two runs in two run folders sharing one checkpoint.dir, or one run's
    checkpoint.dir the other's default checkpoints folder: the second is
    refused, and leaves no run folder."""
    c = os.path.join(TMP, "shared_ckpt")
    r1, r2 = os.path.join(TMP, "r1"), os.path.join(TMP, "r2")
    p = subprocess.Popen(pretrain_cmd(1, r1, ["run.max_steps=100000", f"checkpoint.dir={c}"]),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = wait_holder(os.path.join(c, "perfcell.lock"), p)
        check(pid is not None, "the first run holds its checkpoint.dir")
        r = run(pretrain_cmd(1, r2, ["run.max_steps=100000", f"checkpoint.dir={c}"]), timeout=240)
        check(status_ok(r.returncode) and f"'{c}' is in use by another perfcell command: pid {pid}" in r.stderr,
              f"a second run into the same checkpoint.dir is refused naming the holder ({r.stderr.strip()[-300:]})")
        check(not os.path.exists(r2), "the refused run left no run folder")
        for line in p.stdout:
            if line.startswith("step "):
                p.send_signal(signal.SIGUSR1)
                break
        out = p.communicate(timeout=240)[0]
        check(p.returncode == 0, f"the first run stops cleanly ({out.strip()[-200:]})")
        check(not os.path.exists(os.path.join(c, "perfcell.lock")) and not os.path.exists(os.path.join(r1, "perfcell.lock")),
              "both of its lock files are gone")
    finally:
        stop(p)
    # A run whose checkpoint.dir is another running run's default checkpoints folder.
    r3, r4 = os.path.join(TMP, "r3"), os.path.join(TMP, "r4")
    default = os.path.join(r3, "checkpoints")
    p = subprocess.Popen(pretrain_cmd(1, r3, ["run.max_steps=100000"]),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = wait_holder(os.path.join(default, "perfcell.lock"), p)
        check(pid is not None, "a run holds its default checkpoints folder")
        r = run(pretrain_cmd(1, r4, ["run.max_steps=100000", f"checkpoint.dir={default}"]), timeout=240)
        check(status_ok(r.returncode) and f"'{default}' is in use by another perfcell command: pid {pid}" in r.stderr,
              f"a second run with that folder as its checkpoint.dir is refused ({r.stderr.strip()[-300:]})")
        check(not os.path.exists(r4), "the refused run left no run folder")
        for line in p.stdout:
            if line.startswith("step "):
                p.send_signal(signal.SIGUSR1)
                break
        out = p.communicate(timeout=240)[0]
        check(p.returncode == 0, f"the first run stops cleanly ({out.strip()[-200:]})")
        check(not os.path.exists(os.path.join(default, "perfcell.lock")), "its checkpoints folder's lock file is gone")
    finally:
        stop(p)


def test_pretrain():
    train_race("pretrain")


def test_finetune():
    train_race("finetune")


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
/* Slows every write to a regular file by 20 ms, so that a build lasts long
   enough for a second one to meet it. */
static void slow(int fd) {
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
ssize_t write(int fd, const void *b, size_t n) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    slow(fd);
    return real(fd, b, n);
}
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite");
    slow(fd);
    return real(fd, b, n, o);
}
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
    slow(fd);
    return real(fd, b, n, o);
}
"""


def test_shard():
    src = os.path.join(TMP, "slow.c")
    so = os.path.join(TMP, "slow.so")
    with open(src, "w") as f:
        f.write(SHIM)
    r = run(["gcc", "-shared", "-fPIC", "-O1", "-o", so, src, "-ldl"])
    assert r.returncode == 0, r.stderr
    vocab = os.path.join(TMP, "vocab.tsv")
    r = run([SHARD, "vocab", H5AD, "--out", vocab, "--force"])
    assert r.returncode == 0, r.stderr
    out = os.path.join(TMP, "built")
    lock = out + ".lock"
    # Sanitizer builds (make DEBUG=1) accept a preloaded library before their runtime.
    asan = os.environ.get("ASAN_OPTIONS", "detect_leaks=0") + ":verify_asan_link_order=0"
    cmd = MPIRUN + ["-np", "2", "-x", f"LD_PRELOAD={so}", "-x", f"ASAN_OPTIONS={asan}", SHARD, "build", H5AD, "--vocab", vocab,
                    "--out", out, "--shard-cells", "500", "--piece-cells", "100", "--chunk-elems", "4096"]
    ps, logs, ended, holder = race([cmd, cmd], lock)
    try:
        check(ended is not None, "shard: one of two builds into one --out ends while the other runs")
        if ended is None:
            return
        other = 1 - ended
        check(ps[other].poll() is None, "shard: the other build is still running")
        rc = ps[ended].wait(timeout=30)
        check_refusal(read_log(logs[ended]), rc, holder, "shard")
        rc2 = ps[other].wait(timeout=300)
        check(rc2 == 0, f"shard: the running build finishes (rc {rc2}: {read_log(logs[other]).strip()[-300:]})")
        r = run([INSPECT, out, "--verify"])
        check(r.returncode == 0, f"shard: its folder verifies ({r.stdout.strip()[-200:]} {r.stderr.strip()[-200:]})")
        left = sorted(os.listdir(TMP))
        check(not os.path.exists(lock) and not os.path.exists(out + ".partial"),
              f"shard: no lock file or partial folder is left ({left})")
    finally:
        for p in ps:
            stop(p)


def test_refused():
    d = os.path.join(TMP, "run")
    r = run(pretrain_cmd(1, d, ["run.max_steps=2"]))
    assert r.returncode == 0, r.stderr
    before = tree_hash(d)
    # A fresh start into a folder with checkpoints, with other settings.
    r = run(pretrain_cmd(1, d, ["run.max_steps=4", "optim.lr=5e-2"]))
    check(status_ok(r.returncode) and "already holds checkpoints" in r.stderr,
          f"a fresh start over checkpoints is refused ({r.returncode}: {r.stderr.strip()[-300:]})")
    check(tree_hash(d) == before, "the refused start left the run folder byte-identical")
    # A rank count that does not divide the batch (6 micro-batches, 4 ranks).
    r = run(pretrain_cmd(4, d, ["run.max_steps=4"]) + ["--resume", "auto"])
    check(status_ok(r.returncode) and "ranks" in r.stderr,
          f"a resume on 4 ranks is refused ({r.returncode}: {r.stderr.strip()[-300:]})")
    check(tree_hash(d) == before, "the refused resume left the run folder byte-identical")
    with open(os.path.join(d, "config.ini")) as f:
        cfg = f.read()
    check("\nlr = 1e-3\n" in cfg, "config.ini still holds the run's own optim.lr")
    # A resume with the original settings continues the run.
    r = run(pretrain_cmd(1, d, ["run.max_steps=4"]) + ["--resume", "auto"])
    check(r.returncode == 0 and "resume:" in r.stderr + r.stdout,
          f"--resume auto then continues ({r.returncode}: {r.stderr.strip()[-200:]})")
    # A fresh folder refused for its rank count is not created.
    fresh = os.path.join(TMP, "fresh", "run")
    r = run(pretrain_cmd(4, fresh))
    check(status_ok(r.returncode), f"a fresh start on 4 ranks is refused ({r.returncode})")
    check(not os.path.exists(fresh), f"the refused fresh start left no run folder ({tree_hash(fresh)})")
    check(not os.path.exists(os.path.join(TMP, "fresh")), "nor the folder above it, which it made")
    # The same with a checkpoint.dir inside the new run folder (two locks, the
    # second folder inside the first).
    nested = os.path.join(TMP, "nested", "run")
    r = run(pretrain_cmd(4, nested, ["checkpoint.dir=" + os.path.join(nested, "ck")]))
    check(status_ok(r.returncode), f"a fresh start with its checkpoint.dir inside, on 4 ranks, is refused ({r.returncode})")
    check(not os.path.exists(os.path.join(TMP, "nested")),
          f"it left none of the folders it made ({[w[0] for w in os.walk(os.path.join(TMP, 'nested'))]})")
    # The same for a shard build refused (no such vocabulary) into a new folder.
    r = run([SHARD, "build", H5AD, "--vocab", os.path.join(TMP, "no-such-vocab.tsv"),
             "--out", os.path.join(TMP, "new", "deeper", "shards")])
    check(status_ok(r.returncode) and "no-such-vocab.tsv" in r.stderr,
          f"a shard build without its vocabulary is refused ({r.stderr.strip()[-200:]})")
    check(not os.path.exists(os.path.join(TMP, "new")), "the refused build left none of the folders it made")


def embed(out, extra=(), input_=None, ckpt=None):
    return run([PERFCELL, "embed", "--checkpoint", ckpt or pretrained(), "--input", input_ or shards(),
                "--out", out] + list(extra))


def predict(out, extra=(), input_=None, ckpt=None):
    return run([PERFCELL, "predict", "--checkpoint", ckpt or finetuned(), "--input", input_ or shards(),
                "--out", out] + list(extra))


def test_force():
    for name, fn, out, a, b in (("embed", embed, "emb.h5ad", [], ["--pooling", "mean"]),
                                ("predict", predict, "pred.tsv", [], ["--probabilities"])):
        out = os.path.join(TMP, out)
        r = fn(out, a)
        check(r.returncode == 0, f"{name}: first output written ({r.stderr.strip()[-300:]})")
        h = file_hash(out)
        r = fn(out, b)
        check(status_ok(r.returncode) and "already exists" in r.stderr and "--force" in r.stderr,
              f"{name}: an existing --out is refused without --force ({r.returncode}: {r.stderr.strip()[-300:]})")
        check(file_hash(out) == h, f"{name}: the refused run left the existing output as it was")
        r = fn(out, b + ["--force"])
        check(r.returncode == 0, f"{name}: --force replaces it ({r.stderr.strip()[-300:]})")
        check(file_hash(out) != h, f"{name}: the output is the new one")
        check(not glob.glob(out + ".tmp.*"), f"{name}: no temporary file is left")
        r = run([PERFCELL, name, "--help"])
        check("--force" in r.stdout, f"{name}: --help documents --force")
    # The report of predict is an output too.
    rep = os.path.join(TMP, "report")
    r = predict(os.path.join(TMP, "p1.tsv"), ["--report", rep])
    check(r.returncode == 0 and os.path.exists(rep + ".tsv") and os.path.exists(rep + ".svg"),
          f"predict --report writes PREFIX.tsv and PREFIX.svg ({r.stderr.strip()[-200:]})")
    if os.path.exists(rep + ".tsv"):
        with open(rep + ".tsv", "a") as f:
            f.write("# marker\n")
        hr = file_hash(rep + ".tsv")
        r = predict(os.path.join(TMP, "p2.tsv"), ["--report", rep])
        check(status_ok(r.returncode) and "already exists" in r.stderr and not os.path.exists(os.path.join(TMP, "p2.tsv")),
              f"predict: an existing report is refused without --force ({r.stderr.strip()[-200:]})")
        check(file_hash(rep + ".tsv") == hr, "predict: the refused run left the report as it was")
        r = predict(os.path.join(TMP, "p2.tsv"), ["--report", rep, "--force"])
        check(r.returncode == 0 and file_hash(rep + ".tsv") != hr, "predict: --force replaces the report")
        check(not glob.glob(rep + ".*.tmp.*"), "predict: no temporary report file is left")
    if os.path.exists(os.path.join(TMP, "emb.h5ad")):
        import anndata
        a = anndata.read_h5ad(os.path.join(TMP, "emb.h5ad"))
        check(a.obsm["X_perfcell"].shape[0] == a.n_obs > 0, "the replaced embedding reads with anndata")


def test_input():
    inp = os.path.join(TMP, "cells.h5ad")
    shutil.copyfile(H5AD, inp)
    os.symlink(inp, os.path.join(TMP, "link.h5ad"))
    os.link(inp, os.path.join(TMP, "hard.h5ad"))
    h = file_hash(inp)
    ck = os.path.join(TMP, "ckpt-copy.h5")
    shutil.copyfile(pretrained(), ck)
    hc = file_hash(ck)
    for name, fn in (("embed", embed), ("predict", predict)):
        for out in ("cells.h5ad", "link.h5ad", "hard.h5ad"):
            for force in ([], ["--force"]):
                r = fn(os.path.join(TMP, out), force, input_=inp)
                check(status_ok(r.returncode) and "is the input" in r.stderr,
                      f"{name} --out {out} {' '.join(force)} == --input is refused ({r.returncode}: {r.stderr.strip()[-300:]})")
                check(file_hash(inp) == h, f"{name}: the input is intact after --out {out} {' '.join(force)}")
    r = embed(ck, ["--force"], input_=inp, ckpt=ck)
    check(status_ok(r.returncode) and "is the input" in r.stderr, f"embed --out == --checkpoint is refused ({r.stderr.strip()[-200:]})")
    check(file_hash(ck) == hc, "the checkpoint is intact")
    shard_file = sorted(glob.glob(os.path.join(shards(), "shard-*.h5ad")))[0]
    hs = file_hash(shard_file)
    r = predict(shard_file, ["--force"])
    check(status_ok(r.returncode) and "input folder" in r.stderr,
          f"predict --out into a file of the input shard folder is refused ({r.stderr.strip()[-200:]})")
    check(file_hash(shard_file) == hs, "the shard file is intact")
    check(not glob.glob(os.path.join(TMP, "*.tmp.*")), "no temporary file is left")


def test_folder():
    msgs = []
    for name, fn, out in (("embed", embed, "missing/emb.h5ad"), ("predict", predict, "missing/pred.tsv")):
        out = os.path.join(TMP, out)
        r = fn(out)
        folder = os.path.dirname(out)
        check(status_ok(r.returncode), f"{name}: a missing output folder is refused ({r.returncode})")
        want = f"cannot write '{out}': the output folder '{folder}' does not exist"
        check(want in r.stderr, f"{name}: the message names the file and the missing folder ({r.stderr.strip()[-300:]})")
        check("HDF5" not in r.stderr, f"{name}: no HDF5 error text")
        msgs.append(r.stderr.split("HINT")[0].split(": ", 1)[-1].replace(out, "OUT"))
        check(not os.path.exists(folder), f"{name}: nothing was created")
    check(len(set(msgs)) == 1, f"embed and predict give the same message ({msgs})")


def test_fullwrite():
    # embed into a full tmpfs (a private mount namespace): first a new output,
    # then over an old one with --force; the old one stays.
    mnt = os.path.join(TMP, "mnt")
    os.makedirs(mnt, exist_ok=True)
    out = os.path.join(mnt, "emb.h5ad")
    good = os.path.join(TMP, "emb_good.h5ad")
    r = embed(good)
    assert r.returncode == 0, r.stderr
    size = os.path.getsize(good)
    emb = f"{PERFCELL} embed --checkpoint {pretrained()} --input {shards()} --pooling mean"
    # Room for the old file and a third of a new one.
    script = (f"mount -t tmpfs -o size={size + size // 3 + 8192} tmpfs {mnt} && cp {good} {out} && "
              f"sha256sum {out} > {TMP}/before.sum && "
              f"{emb} --out {mnt}/new.h5ad 2>{TMP}/new.err; echo rc_new=$?; rm -f {mnt}/new.h5ad.tmp.*; "
              f"{emb} --out {out} --force 2>{TMP}/force.err; echo rc_force=$?; "
              f"sha256sum -c {TMP}/before.sum && echo listing: $(ls -a {mnt})")
    r = run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    rcs = dict(ln.split("=") for ln in r.stdout.splitlines() if ln.startswith("rc_"))
    if "mount" in r.stderr and not rcs:
        print(f"skip: tmpfs mounts are not allowed here: {r.stderr.strip()}")
    else:
        with open(f"{TMP}/new.err") as f:
            err_new = f.read()
        with open(f"{TMP}/force.err") as f:
            err_force = f.read()
        check(status_ok(int(rcs.get("rc_new", -1))) and f"{mnt}/new.h5ad" in err_new,
              f"embed of a new output into a full tmpfs fails naming it ({rcs}: {err_new.strip()[-300:]})")
        check(status_ok(int(rcs.get("rc_force", -1))) and out in err_force,
              f"embed --force over an old output into a full tmpfs fails naming it ({err_force.strip()[-300:]})")
        check(": OK" in r.stdout, "embed: the previous output is intact")
        listing = r.stdout.split("listing:")[-1].split()
        check(sorted(listing) == [".", "..", "emb.h5ad"], f"embed: no partial or temporary file is left ({listing})")
    # predict under a file-size limit smaller than its output (ulimit -f, which
    # raises SIGXFSZ). The limit lets the model's vocabulary (a temporary file)
    # through but not the output; under mpirun, as Open MPI's own files of a
    # singleton do not fit either.
    big = os.path.join(TMP, "pred_probs.tsv")
    r = predict(big, ["--probabilities"])
    assert r.returncode == 0, r.stderr
    vocab_size = os.path.getsize(os.path.join(shards(), "vocab.tsv"))
    limit = (vocab_size + os.path.getsize(big)) // 2
    assert vocab_size < limit < os.path.getsize(big)

    def limited(out, more=()):
        return run(MPIRUN + ["-np", "1", "prlimit", f"--fsize={limit}", PERFCELL, "predict", "--checkpoint",
                             finetuned(), "--input", shards(), "--out", out, "--probabilities"] + list(more))

    new = os.path.join(TMP, "pred_new.tsv")
    r = limited(new)
    check(status_ok(r.returncode) and f"cannot write '{new}'" in r.stderr,
          f"predict over a file-size limit fails naming the output (rc {r.returncode}: {r.stderr.strip()[-300:]})")
    check(not os.path.exists(new) and not glob.glob(new + ".tmp.*"),
          f"predict: no partial or temporary file is left ({glob.glob(new + '*')})")
    out = os.path.join(TMP, "pred.tsv")
    r = predict(out)
    assert r.returncode == 0, r.stderr
    h = file_hash(out)
    r = limited(out, ["--force"])
    check(status_ok(r.returncode) and f"cannot write '{out}'" in r.stderr,
          f"predict --force over a file-size limit fails naming the output ({r.stderr.strip()[-200:]})")
    check(file_hash(out) == h, "predict: the previous output is intact")
    check(not glob.glob(out + ".tmp.*"), f"predict: no temporary file is left ({glob.glob(out + '.tmp.*')})")


def main():
    os.makedirs(TMP, exist_ok=True)
    tests = {"pretrain": test_pretrain, "stale": test_stale, "ckptdir": test_ckptdir, "finetune": test_finetune, "shard": test_shard,
             "refused": test_refused, "force": test_force, "input": test_input, "folder": test_folder,
             "fullwrite": test_fullwrite}
    if len(sys.argv) != 2 or sys.argv[1] not in tests:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(tests)}")
    tests[sys.argv[1]]()
    print(f"{len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
