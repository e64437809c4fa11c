#!/usr/bin/env python3
"""Bad shards and bad inputs: damaged shard folders (perfcell-inspect --verify
and pretraining on them), non-count matrices, empty inputs, missing files,
missing label columns. What a case checks: tests/py/badinput_common.py.

    /usr/bin/python3 tests/py/badinput_shards.py CASE
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from badinput_common import (INSPECT, LOGNORM, PBMC, PERFCELL, SHARD, copy_tree, expect_refusal, fix,
                             flip_byte, ft_ckpt, main, pretrain_cmd, finetune_cmd, pre_ckpt, scratch,
                             truncate)

VICTIM = "shard-00001.h5ad"


def damaged(kind):
    d = copy_tree(fix("shards"), "shards_" + kind)
    p = os.path.join(d, VICTIM)
    if kind == "truncated":
        truncate(p)
    else:
        flip_byte(p, os.path.getsize(p) // 2)
    return d


# Damaged shard folders ------------------------------------------------------

def shard_truncated_inspect():
    d = damaged("truncated")
    expect_refusal([INSPECT, d, "--verify"], [VICTIM], [r"truncat"])


def shard_bitflip_inspect():
    d = damaged("bitflip")
    expect_refusal([INSPECT, d, "--verify"], [VICTIM], [r"corrupt|CRC"])


def shard_truncated_file_inspect():
    # The damaged file alone (no manifest to compare with): HDF5 must fail
    # cleanly on it.
    d = damaged("truncated")
    p = os.path.join(d, VICTIM)
    expect_refusal([INSPECT, p, "--verify"], [VICTIM], [r"truncat|corrupt|cannot (open|read)|not an HDF5"])


def shard_truncated_pretrain():
    d = damaged("truncated")
    run = scratch("run")
    expect_refusal(pretrain_cmd("data.shards=" + d, "run.dir=" + run, "run.max_steps=2"), [VICTIM],
                   [r"truncat"], no_checkpoints=[run])


def shard_bitflip_pretrain():
    d = damaged("bitflip")
    run = scratch("run")
    expect_refusal(pretrain_cmd("data.shards=" + d, "run.dir=" + run, "run.max_steps=2"), [VICTIM],
                   [r"corrupt|CRC"], no_checkpoints=[run])


# Inputs that are not counts -------------------------------------------------

def noncounts_shard_build():
    out = scratch("shards_out")
    expect_refusal([SHARD, "build", LOGNORM, "--vocab", fix("vocab.tsv"), "--out", out], [LOGNORM],
                   [r"not (hold )?raw counts|not counts", r"\bX\b"], absent=[out])


def noncounts_predict():
    out = scratch("pred.tsv")
    expect_refusal([PERFCELL, "predict", "--checkpoint", ft_ckpt(), "--input", LOGNORM, "--out", out], [LOGNORM],
                   [r"not (hold )?raw counts|not counts"], absent=[out])


# Empty inputs ---------------------------------------------------------------

def empty_h5ad_build():
    out = scratch("shards_out")
    src = fix("empty.h5ad")
    expect_refusal([SHARD, "build", src, "--vocab", fix("vocab.tsv"), "--out", out], [src],
                   [r"no cells|0 cells|empty"], absent=[out])


def empty_manifest_inspect():
    d = fix("shards_empty")
    expect_refusal([INSPECT, d, "--verify"], [d], [r"no shard|no cells|empty"])


def empty_manifest_pretrain():
    d = fix("shards_empty")
    run = scratch("run")
    expect_refusal(pretrain_cmd("data.shards=" + d, "run.dir=" + run, "run.max_steps=2"), [d],
                   [r"no shard|no cells|empty"], no_checkpoints=[run])


# Missing files --------------------------------------------------------------

def missing_input_build():
    out = scratch("shards_out")
    src = os.path.join(os.path.dirname(PBMC), "no_such_file.h5ad")
    expect_refusal([SHARD, "build", src, "--vocab", fix("vocab.tsv"), "--out", out], [src],
                   [r"does not exist|no such file|cannot open"], absent=[out])


def missing_vocab_build():
    out = scratch("shards_out")
    v = fix("no_such_vocab.tsv")
    expect_refusal([SHARD, "build", PBMC, "--vocab", v, "--out", out], [v],
                   [r"does not exist|no such file|cannot (open|read)"], absent=[out])


def missing_input_predict():
    out = scratch("pred.tsv")
    src = os.path.join(os.path.dirname(PBMC), "no_such_file.h5ad")
    expect_refusal([PERFCELL, "predict", "--checkpoint", ft_ckpt(), "--input", src, "--out", out], [src],
                   [r"does not exist|no such file|cannot open"], absent=[out])


def missing_shards_pretrain():
    d = fix("no_such_shards")
    run = scratch("run")
    expect_refusal(pretrain_cmd("data.shards=" + d, "run.dir=" + run, "run.max_steps=2"), [d],
                   [r"no such folder|does not exist|not a shard folder"], no_checkpoints=[run])


# Labels ---------------------------------------------------------------------

def label_key_missing_build():
    out = scratch("shards_out")
    expect_refusal([SHARD, "build", PBMC, "--vocab", fix("vocab.tsv"), "--out", out, "--label-key", "nope"],
                   [PBMC], [r"'nope'|\bnope\b", r"column|obs"], absent=[out])


def finetune_no_labels():
    d = fix("shards_nolabels")
    run = scratch("run")
    expect_refusal(finetune_cmd("--init", pre_ckpt(), "data.shards=" + d, "run.dir=" + run, "finetune.epochs=1",
                                "batch.global_batch=12"), [d], [r"label"], no_checkpoints=[run])


# An existing output is never half-replaced -----------------------------------

def build_over_existing_output():
    # A good shard folder at --out stays as it was when the build fails.
    out = copy_tree(fix("shards"), "shards_prev")
    expect_refusal([SHARD, "build", LOGNORM, "--vocab", fix("vocab.tsv"), "--out", out, "--force"], [LOGNORM],
                   [r"not (hold )?raw counts|not counts"], intact=[out])


CASES = {f.__name__: f for f in [
    shard_truncated_inspect, shard_bitflip_inspect, shard_truncated_file_inspect, shard_truncated_pretrain,
    shard_bitflip_pretrain, noncounts_shard_build, noncounts_predict, empty_h5ad_build, empty_manifest_inspect,
    empty_manifest_pretrain, missing_input_build, missing_vocab_build, missing_input_predict,
    missing_shards_pretrain, label_key_missing_build, finetune_no_labels, build_over_existing_output]}

if __name__ == "__main__":
    main(CASES, sys.argv)
