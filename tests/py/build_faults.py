#!/usr/bin/env python3
"""Faults while writing shards, made the way a user meets them.

    build_faults.py disk-full NP       a tmpfs that fills up (private mount namespace)
    build_faults.py fsize NP           a file size limit (prlimit --fsize)
    build_faults.py signal TARGET SIG  TARGET: mpirun, rank (one rank of two), single (no mpirun)
    build_faults.py tcp                a 2-rank build over TCP only equals the default one

Every fault must end the build with a message naming the shard (or the stop)
and the cause, an exit status in 1..127 (not a hang: each command runs under
`timeout`), no <out>.partial, no <out>, and no perfcell-shard process left.
The exit status is the verdict.
"""
import os
import shlex
import signal
import subprocess
import sys
import time

BIN = os.environ.get("BIN", "bin")
DATA = os.environ["DATA"]
TMP = os.path.abspath(os.environ.get("TEST_TMP", "build/test-tmp/build_faults"))
MPIRUN = shlex.split(os.environ.get("MPIRUN", "mpirun --oversubscribe --bind-to none"))
INPUT = os.path.join(DATA, "pbmc3k", "pbmc3k_counts.h5ad")
SHARD = os.path.abspath(os.path.join(BIN, "perfcell-shard"))
# Bounds a hang; the faults end within seconds (not asserted: the machine may be busy).
LIMIT = 120

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def vocab():
    path = os.path.join(TMP, "vocab.tsv")
    if not os.path.exists(path):
        subprocess.run([SHARD, "vocab", INPUT, "--out", path, "--quiet"], check=True, timeout=LIMIT)
    return path


def build_args(out, *extra):
    return [SHARD, "build", INPUT, "--vocab", vocab(), "--out", out, "--quiet", *extra]


def mpi(np, args):
    return MPIRUN + ["-np", str(np)] + args


def left_processes(out):
    """perfcell-shard processes (of this test: their command line names `out`), after a grace."""
    for _ in range(100):
        r = subprocess.run(["pgrep", "-f", out], capture_output=True, text=True)
        pids = [p for p in r.stdout.split() if int(p) != os.getpid()]
        pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not pids:
            return []
        time.sleep(0.1)
    return pids


def verdict_common(name, rc, text, out, remains):
    print(text)
    check(1 <= rc <= 127 and rc != 124, f"{name}: exit status {rc} in 1..127 (124: a hang)")
    check(".partial" not in remains, f"{name}: no partial output left ({remains!r})")
    check(os.path.basename(out) + "\n" not in remains + "\n" and not os.path.exists(out),
          f"{name}: no output folder")
    check(left_processes(out) == [], f"{name}: no perfcell-shard process left")


def disk_full(np):
    """A tmpfs of 1500 KiB (pbmc3k's shards need about 3.5 MB) in a private mount namespace."""
    mnt = os.path.join(TMP, f"mnt{np}")
    os.makedirs(mnt, exist_ok=True)
    out = os.path.join(mnt, "shards")
    cmd = build_args(out, "--shard-cells", "1000")
    if np > 1:
        cmd = mpi(np, cmd)
    script = ('mount -t tmpfs -o size=1500k tmpfs "$0" || exit 99; timeout %d "$@"; rc=$?; '
              'echo "REMAINS:$(ls -A "$0" | tr "\\n" " ")"; exit $rc' % LIMIT)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, mnt] + cmd,
                       capture_output=True, text=True, timeout=LIMIT + 30)
    text = r.stdout + r.stderr
    remains = text.split("REMAINS:")[-1].split("\n")[0] if "REMAINS:" in text else "?"
    name = f"disk full, {np} rank(s)"
    check(r.returncode != 99, f"{name}: the tmpfs was mounted")
    check("No space left on device" in text, f"{name}: the message gives the OS error")
    check(any(f"shard '{out}.partial/shard-" in l and "No space left on device" in l
              for l in text.splitlines()), f"{name}: one message names the shard file and the cause")
    verdict_common(name, r.returncode, text, out, remains)


def fsize(np):
    """A 1.5 MB file size limit; one shard of all 2638 cells is about 3 MB."""
    out = os.path.join(TMP, f"fsize{np}")
    limit = ["prlimit", "--fsize=1500000"]
    cmd = build_args(out, "--shard-cells", "5000")
    env = dict(os.environ)
    if np > 1:
        # The limit on the ranks (mpirun's own PMIx segments are larger than that).
        cmd = ["timeout", str(LIMIT)] + mpi(np, limit + cmd)
    else:
        # As after `ulimit -f`; PMIx's hash store keeps the singleton's set-up under it.
        env["PMIX_MCA_gds"] = "hash"
        cmd = limit + ["timeout", str(LIMIT)] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LIMIT + 30)
    text = r.stdout + r.stderr
    name = f"file size limit, {np} rank(s)"
    check(r.returncode != 153 and "signal 25" not in text, f"{name}: not killed by SIGXFSZ")
    check(any(f"shard '{out}.partial/shard-00000.h5ad'" in l and "File too large" in l
              for l in text.splitlines()), f"{name}: the message names the shard and 'File too large'")
    remains = " ".join(os.listdir(TMP))
    verdict_common(name, r.returncode, text, out, remains)


def rank_pids(out):
    r = subprocess.run(["pgrep", "-f", out], capture_output=True, text=True)
    pids = []
    for p in r.stdout.split():
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip() == "perfcell-shard":
                    pids.append(int(p))
        except OSError:
            pass
    return sorted(pids)


def signal_build(target, sig):
    out = os.path.join(TMP, f"sig_{target}_{sig}")
    signum = getattr(signal, "SIG" + sig)
    # Small pieces and shards, slow compression: the build takes seconds after
    # its second shard appears (a busy machine must not let it finish first),
    # with many points to stop at.
    cmd = build_args(out, "--shard-cells", "100", "--piece-cells", "10", "--level", "19")
    np = 1 if target == "single" else 2
    if np > 1:
        cmd = mpi(np, cmd)
    vocab()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    name = f"SIG{sig} to {target}"
    marker = os.path.join(out + ".partial", "shard-00001.h5ad")
    t0 = time.time()
    while not os.path.exists(marker) and p.poll() is None and time.time() - t0 < LIMIT:
        time.sleep(0.05)
    check(p.poll() is None, f"{name}: signalled mid-build")
    if target == "rank":
        pids = rank_pids(out)
        check(len(pids) == 2, f"{name}: two ranks found ({pids})")
        if pids:
            os.kill(pids[-1], signum)
    else:
        p.send_signal(signum)
    try:
        text, _ = p.communicate(timeout=LIMIT)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        text, _ = p.communicate()
        rc = 124
    check("stopped by SIG" in text, f"{name}: the message says the build was stopped")
    check(f"removed the partial output '{out}.partial'" in text, f"{name}: the message says the partial output was removed")
    verdict_common(name, rc, text, out, " ".join(os.listdir(TMP)))


def tcp():
    """TCP only: ob1 over the tcp BTL, no shared-memory collectives (coll sm/han) or
    shared file pointers (sharedfp sm); the shards must hold the same cells."""
    import h5py
    import numpy as np
    outs = {}
    for kind, mca in (("default", []),
                      ("tcp", ["--mca", "pml", "ob1", "--mca", "btl", "self,tcp",
                               "--mca", "coll", "^sm,han", "--mca", "sharedfp", "^sm"])):
        out = os.path.join(TMP, kind)
        r = subprocess.run(["timeout", str(LIMIT)] + MPIRUN + mca + ["-np", "2"] +
                           build_args(out, "--shard-cells", "1000", "--piece-cells", "300"),
                           capture_output=True, text=True)
        print(r.stdout + r.stderr)
        check(r.returncode == 0, f"{kind} 2-rank build")
        v = subprocess.run([os.path.join(BIN, "perfcell-inspect"), out, "--verify"],
                           capture_output=True, text=True, timeout=LIMIT)
        check(v.returncode == 0, f"{kind}: perfcell-inspect --verify ({v.stdout[-300:]}{v.stderr[-300:]})")
        outs[kind] = out
    if failures:
        return
    names = sorted(n for n in os.listdir(outs["default"]) if n.endswith(".h5ad"))
    check(names == sorted(n for n in os.listdir(outs["tcp"]) if n.endswith(".h5ad")) and len(names) == 3,
          f"same shard files ({names})")
    keys = ["X/data", "X/indices", "X/indptr", "obs/cell_id", "obs/total_counts", "obs/dataset/codes",
            "obs/cell", "var/gene"]
    for n in names:
        with h5py.File(os.path.join(outs["default"], n)) as a, h5py.File(os.path.join(outs["tcp"], n)) as b:
            for k in keys:
                check(np.array_equal(a[k][()], b[k][()]), f"{n} {k} identical over TCP")


def main():
    os.makedirs(TMP, exist_ok=True)
    what = sys.argv[1]
    if what == "disk-full":
        disk_full(int(sys.argv[2]))
    elif what == "fsize":
        fsize(int(sys.argv[2]))
    elif what == "signal":
        signal_build(sys.argv[2], sys.argv[3])
    elif what == "tcp":
        tcp()
    else:
        sys.exit(f"unknown test {what}")
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
