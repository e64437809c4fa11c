#!/usr/bin/env python3
"""Bad configurations: unknown keys (in the file and on the command line, with
the nearest valid key suggested), a missing config file, a value of the wrong
type. What a case checks: tests/py/badinput_common.py.

    /usr/bin/python3 tests/py/badinput_config.py CASE
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from badinput_common import (finetune_cmd, PERFCELL, TINY, expect_refusal, fix, main, pretrain_cmd, scratch)


def config_with(name, old, new):
    """configs/tiny.ini with one line replaced."""
    text = open(TINY).read()
    assert old in text, old
    p = scratch(name)
    open(p, "w").write(text.replace(old, new, 1))
    return p


def unknown_key_file():
    cfg = config_with("typo.ini", "dim = 16\n", "dimm = 16\n")
    line = open(cfg).read().split("\n").index("dimm = 16") + 1
    run = scratch("run")
    expect_refusal(pretrain_cmd("data.shards=" + fix("shards"), "run.dir=" + run, config=cfg),
                   ["%s:%d" % (cfg, line)], [r"unknown key 'model\.dimm'", r"did you mean 'model\.dim'"],
                   absent=[run])


def unknown_key_override():
    run = scratch("run")
    expect_refusal(pretrain_cmd("data.shards=" + fix("shards"), "run.dir=" + run, "optim.lrate=1e-3"),
                   ["optim.lrate"], [r"unknown key", r"did you mean 'optim\.lr'"], absent=[run])


def unknown_section_key():
    # A key in the wrong section: the suggestion names the right one.
    cfg = config_with("section.ini", "[batch]\n", "[batch]\nmax_steps = 6\n")
    run = scratch("run")
    expect_refusal(pretrain_cmd("data.shards=" + fix("shards"), "run.dir=" + run, config=cfg),
                   [cfg], [r"unknown key 'batch\.max_steps'", r"did you mean 'run\.max_steps'"], absent=[run])


def bad_value_type():
    cfg = config_with("value.ini", "dim = 16\n", "dim = sixteen\n")
    run = scratch("run")
    expect_refusal(pretrain_cmd("data.shards=" + fix("shards"), "run.dir=" + run, config=cfg),
                   [cfg], [r"model\.dim", r"not an integer"], absent=[run])


def missing_config():
    cfg = scratch("no_such_config.ini")
    run = scratch("run")
    expect_refusal(pretrain_cmd("data.shards=" + fix("shards"), "run.dir=" + run, config=cfg),
                   [cfg], [r"cannot read|does not exist|no such file"], absent=[run])


def missing_config_finetune():
    cfg = scratch("no_such_config.ini")
    run = scratch("run")
    expect_refusal([PERFCELL, "finetune", "--config", cfg, "--init", fix("pre", "checkpoints", "ckpt-00000002.h5"),
                    "data.shards=" + fix("shards"), "run.dir=" + run],
                   [cfg], [r"cannot read|does not exist|no such file"], absent=[run])


def lbfgs_refusal(head, freeze, words):
    """finetune.solver = lbfgs with a head and freezing policy it cannot train."""
    run = scratch("run")
    expect_refusal(finetune_cmd("--init", fix("pre", "checkpoints", "ckpt-00000002.h5"), "data.shards=" + fix("shards"),
                                "run.dir=" + run, "finetune.solver=lbfgs", f"finetune.head={head}",
                                f"finetune.freeze={freeze}", "batch.global_batch=12"),
                   ["finetune.solver"], words, no_checkpoints=[run])


def lbfgs_trainable_encoder():
    """L-BFGS needs the frozen encoder's cached hidden states."""
    lbfgs_refusal("linear", "scbert", [r"cached hidden states", r"finetune\.freeze"])


def lbfgs_pooled_head():
    lbfgs_refusal("pooled", "all", [r"linear head", r"pooled"])


CASES = {f.__name__: f for f in [
    unknown_key_file, unknown_key_override, unknown_section_key, bad_value_type, missing_config,
    missing_config_finetune, lbfgs_trainable_encoder, lbfgs_pooled_head]}

if __name__ == "__main__":
    main(CASES, sys.argv)
