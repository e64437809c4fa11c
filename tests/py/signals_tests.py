#!/usr/bin/env python3
"""Stop signals and a full run folder, as a user meets them (2 ranks, tiny model).

    signals_tests.py metrics_full   the run folder on a tmpfs (private mount namespace)
                                    that fills up mid-run: metrics.jsonl never holds half
                                    a line, the run stops (exit 1) naming metrics.jsonl and
                                    the OS error, no checkpoint after the failure, and
                                    --resume auto (space freed) ends bitwise where an
                                    uninterrupted run ends
    signals_tests.py metrics_fsize  the same with a file size limit (prlimit) on rank 0: EFBIG
    signals_tests.py launcher NAME  SIGTERM to the process group of a shipped launcher
                                    (run_local, slurm, pbs; the batch scripts as plain bash
                                    with the scheduler's variables and commands faked)
                                    while a checkpoint write is slowed by an fsync shim:
                                    that checkpoint completes, a stop checkpoint follows,
                                    exit 0, no temporary file, no process left, and
                                    --resume auto ends bitwise where an uninterrupted run ends
    signals_tests.py bare_mpirun    SIGTERM to a bare mpirun during a slowed checkpoint
                                    write: what happens (printed for the README) and what
                                    must hold: exit non-zero within seconds, the log saying
                                    SIGTERM, no process left, the checkpoint being written
                                    never visible, the previous one intact, and --resume
                                    auto continues from it (the stale temporary removed)
                                    bitwise
    signals_tests.py rank_term      SIGTERM to rank 1 only: the log names the signal and
                                    the rank (not run.max_minutes), stop checkpoint, exit
                                    0, --resume auto bitwise

Environment (from tests/run.sh): BIN, DATA, TEST_TMP, MPIRUN. Exit code 0 = pass.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_mpi as pm  # noqa: E402  (shards, params, rank pids, check)

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
TMP = pm.TMP
check = pm.check

# An fsync that sleeps FSYNC_SHIM_SECONDS (or until the file FSYNC_SHIM_UNTIL
# exists) for checkpoint temporaries, after the first FSYNC_SHIM_SKIP of them,
# and says so on stderr first.
SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int fsync(int fd) {
    static int (*real)(int);
    static int seen;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    const char *secs = getenv("FSYNC_SHIM_SECONDS"), *skip = getenv("FSYNC_SHIM_SKIP");
    if (n > 0 && secs) {
        path[n] = 0;
        if (strstr(path, ".h5.tmp-") && seen++ >= (skip ? atoi(skip) : 0)) {
            fprintf(stderr, "fsync-shim: slowing fsync of %s\n", path);
            fflush(stderr);
            // Until FSYNC_SHIM_UNTIL exists, if given (at most the seconds).
            const char *until = getenv("FSYNC_SHIM_UNTIL");
            for (int tenths = 10 * atoi(secs); tenths > 0; tenths--) {
                if (until && access(until, F_OK) == 0) break;
                usleep(100000);
            }
        }
    }
    return real(fd);
}
"""


def shim():
    so = os.path.join(TMP, "fsync_shim.so")
    if not os.path.exists(so):
        src = os.path.join(TMP, "fsync_shim.c")
        with open(src, "w", encoding="utf-8") as f:
            f.write(SHIM_C)
        r = pm.run(["gcc", "-shared", "-fPIC", "-O1", "-o", so, src, "-ldl"])
        assert r.returncode == 0, r.stderr
    return so


STEPS = 12
EXTRA = [f"run.max_steps={STEPS}", "checkpoint.every_steps=4", "checkpoint.keep=3", "model.dim=32",
         "run.log_every=1", "run.val_every=0"]


def run_local(run_dir, resume=False):
    """pretrain on 2 ranks through mpi_scripts/run_local.sh, which may choose
    other OpenBLAS kernels than a bare mpirun (so its runs are compared among
    themselves)."""
    return pm.run(["bash", os.path.join(ROOT, "mpi_scripts", "run_local.sh"), "2"] + perfcell_args(run_dir) +
                  (["--resume", "auto"] if resume else []))


def reference(launcher=None):
    """The uninterrupted run's final parameters (computed once per test)."""
    d = os.path.join(TMP, "reference")
    if not os.path.exists(pm.final_ckpt(d, STEPS)):
        r = run_local(d) if launcher == "run_local" else pm.pretrain(2, d, EXTRA)
        assert r.returncode == 0, r.stderr
    return pm.params(pm.final_ckpt(d, STEPS))


def perfcell_args(run_dir, extra=EXTRA):
    return ["pretrain", "--config", os.path.join(ROOT, "configs", "tiny.ini"), f"data.shards={pm.shards()}",
            f"run.dir={run_dir}"] + list(extra)


def temporaries(folder):
    return [n for n in pm.ckpt_files(folder) if n.startswith(".") or ".tmp" in n]


def watch(p, until, limit=240):
    """Read p's output until a line satisfies until(line) (returns True) or the
    output ends; the lines read."""
    out = []
    t0 = time.time()
    for line in p.stdout:
        out.append(line)
        if until(line) or time.time() - t0 > limit:
            return out, True
    return out, False


def finish(p, out, limit=120, run_dir=None):
    """Read p's output to its end and wait for p, at most limit s (then its
    process group and the run's ranks are killed); (exit code or None, seconds
    waited, the whole log)."""
    t0 = time.time()
    timed_out = []

    def kill():
        timed_out.append(1)
        for pid in [p.pid] + (pm.perfcell_pids(run_dir) if run_dir else []):
            try:
                os.killpg(pid, signal.SIGKILL) if pid == p.pid else os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    timer = threading.Timer(limit, kill)
    timer.start()
    for line in p.stdout:
        out.append(line)
    rc = p.wait()
    timer.cancel()
    return (None if timed_out else rc), time.time() - t0, "".join(out)


def no_process_left(run_dir, what):
    time.sleep(0.5)
    left = pm.perfcell_pids(run_dir)
    check(not left, f"{what}: no perfcell process left behind ({left})")
    for pid in left:
        os.kill(pid, signal.SIGKILL)


def resume_bitwise(run_dir, ref, step, what, launcher=None):
    r = run_local(run_dir, resume=True) if launcher == "run_local" else pm.pretrain(2, run_dir, EXTRA, resume=True)
    check(r.returncode == 0 and f"at step {step}" in r.stdout,
          f"{what}: --resume auto continues from step {step} ({(r.stdout + r.stderr).strip()[-300:]})")
    if r.returncode == 0:
        check(pm.bitwise(pm.params(pm.final_ckpt(run_dir, STEPS)), ref),
              f"{what}: stopped and resumed is bitwise equal to the uninterrupted run")
    return r


# ---------------------------------------------------------------------------
# A run folder that fills up

def test_metrics_full():
    if os.environ.get("SIGNALS_IN_NAMESPACE") != "1":
        probe = pm.run(["unshare", "-m", "--propagation", "private", "true"])
        if probe.returncode != 0:
            check(False, f"a private mount namespace (unshare -m) is needed: {probe.stderr.strip()}")
            return
        env = dict(os.environ, SIGNALS_IN_NAMESPACE="1")
        r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, __file__, "metrics_full"],
                           env=env, timeout=500)
        if r.returncode != 0:
            pm.failures.append("metrics_full in its mount namespace")
        return
    mnt = os.path.join(TMP, "full-mnt")
    os.makedirs(mnt, exist_ok=True)
    # Room for the config, the metrics and three tiny checkpoints (2.7 MiB each).
    r = pm.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", mnt])
    if r.returncode != 0:
        check(False, f"mount a tmpfs: {r.stderr.strip()}")
        return
    filler = os.path.join(mnt, "filler")

    def fill(run_dir):
        # To the last page; then one page back, for the checkpoint's pointer
        # file. The metrics file's last page still has room for a few lines;
        # the line that crosses it is the one cut.
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        filled = 0
        try:
            while True:
                filled += os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        os.ftruncate(fd, max(filled - 4096, 0))
        os.close(fd)
        check(filled > 0, f"the tmpfs filled at step 40 ({filled} bytes of filler)")

    metrics_fault(os.path.join(mnt, "run"), "full tmpfs", fill, "No space left on device", lambda: os.unlink(filler))
    pm.run(["umount", mnt])


def test_metrics_fsize():
    def limit(run_dir):
        # Rank 0 may write 3000 bytes more to a file than metrics.jsonl holds.
        size = os.path.getsize(os.path.join(run_dir, "metrics.jsonl"))
        ranks = [pid for pid in pm.perfcell_pids(run_dir) if rank_of(pid) == 0]
        for pid in ranks:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (size + 3000, size + 3000))
        check(len(ranks) == 1, f"file size limit {size + 3000} set on rank 0")

    metrics_fault(os.path.join(TMP, "fsize-run"), "file size limit", limit, "File too large", lambda: None)


def metrics_fault(d, what, fault, errtext, undo):
    """A run whose metrics writes start failing after step 40: fault(d) is
    called while rank 0 waits in the fsync of the checkpoint of step 40;
    undo() then lets a resumed run finish."""
    steps = 100
    extra = [f"run.max_steps={steps}", "checkpoint.every_steps=40", "checkpoint.keep=2", "run.log_every=1",
             "run.val_every=0"]
    ref_dir = os.path.join(TMP, "full-ref")
    if not os.path.exists(pm.final_ckpt(ref_dir, steps)):
        r = pm.pretrain(2, ref_dir, extra)
        check(r.returncode == 0, "uninterrupted reference run: exit 0")
    ref = pm.params(pm.final_ckpt(ref_dir, steps))
    metrics = os.path.join(d, "metrics.jsonl")
    go = os.path.join(TMP, f"go-{os.path.basename(d)}")
    env = dict(os.environ, FSYNC_SHIM_SECONDS="120", FSYNC_SHIM_UNTIL=go, LD_PRELOAD=shim())
    p = subprocess.Popen(pm.MPIRUN + ["-np", "2", pm.PERFCELL] + perfcell_args(d, extra), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    out, seen = watch(p, lambda ln: ln.startswith("fsync-shim: slowing fsync of"))
    check(seen and ".ckpt-40.h5" in out[-1], f"{what}: rank 0 waits in the checkpoint of step 40")
    if seen:
        fault(d)
    with open(go, "w", encoding="utf-8"):
        pass
    rc, waited, log = finish(p, out, run_dir=d)
    check(rc == 1, f"{what}: exit status 1 (rc {rc}, {waited:.1f}s after the fault)")
    cut = [ln for ln in log.splitlines() if "metrics.jsonl" in ln]
    check(any(errtext in ln for ln in cut), f"{what}: the error names metrics.jsonl and the OS error "
          f"({' | '.join(cut)[:400]})")
    check("cannot write checkpoint" not in log, f"{what}: no checkpoint write was attempted after the failure")
    with open(metrics, "rb") as f:
        data = f.read()
    check(data.endswith(b"\n"), f"{what}: metrics.jsonl ends with a whole line ({data[-80:]!r})")
    try:
        rows = [json.loads(x) for x in data.split(b"\n") if x]
    except ValueError as e:
        rows = []
        check(False, f"{what}: every metrics line is JSON ({e})")
    train = [x["step"] for x in rows if "loss" in x]
    check(train and train == list(range(1, train[-1] + 1)) and 40 <= train[-1] < 80,
          f"{what}: metrics hold steps 1..{train[-1] if train else '?'} without a gap")
    ck = os.path.join(d, "checkpoints")
    check(pm.ckpt_files(ck) == ["ckpt-00000040.h5", "latest"],
          f"{what}: the checkpoint of step 40 and its pointer, nothing after ({pm.ckpt_files(ck)})")
    no_process_left(d, what)
    if pm.failures:
        print(log[-3000:])

    # The fault gone: --resume auto continues from step 40, logs steps 41..
    # again (the lines after the checkpoint are dropped, and a torn last line)
    # and ends where the uninterrupted run ends.
    undo()
    # A torn line as an older perfcell could leave (no step number yet):
    # dropped on resume as well.
    with open(metrics, "ab") as f:
        f.write(b'{"st')
    r = pm.pretrain(2, d, extra, resume=True)
    check(r.returncode == 0 and "at step 40" in r.stdout,
          f"{what}: --resume auto continues from step 40 ({r.stderr.strip()[:600]})")
    if r.returncode == 0:
        check(pm.bitwise(pm.params(pm.final_ckpt(d, steps)), ref), f"{what}: resumed run bitwise equal to uninterrupted")
        rows = [json.loads(x) for x in open(metrics, encoding="utf-8")]
        train = [x["step"] for x in rows if "loss" in x]
        check(train == list(range(1, steps + 1)), f"{what}: metrics.jsonl: one training line per step 1..100")


# ---------------------------------------------------------------------------
# SIGTERM to the shipped launchers

def fake_commands(bindir, requeue_log):
    """srun (runs the tasks under mpirun, SLURM_NTASKS of them) and scontrol
    (records its arguments), for the SLURM script run as plain bash."""
    os.makedirs(bindir, exist_ok=True)
    srun = os.path.join(bindir, "srun")
    with open(srun, "w", encoding="utf-8") as f:
        f.write("#!/bin/bash\n# srun stand-in: its options dropped, the tasks run by mpirun.\n"
                "while [[ \"$1\" == --* ]]; do shift; done\n"
                f"exec {' '.join(pm.MPIRUN)} -np \"$SLURM_NTASKS\" \"$@\"\n")
    scontrol = os.path.join(bindir, "scontrol")
    with open(scontrol, "w", encoding="utf-8") as f:
        f.write(f"#!/bin/bash\necho \"$*\" >> {requeue_log}\n")
    os.chmod(srun, 0o755)
    os.chmod(scontrol, 0o755)


def launcher_cmd(name, run_dir):
    """The command and environment that start launcher NAME on 2 ranks."""
    env = dict(os.environ, FSYNC_SHIM_SECONDS="6", FSYNC_SHIM_SKIP="0", LD_PRELOAD=shim())
    config = os.path.join(ROOT, "configs", "tiny.ini")
    overrides = " ".join(perfcell_args(run_dir)[3:])
    if name == "run_local":
        return ["bash", os.path.join(ROOT, "mpi_scripts", "run_local.sh"), "2"] + perfcell_args(run_dir) + [
            "--resume", "auto"], env
    if name == "slurm":
        bindir = os.path.join(TMP, "fake-slurm")
        fake_commands(bindir, os.path.join(TMP, "requeued.txt"))
        env.update(PATH=f"{bindir}:{env['PATH']}", SLURM_SUBMIT_DIR=ROOT, SLURM_NTASKS="2", SLURM_JOB_ID="4242",
                   SLURM_CPUS_PER_TASK="1", CONFIG=config, EXTRA=overrides)
        return ["bash", os.path.join(ROOT, "mpi_scripts", "slurm_pretrain.sbatch")], env
    nodefile = os.path.join(TMP, "pbs_nodefile")
    with open(nodefile, "w", encoding="utf-8") as f:
        f.write("localhost\nlocalhost\n")
    env.update(PBS_O_WORKDIR=ROOT, PBS_NODEFILE=nodefile, NCPUS="1", CONFIG=config, EXTRA=overrides)
    return ["bash", os.path.join(ROOT, "mpi_scripts", "pbs_pretrain.pbs")], env


def test_launcher(name):
    ref = reference(name)
    d = os.path.join(TMP, f"launcher-{name}")
    cmd, env = launcher_cmd(name, d)
    # The launcher leads a process group of its own, as a batch job or a
    # terminal's foreground job does; SIGTERM goes to the whole group.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    out, seen = watch(p, lambda ln: ln.startswith("fsync-shim: slowing fsync of") and ".ckpt-4.h5" in ln)
    check(seen, f"{name}: the checkpoint of step 4 is being written (slowed)")
    if seen:
        os.killpg(p.pid, signal.SIGTERM)
    rc, waited, log = finish(p, out, limit=200, run_dir=d)
    ck = os.path.join(d, "checkpoints")
    k = pm.stop_step_of(log)
    check(rc == 0, f"{name}: SIGTERM to the launcher's process group: exit 0 (rc {rc}, {waited:.1f}s)")
    check("checkpoint: step 4 written" in log and os.path.exists(os.path.join(ck, "ckpt-00000004.h5")),
          f"{name}: the checkpoint being written when SIGTERM came completed")
    check(k is not None and 4 <= k < STEPS and os.path.exists(os.path.join(ck, f"ckpt-{k:08d}.h5")),
          f"{name}: a stop checkpoint at step {k}")
    check(temporaries(ck) == [] and not [n for n in os.listdir(d) if ".tmp" in n],
          f"{name}: no temporary file left ({temporaries(ck)})")
    no_process_left(d, name)
    if name == "slurm":
        requeued = open(os.path.join(TMP, "requeued.txt"), encoding="utf-8").read() if os.path.exists(
            os.path.join(TMP, "requeued.txt")) else ""
        check("requeue 4242" in requeued, f"slurm: the job requeues itself ({requeued.strip()})")
    if rc != 0 or k is None:
        print(log[-3000:])
        return
    resume_bitwise(d, ref, k, name, name)


# ---------------------------------------------------------------------------
# SIGTERM to a bare mpirun

def test_bare_mpirun():
    ref = reference()
    d = os.path.join(TMP, "bare-mpirun")
    # The checkpoint of step 4 is written at full speed, that of step 8 slowly.
    env = dict(os.environ, FSYNC_SHIM_SECONDS="20", FSYNC_SHIM_SKIP="1", LD_PRELOAD=shim())
    p = subprocess.Popen(pm.MPIRUN + ["-np", "2", pm.PERFCELL] + perfcell_args(d), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    out, seen = watch(p, lambda ln: ln.startswith("fsync-shim: slowing fsync of"))
    check(seen and ".ckpt-8.h5" in out[-1], f"the checkpoint of step 8 is being written ({out[-1].strip()})")
    if seen:
        p.send_signal(signal.SIGTERM)
    rc, waited, log = finish(p, out, limit=60, run_dir=d)
    ck = os.path.join(d, "checkpoints")
    files = pm.ckpt_files(ck)
    print(f"FACT bare mpirun + SIGTERM during a checkpoint write: exit status {rc} after {waited:.1f}s; "
          f"checkpoint folder {files}; last lines: {' | '.join(log.strip().splitlines()[-3:])[:400]}")
    check(rc not in (0, None) and waited < 30, f"bare mpirun: exits non-zero within seconds (rc {rc}, {waited:.1f}s)")
    said = [ln.strip() for ln in log.splitlines() if "SIGTERM received" in ln]
    check(said, f"bare mpirun: the log ends saying the ranks received SIGTERM ({' | '.join(said)})")
    no_process_left(d, "bare mpirun")
    check("ckpt-00000008.h5" not in files, "the checkpoint cut short is not visible under its name")
    check(pm.inspect_ok(os.path.join(ck, "ckpt-00000004.h5")), "the previous checkpoint (step 4) verifies")
    r = resume_bitwise(d, ref, 4, "bare mpirun")
    check(temporaries(ck) == [], f"bare mpirun: the temporary left behind is gone after resuming ({temporaries(ck)})")
    if temporaries(ck) == [] and r.returncode == 0:
        print("FACT the stale temporary was removed by the resumed run: " +
              " | ".join(ln for ln in (r.stdout + r.stderr).splitlines() if "removed" in ln)[:300])


# ---------------------------------------------------------------------------
# SIGTERM to one rank

def rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        for kv in f.read().split(b"\0"):
            if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
                return int(kv.split(b"=")[1])
    return None


def test_rank_term():
    ref = reference()
    d = os.path.join(TMP, "rank-term")
    # Rank 0 waits in the checkpoint of step 4 while rank 1 gets SIGTERM, so
    # that the run cannot end before the signal counts.
    go = os.path.join(TMP, "go-rank-term")
    env = dict(os.environ, FSYNC_SHIM_SECONDS="120", FSYNC_SHIM_UNTIL=go, LD_PRELOAD=shim())
    p = subprocess.Popen(pm.MPIRUN + ["-np", "2", pm.PERFCELL] + perfcell_args(d), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    out, seen = watch(p, lambda ln: ln.startswith("fsync-shim: slowing fsync of"))
    sent = False
    if seen:
        for pid in pm.perfcell_pids(d):
            if rank_of(pid) == 1:
                os.kill(pid, signal.SIGTERM)
                sent = True
    time.sleep(1)
    with open(go, "w", encoding="utf-8"):
        pass
    rc, waited, log = finish(p, out, run_dir=d)
    check(sent, "SIGTERM sent to rank 1 during the checkpoint of step 4")
    named = [ln for ln in log.splitlines() if "checkpointing at step" in ln]
    check(named and "SIGTERM" in named[-1] and "rank 1" in named[-1] and "max_minutes" not in log,
          f"the log names SIGTERM and rank 1 ({' | '.join(named)})")
    k = pm.stop_step_of(log)
    check(rc == 0 and k is not None and k < STEPS, f"stop checkpoint at step {k} and exit 0 (rc {rc})")
    no_process_left(d, "SIGTERM to rank 1")
    if rc == 0 and k is not None:
        resume_bitwise(d, ref, k, "SIGTERM to rank 1")


def main():
    os.makedirs(TMP, exist_ok=True)
    tests = {"metrics_full": test_metrics_full, "metrics_fsize": test_metrics_fsize, "bare_mpirun": test_bare_mpirun, "rank_term": test_rank_term}
    if len(sys.argv) == 3 and sys.argv[1] == "launcher" and sys.argv[2] in ("run_local", "slurm", "pbs"):
        test_launcher(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] in tests:
        tests[sys.argv[1]]()
    else:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(tests)}|launcher run_local|slurm|pbs")
    print(f"{len(pm.failures)} failure(s)")
    sys.exit(1 if pm.failures else 0)


if __name__ == "__main__":
    main()
