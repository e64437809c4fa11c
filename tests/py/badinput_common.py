"""Shared fixtures and checks of the bad-input tests (tests/py/badinput_*.py).

Every case runs one perfcell program on a bad input and passes when the
program refuses it properly:

  - it exits with a non-zero status of its own: not killed by a signal, not
    stopped by the time limit (a hang), no sanitizer report in its output
    (`make test DEBUG=1` runs the ASan/UBSan programs);
  - its message names the file at fault and says what is wrong (each case
    lists the words it expects);
  - it leaves no partial output: the output file or folder it was asked to
    write does not exist, and files that existed before (a good checkpoint, a
    previous shard folder) are unchanged byte for byte. For training runs the
    output is the run folder's checkpoints: a failed start must leave no
    checkpoint and no `latest` pointer that a later `--resume auto` or
    `predict --checkpoint RUN_DIR/best` could pick up.

Fixtures (real pbmc3k cells; built once per test run, under
$TMPROOT/badinput-fixtures, with the programs under test):
  vocab.tsv, shards/          pbmc3k, 3 shards of 1000 cells, labels 'celltype'
  pre/checkpoints/ckpt-00000002.h5   2 steps of tiny pretraining (configs/tiny.ini)
  ft/best/ckpt-*.h5           1 epoch of fine-tuning from it
  shards_nolabels/            the same cells without labels
  vocab_min10.tsv, shards_vocab_min10/   genes in >= 10 cells only: another vocabulary
  empty.h5ad                  pbmc3k with 0 cells
  shards_empty/               a manifest that lists no shard

Environment (tests/run.sh): BIN, MPIRUN, DATA, TEST_TMP, TMPROOT.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.abspath(os.path.join(ROOT, os.environ.get("BIN", "bin")))
DATA = os.environ.get("DATA", os.path.join(ROOT, "..", "shared", "data"))
TMP = os.environ.get("TEST_TMP", "/tmp")
TMPROOT = os.environ.get("TMPROOT", TMP)
MPIRUN = os.environ.get("MPIRUN", "mpirun --oversubscribe --bind-to none").split()
TINY = os.path.join(ROOT, "configs", "tiny.ini")
PBMC = os.path.join(DATA, "pbmc3k", "pbmc3k_counts.h5ad")
LOGNORM = os.path.join(DATA, "other", "pbmc68k_reduced_lognorm.h5ad")
FIX = os.path.join(TMPROOT, "badinput-fixtures")

SHARD = os.path.join(BIN, "perfcell-shard")
INSPECT = os.path.join(BIN, "perfcell-inspect")
PERFCELL = os.path.join(BIN, "perfcell")

# A limit far above what any case needs (each takes seconds): a program that
# reaches it hangs.
TIME_LIMIT = 120

# What a crash or a sanitizer leaves in the output.
CRASH_SIGNS = re.compile(
    r"AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|runtime error:|"
    r"Segmentation fault|core dumped|exited on signal|received signal|Aborted")


def env():
    e = dict(os.environ)
    e.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    e.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    e.setdefault("OPENBLAS_NUM_THREADS", "1")
    return e


def sh(cmd, **kw):
    """Run a fixture command that must succeed."""
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                       timeout=600, **kw)
    if r.returncode != 0:
        print(r.stdout)
        raise SystemExit("fixture command failed (%d): %s" % (r.returncode, " ".join(cmd)))
    return r.stdout


def pretrain_cmd(*args, np_=1, config=TINY):
    return MPIRUN + ["-np", str(np_), PERFCELL, "pretrain", "--config", config] + list(args)


def finetune_cmd(*args):
    return [PERFCELL, "finetune", "--config", TINY] + list(args)


# ---------------------------------------------------------------------------
# Fixtures

def fixtures():
    """Build the fixtures once (the first case of a test run pays for them)."""
    if os.path.exists(os.path.join(FIX, "done")):
        return FIX
    tmp = FIX + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    j = lambda *p: os.path.join(tmp, *p)
    sh([SHARD, "vocab", PBMC, "--out", j("vocab.tsv"), "--quiet"])
    sh([SHARD, "build", PBMC, "--vocab", j("vocab.tsv"), "--out", j("shards"), "--shard-cells", "1000",
        "--label-key", "celltype", "--quiet"])
    sh([SHARD, "build", PBMC, "--vocab", j("vocab.tsv"), "--out", j("shards_nolabels"), "--shard-cells", "1000",
        "--quiet"])
    sh([SHARD, "vocab", PBMC, "--out", j("vocab_min10.tsv"), "--min-cells", "10", "--quiet"])
    sh([SHARD, "build", PBMC, "--vocab", j("vocab_min10.tsv"), "--out", j("shards_vocab_min10"),
        "--shard-cells", "1000", "--label-key", "celltype", "--quiet"])
    sh(pretrain_cmd("data.shards=" + j("shards"), "run.dir=" + j("pre"), "run.max_steps=2"))
    sh(finetune_cmd("--init", j("pre", "checkpoints", "ckpt-00000002.h5"), "data.shards=" + j("shards"),
                    "run.dir=" + j("ft"), "finetune.epochs=1", "batch.global_batch=12"))
    # An .h5ad with the genes and columns of pbmc3k and no cell.
    sh([sys.executable, "-c",
        "import anndata, sys; a = anndata.read_h5ad(sys.argv[1]); a[:0].copy().write_h5ad(sys.argv[2])",
        PBMC, j("empty.h5ad")])
    # A shard folder whose manifest lists no shard (the header of a real one).
    os.makedirs(j("shards_empty"))
    shutil.copy(j("shards", "vocab.tsv"), j("shards_empty", "vocab.tsv"))
    keep = []
    for line in open(j("shards", "manifest.tsv")):
        if line.startswith(("#label\t", "#dataset\t")):
            continue
        if line.startswith(("#n_cells\t", "#nnz\t")):
            line = line.split("\t")[0] + "\t0\n"
        keep.append(line)
        if line.startswith("file\t"):
            break
    open(j("shards_empty", "manifest.tsv"), "w").write("".join(keep))
    open(j("done"), "w").write("ok\n")
    shutil.rmtree(FIX, ignore_errors=True)
    os.rename(tmp, FIX)
    return FIX


def fix(*p):
    return os.path.join(fixtures(), *p)


def pre_ckpt():
    return fix("pre", "checkpoints", "ckpt-00000002.h5")


def ft_ckpt():
    best = sorted(f for f in os.listdir(fix("ft", "best")) if f.endswith(".h5"))
    return fix("ft", "best", best[-1])


# ---------------------------------------------------------------------------
# Damage

def scratch(name):
    p = os.path.join(TMP, name)
    if os.path.isdir(p):
        shutil.rmtree(p)
    elif os.path.exists(p):
        os.remove(p)
    return p


def copy_tree(src, name):
    d = scratch(name)
    shutil.copytree(src, d)
    return d


def copy_file(src, name):
    d = scratch(name)
    shutil.copyfile(src, d)
    return d


def truncate(path, keep_fraction=0.5):
    os.truncate(path, int(os.path.getsize(path) * keep_fraction))


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def tensor_offset(path, name):
    """File offset of the middle of a checkpoint tensor's stored values."""
    import h5py
    with h5py.File(path, "r") as f:
        d = f[name]
        return d.id.get_offset() + d.id.get_storage_size() // 2


def digest(path):
    """sha256 of a file, or of every file of a folder (name and content)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(root, f)
                h.update(os.path.relpath(p, path).encode() + b"\0")
                h.update(open(p, "rb").read())
    else:
        h.update(open(path, "rb").read())
    return h.hexdigest()


def checkpoints_in(run_dir):
    """Checkpoint files and pointers a later resume or predict could pick up."""
    found = []
    for root, _, files in os.walk(run_dir):
        found += [os.path.join(root, f) for f in files if f.endswith(".h5") or f == "latest"]
    return sorted(found)


# ---------------------------------------------------------------------------
# The check

def expect_refusal(cmd, names, words, absent=(), intact=(), no_checkpoints=()):
    """Run cmd: it must refuse the input as described in the module doc.

    names: paths (or file names) of which at least one must appear in the message.
    words: regular expressions (case-insensitive) that must all match the
           message outside its paths.
    absent: outputs that must not exist afterwards.
    intact: files or folders that must be unchanged.
    no_checkpoints: run folders that must hold no checkpoint afterwards.
    """
    before = {p: digest(p) for p in intact}
    print("$", " ".join(cmd), flush=True)
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                           timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired as e:
        print(e.stdout or "")
        fail("no answer within %d s: the program hangs" % TIME_LIMIT)
    out = r.stdout
    print(out)
    problems = []
    if r.returncode == 0:
        problems.append("exit status 0: the bad input was accepted")
    elif r.returncode < 0 or r.returncode > 128:
        problems.append("killed by a signal (status %d)" % r.returncode)
    if CRASH_SIGNS.search(out):
        problems.append("a crash or sanitizer report in the output: %r" % CRASH_SIGNS.search(out).group(0))
    if names and not any(n in out for n in names):
        problems.append("the message names none of %s" % ", ".join(names))
    # Words are looked for outside paths (the scratch copies are named after
    # the damage done to them).
    text = re.sub(r"(/[\w.+-]+)+", "<path>", out)
    for w in words:
        if not re.search(w, text, re.IGNORECASE):
            problems.append("the message does not say /%s/" % w)
    for p in absent:
        if os.path.exists(p):
            problems.append("partial output left behind: %s" % p)
    for p, h in before.items():
        if not os.path.exists(p) or digest(p) != h:
            problems.append("changed by the failed run: %s" % p)
    for d in no_checkpoints:
        if os.path.exists(d) and checkpoints_in(d):
            problems.append("checkpoints left by the failed run: %s" % ", ".join(checkpoints_in(d)))
    if problems:
        fail("; ".join(problems))
    print("OK: refused with status %d" % r.returncode)


def fail(msg):
    print("FAIL:", msg, file=sys.stderr)
    sys.exit(1)


def main(cases, argv):
    if len(argv) == 2 and argv[1] == "--list":
        print("\n".join(cases))
        return
    if len(argv) != 2 or argv[1] not in cases:
        sys.exit("usage: %s CASE\ncases: %s" % (argv[0], " ".join(sorted(cases))))
    cases[argv[1]]()
