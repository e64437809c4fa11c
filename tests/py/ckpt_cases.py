#!/usr/bin/env python3
"""Checkpoint checks and resume settings: values without a CRC of their own
edited with h5py (root attributes, /state attributes, tensor attributes),
NaN/Inf weights under a recomputed CRC, a damaged root object header,
checkpoints written before the root checksum, a resume with another batch
geometry or other optimizer settings, a key given twice (INI file, command
line), and the hint of a missing label column in predict/embed.

Refusals are checked as in tests/py/badinput_common.py (message naming the
file, status 1..127, no crash, no partial output, the run's own checkpoints
unchanged); the fixtures (pbmc3k shards, 2 steps of tiny pretraining, 1
epoch of fine-tuning) are those of the bad-input tests, built once per run.

    /usr/bin/python3 tests/py/ckpt_cases.py CASE
"""
import math
import os
import re
import shutil
import subprocess
import sys
import zlib

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from badinput_common import (CRASH_SIGNS, INSPECT, PBMC, PERFCELL, ROOT, TINY, copy_file, copy_tree, digest, env,
                             expect_refusal, fail, finetune_cmd, fix, ft_ckpt, main, pre_ckpt, pretrain_cmd, scratch)

TIME_LIMIT = 300
# A checkpoint written by perfcell before the root checksum (the fuzz seed
# made by tests/fuzz/make_corpus.py at that time), kept as it was.
OLD_CKPT = os.path.join(ROOT, "tests", "data", "ckpt_before_root_crc.h5")
# A tensor of the encoder: every checkpoint of the tiny model holds it.
TENSOR = "model/performer.net.layers.1.0.fn.to_out.weight"


def run_logged(cmd):
    """Run cmd (bounded by TIME_LIMIT), print its command line and output."""
    print("$", " ".join(cmd), flush=True)
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                           timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired as e:
        print(e.stdout or "")
        fail("no answer within %d s: the program hangs" % TIME_LIMIT)
    print(r.stdout)
    return r


def run(cmd, expect_ok=True):
    r = run_logged(cmd)
    if expect_ok and r.returncode != 0:
        fail("exit status %d, expected 0" % r.returncode)
    return r.stdout


def refused(cmd, parts, absent=(), intact=()):
    """Like expect_refusal, for messages whose words are paths (tensor names):
    every string of `parts` must appear in the output as is. Returns it."""
    before = {p: digest(p) for p in intact}
    r = run_logged(cmd)
    problems = []
    if not 0 < r.returncode < 128:
        problems.append("exit status %d, expected 1..127" % r.returncode)
    if CRASH_SIGNS.search(r.stdout):
        problems.append("a crash or sanitizer report in the output")
    problems += ["the message does not say %r" % w for w in parts if w not in r.stdout]
    problems += ["partial output left behind: " + p for p in absent if os.path.exists(p)]
    problems += ["changed by the failed run: " + p for p, h in before.items() if not os.path.exists(p) or digest(p) != h]
    if problems:
        fail("; ".join(problems))
    return r.stdout


# ---------------------------------------------------------------------------
# Edits with h5py

def set_attr(path, obj, name, value):
    with h5py.File(path, "r+") as f:
        o = f[obj]
        if isinstance(value, bytes):
            # Fixed-length, as perfcell writes string attributes.
            o.attrs.create(name, np.bytes_(value), dtype=h5py.string_dtype("utf-8", len(value)))
        else:
            o.attrs[name] = np.asarray(value, dtype=np.asarray(o.attrs[name]).dtype)


def crc_f32(x):
    return zlib.crc32(np.ascontiguousarray(x, dtype="<f4").tobytes()) & 0xFFFFFFFF


def poison(path, name, value, index):
    """Write `value` into tensor `name` at flat `index` and store the CRC-32
    of the new bytes: the tensor's own check passes."""
    with h5py.File(path, "r+") as f:
        d = f[name]
        x = d[()]
        x.flat[index] = value
        d[...] = x
        d.attrs["crc32"] = np.uint32(crc_f32(x))


# Values a resume reads that carry no CRC of their own: (object, attribute, new value).
EDITS = [
    ("/", "step", 7),
    ("/", "epoch", 3),
    ("/", "seed", 99),
    ("/", "kind", b"finetune"),
    ("/", "created", b"2001-01-01T00:00:00Z"),
    ("/state", "redraw_index", 5),
    ("/state", "feature_seed", 12345),
    ("/state", "cells_seen", 1e9),
    ("/state", "tokens_seen", 0.0),
    ("/" + TENSOR, "trainable", 0),
    ("/" + TENSOR, "decay", 0),
]


def edit_verify():
    """Each edit alone: --verify must call the checkpoint corrupt."""
    bad = []
    for obj, name, value in EDITS:
        p = copy_file(pre_ckpt(), "ckpt-edit.h5")
        set_attr(p, obj, name, value)
        print("# %s attribute %s = %r" % (obj, name, value))
        r = subprocess.run([INSPECT, p, "--verify"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env(), timeout=TIME_LIMIT)
        print(r.stdout)
        # A frozen flag also contradicts the tensor's optimizer moments, which
        # may be found first; the other values only the root checksum covers.
        why = "corrupt checkpoint" if name in ("trainable",) else "root checksum does not match"
        if not (0 < r.returncode < 128 and "corrupt checkpoint '%s'" % p in r.stdout and why in r.stdout):
            bad.append("%s %s (status %d)" % (obj, name, r.returncode))
    if bad:
        fail("--verify accepted or misreported edits of: " + ", ".join(bad))
    print("OK: every edit refused")


def edit_resume(obj, name, value):
    run_dir = copy_tree(fix("pre"), "run_edit")
    ck = os.path.join(run_dir, "checkpoints", "ckpt-00000002.h5")
    set_attr(ck, obj, name, value)
    expect_refusal(pretrain_cmd("--resume", ck, "data.shards=" + fix("shards"), "run.dir=" + run_dir,
                                "run.max_steps=4"),
                   [ck], [r"corrupt checkpoint", r"root checksum"], intact=[os.path.join(run_dir, "checkpoints")])


def edit_step_resume():
    edit_resume("/", "step", 7)


def edit_state_resume():
    edit_resume("/state", "cells_seen", 12345.0)


def edit_step_predict():
    p = copy_file(ft_ckpt(), "ckpt-edit.h5")
    set_attr(p, "/", "step", 1000)
    out = scratch("pred.tsv")
    expect_refusal([PERFCELL, "predict", "--checkpoint", p, "--input", fix("shards"), "--out", out], [p],
                   [r"corrupt checkpoint"], absent=[out])


# ---------------------------------------------------------------------------
# Non-finite weights under a valid CRC

def nan_verify():
    moment = "optim/exp_avg_sq/" + TENSOR.split("/", 1)[1]
    proj = "buffers/performer.net.layers.0.0.fn.fast_attention.projection_matrix"
    for name, value, index, at in [(TENSOR, float("nan"), 5, "[0, 5]"), (proj, float("inf"), 9, "[1, 1]"),
                                   (moment, float("nan"), 0, "[0, 0]")]:
        p = copy_file(pre_ckpt(), "ckpt-nan.h5")
        poison(p, name, value, index)
        refused([INSPECT, p, "--verify"], ["corrupt checkpoint '%s'" % p, "tensor '/%s'" % name,
                                           "holds 1 non-finite value", "first at " + at])


def nan_predict():
    p = copy_file(ft_ckpt(), "ckpt-nan.h5")
    poison(p, TENSOR, float("nan"), 3)
    out = scratch("pred.tsv")
    refused([PERFCELL, "predict", "--checkpoint", p, "--input", fix("shards"), "--out", out],
            [p, "/" + TENSOR, "non-finite"], absent=[out])


def nan_embed():
    p = copy_file(pre_ckpt(), "ckpt-nan.h5")
    poison(p, "model/token_emb.weight", float("-inf"), 0)
    out = scratch("cells.h5ad")
    refused([PERFCELL, "embed", "--checkpoint", p, "--input", fix("shards"), "--out", out],
            [p, "/model/token_emb.weight", "non-finite"], absent=[out])


def nan_finetune_init():
    p = copy_file(pre_ckpt(), "ckpt-nan.h5")
    poison(p, TENSOR, float("nan"), 0)
    run_dir = scratch("run_ft")
    expect_refusal(finetune_cmd("--init", p, "data.shards=" + fix("shards"), "run.dir=" + run_dir,
                                "finetune.epochs=1", "batch.global_batch=12"),
                   [p], [r"non-finite"], no_checkpoints=[run_dir])


def nan_resume():
    run_dir = copy_tree(fix("pre"), "run_nan")
    ck = os.path.join(run_dir, "checkpoints", "ckpt-00000002.h5")
    poison(ck, TENSOR, float("nan"), 1)
    refused(pretrain_cmd("--resume", ck, "data.shards=" + fix("shards"), "run.dir=" + run_dir, "run.max_steps=4"),
            [ck, "/" + TENSOR, "non-finite"], intact=[os.path.join(run_dir, "checkpoints")])


# ---------------------------------------------------------------------------
# A damaged root object header (bytes changed on disk, not through HDF5)

def damage_root(path):
    """Change one byte of the root's 'vocab_hash' attribute value in place:
    the root object header's checksum no longer matches."""
    with h5py.File(path, "r") as f:
        h = f.attrs["vocab_hash"]
    h = h if isinstance(h, bytes) else h.encode()
    data = bytearray(open(path, "rb").read())
    at = data.find(h)
    if at < 0 or data.find(h, at + 1) >= 0:
        fail("the vocabulary hash is not stored once in %s" % path)
    data[at] ^= 0x01
    open(path, "wb").write(bytes(data))


def root_damaged_verify():
    p = copy_file(pre_ckpt(), "ckpt-00000002.h5")
    damage_root(p)
    expect_refusal([INSPECT, p, "--verify"], [p], [r"corrupt checkpoint"])


def root_damaged_other_name():
    """The same damage in a file not named like a checkpoint."""
    p = copy_file(pre_ckpt(), "model.h5")
    damage_root(p)
    expect_refusal([INSPECT, p, "--verify"], [p], [r"corrupt checkpoint"])


def root_damaged_predict():
    p = copy_file(ft_ckpt(), "ckpt-root.h5")
    damage_root(p)
    out = scratch("pred.tsv")
    expect_refusal([PERFCELL, "predict", "--checkpoint", p, "--input", fix("shards"), "--out", out], [p],
                   [r"corrupt checkpoint"], absent=[out])


# ---------------------------------------------------------------------------
# Checkpoints of the format before the root checksum

def unseal(path):
    """A checkpoint of the former format: the same file without the root
    checksum (the only difference between the two formats)."""
    with h5py.File(path, "r+") as f:
        del f.attrs["crc32"]


def old_format_loads():
    """A file written by perfcell before the root checksum, kept as it was,
    and every fuzz seed: --verify accepts them with a note."""
    with h5py.File(OLD_CKPT, "r") as f:
        if "crc32" in f.attrs:
            fail("%s has a root checksum: it is not a file of the former format" % OLD_CKPT)
    out = run([INSPECT, OLD_CKPT, "--verify"])
    if "no root checksum" not in out or "OK" not in out:
        fail("--verify of a checkpoint without root checksum: no note or no OK")
    corpus = os.path.join(ROOT, "tests", "fuzz", "corpus", "checkpoint")
    for name in sorted(os.listdir(corpus)):
        run([INSPECT, os.path.join(corpus, name), "--verify"])
    print("OK: former-format checkpoints verify")


def old_format_resume_predict():
    """Without the root checksum: resume and predict run, with a note."""
    run_dir = copy_tree(fix("pre"), "run_old")
    unseal(os.path.join(run_dir, "checkpoints", "ckpt-00000002.h5"))
    out = run(pretrain_cmd("--resume", "auto", "data.shards=" + fix("shards"), "run.dir=" + run_dir,
                           "run.max_steps=3"))
    if "no root checksum" not in out or "at step 2" not in out:
        fail("the resume of a former-format checkpoint did not note it or did not start at step 2")
    p = copy_file(ft_ckpt(), "ckpt-old.h5")
    unseal(p)
    pred = scratch("pred.tsv")
    out = run([PERFCELL, "predict", "--checkpoint", p, "--input", fix("shards"), "--out", pred])
    if "no root checksum" not in out or not os.path.exists(pred):
        fail("predict with a former-format checkpoint: no note or no output")


# ---------------------------------------------------------------------------
# Resuming with other settings

def geometry_resume():
    for key, value, old in [("batch.micro_batch", "3", "2"), ("batch.global_batch", "24", "12")]:
        run_dir = copy_tree(fix("pre"), "run_geom")
        expect_refusal(pretrain_cmd("--resume", "auto", "data.shards=" + fix("shards"), "run.dir=" + run_dir,
                                    "run.max_steps=4", key + "=" + value),
                       ["ckpt-00000002.h5"],
                       [r"batch\.micro_batch = 2, batch\.global_batch = 12",
                        r"batch\.micro_batch = %s, batch\.global_batch = %s" % (
                            value if key == "batch.micro_batch" else "2",
                            value if key == "batch.global_batch" else "12")],
                       intact=[os.path.join(run_dir, "checkpoints")])


def optim_changed_resume():
    run_dir = copy_tree(fix("pre"), "run_lr")
    # Two ranks: the list is printed by rank 0 only.
    out = run(pretrain_cmd("--resume", "auto", "data.shards=" + fix("shards"), "run.dir=" + run_dir,
                           "run.max_steps=3", "optim.lr=2e-3", "schedule.min_lr=1e-5", "optim.beta2=0.99",
                           "schedule.kind=constant", np_=2))
    want = [r"optim\.lr = 1e-3 .* optim\.lr = 2e-3", r"optim\.beta2 = 0\.999 .* optim\.beta2 = 0\.99\b",
            r"schedule\.kind = cosine .* schedule\.kind = constant"]
    for w in want:
        n = len(re.findall(w, out))
        if n != 1:
            fail("/%s/ printed %d times, expected once" % (w, n))
    # Equal values (min_lr 1e-5 as given in tiny.ini) and untouched keys are not listed.
    if re.search(r"schedule\.min_lr = |optim\.eps = |optim\.weight_decay = ", out):
        fail("an unchanged key is listed as changed")
    print("OK: the changed keys are listed once each")


# ---------------------------------------------------------------------------
# A key given twice

def duplicate_ini_key():
    cfg = scratch("dup.ini")
    lines = open(TINY).read().splitlines()
    i = lines.index("lr = 1e-3")
    lines.insert(i + 2, "LR = 5e-3")
    open(cfg, "w").write("\n".join(lines) + "\n")
    run_dir = scratch("run_dup")
    expect_refusal(pretrain_cmd("data.shards=" + fix("shards"), "run.dir=" + run_dir, "run.max_steps=2",
                                config=cfg),
                   [cfg], [r"twice", r"optim\.lr", r"<path>:%d\b" % (i + 1), r"<path>:%d\b" % (i + 3)],
                   no_checkpoints=[run_dir])


def duplicate_override():
    run_dir = scratch("run_dup")
    expect_refusal(pretrain_cmd("data.shards=" + fix("shards"), "run.dir=" + run_dir, "run.max_steps=2",
                                "optim.lr=1e-3", "optim.lr=5e-3"),
                   ["optim.lr=1e-3", "optim.lr=5e-3"], [r"twice"], no_checkpoints=[run_dir])
    # The same value twice, and an override of a key of the file, are fine.
    run(pretrain_cmd("data.shards=" + fix("shards"), "run.dir=" + run_dir, "run.max_steps=1",
                     "run.max_steps=1", "optim.lr=5e-3"))


# ---------------------------------------------------------------------------
# A missing label column in predict and embed

def missing_label_column(cmd, out):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                       timeout=TIME_LIMIT)
    print(r.stdout)
    if not 0 < r.returncode < 128:
        fail("status %d" % r.returncode)
    hint = [l for l in r.stdout.splitlines() if "HINT" in l]
    if not hint or "--labels" in " ".join(hint) or "--label-key" not in " ".join(hint):
        fail("the hint must name --label-key and not --labels (an option of perfcell-shard): %r" % hint)
    if "no_such_column" not in r.stdout or PBMC not in r.stdout:
        fail("the message must name the file and the column")
    if os.path.exists(out):
        fail("partial output left: " + out)


def label_column_predict():
    out = scratch("pred.tsv")
    missing_label_column([PERFCELL, "predict", "--checkpoint", ft_ckpt(), "--input", PBMC, "--out", out,
                          "--label-key", "no_such_column"], out)


def label_column_embed():
    out = scratch("cells.h5ad")
    missing_label_column([PERFCELL, "embed", "--checkpoint", pre_ckpt(), "--input", PBMC, "--out", out,
                          "--label-key", "no_such_column"], out)


CASES = {f.__name__: f for f in [
    edit_verify, edit_step_resume, edit_state_resume, edit_step_predict,
    nan_verify, nan_predict, nan_embed, nan_finetune_init, nan_resume,
    root_damaged_verify, root_damaged_other_name, root_damaged_predict,
    old_format_loads, old_format_resume_predict, geometry_resume, optim_changed_resume,
    duplicate_ini_key, duplicate_override, label_column_predict, label_column_embed]}

if __name__ == "__main__":
    main(CASES, sys.argv)
