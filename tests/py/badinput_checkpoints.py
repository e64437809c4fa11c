#!/usr/bin/env python3
"""Bad checkpoints: truncated and bit-flipped files (resuming a pretraining
run, predicting), a checkpoint of another vocabulary than the shards
(fine-tuning, predicting), of another model size (resuming, fine-tuning), and
missing checkpoint files. What a case checks: tests/py/badinput_common.py.

    /usr/bin/python3 tests/py/badinput_checkpoints.py CASE
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from badinput_common import (PERFCELL, copy_file, copy_tree, expect_refusal, finetune_cmd, fix, flip_byte,
                             ft_ckpt, main, pre_ckpt, pretrain_cmd, scratch, tensor_offset, truncate)

BAD = "ckpt-bad.h5"
# A tensor every checkpoint of the tiny model holds.
TENSOR = "model/to_out.weight"


def resume_run(kind):
    """A copy of the pretraining run folder and a damaged copy of its
    checkpoint beside it (the run's own checkpoints stay good)."""
    run = copy_tree(fix("pre"), "run_" + kind)
    bad = os.path.join(run, BAD)
    shutil.copyfile(pre_ckpt(), bad)
    damage(bad, kind)
    return run, bad


def damage(path, kind):
    if kind == "truncated":
        truncate(path)
    else:
        import h5py
        with h5py.File(path, "r") as f:
            name = TENSOR if TENSOR in f else "model/" + sorted(f["model"])[0]
        flip_byte(path, tensor_offset(path, name))


def ckpt_resume(kind, words):
    run, bad = resume_run(kind)
    good = os.path.join(run, "checkpoints")
    expect_refusal(pretrain_cmd("--resume", bad, "data.shards=" + fix("shards"), "run.dir=" + run,
                                "run.max_steps=4"),
                   [BAD], words, intact=[good])


def ckpt_truncated_resume():
    ckpt_resume("truncated", [r"truncat|corrupt|not an HDF5|cannot (open|read)"])


def ckpt_bitflip_resume():
    ckpt_resume("bitflip", [r"CRC|checksum|corrupt"])


def ckpt_predict(kind, words):
    bad = copy_file(ft_ckpt(), BAD)
    damage(bad, kind)
    out = scratch("pred.tsv")
    expect_refusal([PERFCELL, "predict", "--checkpoint", bad, "--input", fix("shards"), "--out", out], [BAD],
                   words, absent=[out])


def ckpt_truncated_predict():
    ckpt_predict("truncated", [r"truncat|corrupt|not an HDF5|cannot (open|read)"])


def ckpt_bitflip_predict():
    ckpt_predict("bitflip", [r"CRC|checksum|corrupt"])


# Another vocabulary ---------------------------------------------------------

def vocab_mismatch_finetune():
    d = fix("shards_vocab_min10")
    run = scratch("run")
    expect_refusal(finetune_cmd("--init", pre_ckpt(), "data.shards=" + d, "run.dir=" + run, "finetune.epochs=1",
                                "batch.global_batch=12"),
                   [os.path.basename(pre_ckpt()), d], [r"vocabular"], no_checkpoints=[run])


def vocab_mismatch_predict():
    d = fix("shards_vocab_min10")
    out = scratch("pred.tsv")
    expect_refusal([PERFCELL, "predict", "--checkpoint", ft_ckpt(), "--input", d, "--out", out],
                   [os.path.basename(ft_ckpt()), d], [r"vocabular"], absent=[out])


# Another model size ---------------------------------------------------------

def model_size_resume():
    run = copy_tree(fix("pre"), "run_dim32")
    expect_refusal(pretrain_cmd("--resume", "auto", "data.shards=" + fix("shards"), "run.dir=" + run,
                                "run.max_steps=4", "model.dim=32"),
                   ["ckpt-00000002.h5"], [r"model\.dim|\bdim\b|shape"], intact=[os.path.join(run, "checkpoints")])


def model_size_finetune():
    run = scratch("run")
    expect_refusal(finetune_cmd("--init", pre_ckpt(), "data.shards=" + fix("shards"), "run.dir=" + run,
                                "finetune.epochs=1", "batch.global_batch=12", "model.dim=32"),
                   ["ckpt-00000002.h5"], [r"model\.dim|\bdim\b|shape"], no_checkpoints=[run])


# Missing checkpoints --------------------------------------------------------

def missing_checkpoint_resume():
    run = copy_tree(fix("pre"), "run_missing")
    p = os.path.join(run, "no_such_ckpt.h5")
    expect_refusal(pretrain_cmd("--resume", p, "data.shards=" + fix("shards"), "run.dir=" + run, "run.max_steps=4"),
                   [p], [r"does not exist|no such file|cannot (open|read)|not found"],
                   intact=[os.path.join(run, "checkpoints")])


def missing_checkpoint_init():
    p = fix("no_such_ckpt.h5")
    run = scratch("run")
    expect_refusal(finetune_cmd("--init", p, "data.shards=" + fix("shards"), "run.dir=" + run, "finetune.epochs=1"),
                   [p], [r"does not exist|no such file|cannot (open|read)|not found"], no_checkpoints=[run])


def missing_checkpoint_predict():
    p = fix("no_such_ckpt.h5")
    out = scratch("pred.tsv")
    expect_refusal([PERFCELL, "predict", "--checkpoint", p, "--input", fix("shards"), "--out", out], [p],
                   [r"does not exist|no such file|cannot (open|read)|not found"], absent=[out])


CASES = {f.__name__: f for f in [
    ckpt_truncated_resume, ckpt_bitflip_resume, ckpt_truncated_predict, ckpt_bitflip_predict,
    vocab_mismatch_finetune, vocab_mismatch_predict, model_size_resume, model_size_finetune,
    missing_checkpoint_resume, missing_checkpoint_init, missing_checkpoint_predict]}

if __name__ == "__main__":
    main(CASES, sys.argv)
