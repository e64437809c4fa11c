#!/usr/bin/python3
"""Bad inputs to the scBERT import / export tools: a clear message, exit status 1,
and no output file (an existing one is left as it was, no temporary file stays).

    interop_errors.py SCRATCH_DIR

Import: tensors missing, tensors perfcell's model has no place for, a
vocabulary of the wrong length or with a duplicate, a label file of the wrong
length, labels missing or given without a head, a wrong --heads, scBERT's head
in nonzero mode, files that are not a state_dict or not PyTorch at all, and
pickled objects other than tensors (refused unless --unsafe-load). Export and
verify: a tensor whose bytes were changed (CRC-32), a file in the HDF5 1.6
format, a variable-length root attribute; perfcell's own reader
(`perfcell embed`, `perfcell-inspect --verify`) refuses the same damaged files.
"""
import argparse
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import torch

from interop_common import (BIN, CLASSES, CONFIG, check, finetune_model, finish, inspect_verify, leftovers,
                            pretrain_model, state_dict, tool, tool_ok, write_cells, write_lines, write_vocab)


def expect_fail(tmp: str, args, out: str, *needles: str) -> None:
    """The tool fails with every needle in its message and leaves `out` untouched."""
    before = open(out, "rb").read() if os.path.exists(out) else None
    rc, stdout, err = tool(args)
    what = " ".join(os.path.basename(a) for a in args[:2])
    check(rc == 1, f"{what}: exit status {rc}, expected 1")
    check(err.startswith("error: "), f"{what}: no 'error:' message: {err!r}")
    for n in needles:
        check(n in err, f"{what}: message lacks {n!r}: {err.strip()}")
    after = open(out, "rb").read() if os.path.exists(out) else None
    check(after == before, f"{what}: {out} was {'created' if before is None else 'changed'}")
    check(not leftovers(tmp), f"{what}: temporary files left: {leftovers(tmp)}")
    print(f"{what}: {err.strip()}")


def perfcell_refuses(ck: str, cells: str, tmp: str, needle: str) -> None:
    """perfcell's reader refuses `ck` too: `perfcell embed` and `perfcell-inspect --verify`."""
    out = os.path.join(tmp, "refused.h5ad")
    r = subprocess.run([os.path.join(BIN, "perfcell"), "embed", "--checkpoint", ck, "--input", cells, "--out",
                        out], capture_output=True, text=True)
    check(r.returncode != 0 and needle in r.stderr and not os.path.exists(out),
          f"perfcell embed accepted {ck} or said something else: {r.returncode} {r.stderr.strip()}")
    rc, log = inspect_verify(ck)
    check(rc != 0 and needle in log, f"perfcell-inspect --verify accepted {ck}: {rc} {log.strip()}")


def main() -> None:
    tmp = sys.argv[1]
    vocab = os.path.join(tmp, "vocab.tsv")
    genes = write_vocab(vocab)
    cells = os.path.join(tmp, "cells.h5ad")
    write_cells(cells)
    sd = state_dict(pretrain_model())
    out = os.path.join(tmp, "out.h5")

    def save(obj, name: str) -> str:
        path = os.path.join(tmp, name)
        torch.save(obj, path)
        return path

    # tensors missing
    broken = {k: v for k, v in sd.items() if k not in ("performer.net.layers.1.0.fn.to_k.weight", "norm.bias")}
    expect_fail(tmp, ["import", save(broken, "missing.pth"), "--vocab", vocab, "--out", out],
                out, "missing 2 tensors", "performer.net.layers.1.0.fn.to_k.weight", "norm.bias")
    expect_fail(tmp, ["import", save({"token_emb.weight": sd["token_emb.weight"]}, "bare.pth"), "--vocab", vocab,
                      "--out", out], out, "not a scBERT / performer-pytorch PerformerLM state_dict",
                "performer.net.layers.0.0.fn.to_q.weight")
    # tensors perfcell's model has no place for (performer-pytorch's qkv_bias)
    extra = dict(sd)
    extra["performer.net.layers.0.0.fn.to_q.bias"] = torch.zeros(CONFIG.inner_dim)
    expect_fail(tmp, ["import", save(extra, "extra.pth"), "--vocab", vocab, "--out", out],
                out, "no place for", "performer.net.layers.0.0.fn.to_q.bias")
    # a vocabulary of the wrong length (and an existing output stays as it was)
    short = os.path.join(tmp, "short.tsv")
    write_lines(short, genes[:-1])
    with open(out, "w") as f:
        f.write("an older file\n")
    pth = save(sd, "model.pth")
    expect_fail(tmp, ["import", pth, "--vocab", short, "--out", out], out, "201 rows", "200 genes",
                "the vocabulary has 199 genes")
    os.unlink(out)
    dup = os.path.join(tmp, "dup.tsv")
    write_lines(dup, genes[:-1] + [genes[3]])
    expect_fail(tmp, ["import", pth, "--vocab", dup, "--out", out], out, f"{dup}:200", "duplicate gene")
    # --heads that does not fit the tensors
    expect_fail(tmp, ["import", pth, "--vocab", vocab, "--out", out, "--heads", "3"], out, "--heads 3",
                "32 rows", "so heads = 4")
    # labels: wrong length, missing, or without a head
    fsd = state_dict(finetune_model())
    fpth = save({"model_state_dict": fsd}, "finetune.pth")
    labels3 = os.path.join(tmp, "labels3.txt")
    write_lines(labels3, CLASSES[:3])
    expect_fail(tmp, ["import", fpth, "--vocab", vocab, "--labels", labels3, "--out", out], out,
                "names 3 classes", f"has {len(CLASSES)} outputs")
    expect_fail(tmp, ["import", fpth, "--vocab", vocab, "--out", out], out, "--labels", f"{len(CLASSES)} outputs")
    labels = os.path.join(tmp, "labels.txt")
    write_lines(labels, CLASSES)
    expect_fail(tmp, ["import", pth, "--vocab", vocab, "--labels", labels, "--out", out], out,
                "has no classification head")
    expect_fail(tmp, ["import", fpth, "--vocab", vocab, "--labels", labels, "--out", out, "--mode", "nonzero"],
                out, "needs --mode full")
    # not a state_dict, not a PyTorch file
    expect_fail(tmp, ["import", save({"epoch": 3, "lr": 0.1}, "nostate.pth"), "--vocab", vocab, "--out", out],
                out, "no state_dict found", "epoch, lr")
    expect_fail(tmp, ["import", vocab, "--vocab", vocab, "--out", out], out, "not a PyTorch file")
    # pickled objects beyond tensors and numbers: refused unless --unsafe-load
    args_pth = save({"model_state_dict": sd, "args": argparse.Namespace(lr=1e-4)}, "with_args.pth")
    expect_fail(tmp, ["import", args_pth, "--vocab", vocab, "--out", out], out, "argparse.Namespace",
                "--unsafe-load")
    tool_ok(["import", args_pth, "--vocab", vocab, "--out", out, "--unsafe-load"])

    # export / verify of damaged checkpoints; perfcell's reader agrees
    good = out
    bad = os.path.join(tmp, "flipped.h5")
    shutil.copy(good, bad)
    with h5py.File(bad, "r") as f:
        offset = f["model/performer.net.layers.0.0.fn.to_v.weight"].id.get_offset()
    with open(bad, "r+b") as f:
        f.seek(offset + 10)
        byte = f.read(1)
        f.seek(offset + 10)
        f.write(bytes([byte[0] ^ 0x40]))
    pth_out = os.path.join(tmp, "export.pth")
    expect_fail(tmp, ["export", bad, "--out", pth_out], pth_out, "to_v.weight' is corrupt: CRC-32")
    expect_fail(tmp, ["verify", bad], pth_out, "corrupt")
    perfcell_refuses(bad, cells, tmp, "corrupt")

    old = os.path.join(tmp, "old_format.h5")
    with h5py.File(old, "w") as f:
        f.attrs["format"] = np.bytes_(b"perfcell-checkpoint")
    expect_fail(tmp, ["export", old, "--out", pth_out], pth_out, "HDF5 1.6 file format", "libver='v108'")
    perfcell_refuses(old, cells, tmp, "1.6 file format")

    vlen = os.path.join(tmp, "vlen_attr.h5")
    shutil.copy(good, vlen)
    with h5py.File(vlen, "r+") as f:
        del f.attrs["kind"]
        f.attrs["kind"] = "pretrain"   # h5py's default: a variable-length string
    expect_fail(tmp, ["verify", vlen], pth_out, "'kind'", "variable-length")
    perfcell_refuses(vlen, cells, tmp, "variable-length")
    finish("bad inputs are refused with clear messages and no output")


if __name__ == "__main__":
    main()
