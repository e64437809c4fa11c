#!/usr/bin/env python3
"""Open a checkpoint with h5py as a PyTorch user would, and check it against
what the C side wrote.

    test_checkpoint --sample DIR && ckpt_h5py_check.py DIR

DIR/ckpt/ holds the checkpoint (DIR/ckpt/latest names it); DIR/expect_*.tsv,
expect_config.ini and expect_vocab.tsv say what it must contain. Checks:
tensors found by their state_dict names with their shapes and dtype, each
CRC-32 recomputed with zlib over the little-endian float32 bytes, table order
and flags, Adam moments for exactly the trainable tensors, projection
matrices, the cursor, the scalars, and the config, vocabulary and label
strings read as str. Exits non-zero on any difference.
"""
import os
import sys
import zlib

import h5py
import numpy as np

failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)


def crc_of(arr, dtype):
    return zlib.crc32(np.ascontiguousarray(arr, dtype=dtype).tobytes()) & 0xFFFFFFFF


def crc_strings(strings):
    return zlib.crc32(b"".join(s.encode("utf-8") + b"\0" for s in strings)) & 0xFFFFFFFF


def read_expect(folder):
    tensors = []
    with open(os.path.join(folder, "expect_tensors.tsv"), encoding="utf-8") as f:
        for line in f:
            name, shape, trainable, decay, value1 = line.rstrip("\n").split("\t")
            tensors.append((name, tuple(int(x) for x in shape.split(",")), int(trainable),
                            int(decay), float(value1)))
    meta = {"cursor": [], "label": [], "scalar": {}}
    with open(os.path.join(folder, "expect_meta.tsv"), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if parts[0] == "cursor":
                meta["cursor"].append(int(parts[1]))
            elif parts[0] == "label":
                meta["label"].append(parts[1])
            elif parts[0] == "scalar":
                meta["scalar"][parts[1]] = float(parts[2])
            else:
                meta[parts[0]] = parts[1]
    with open(os.path.join(folder, "expect_config.ini"), encoding="utf-8") as f:
        meta["config"] = f.read()
    with open(os.path.join(folder, "expect_vocab.tsv"), encoding="utf-8") as f:
        meta["vocab"] = f.read()
    return tensors, meta


def text_attr(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    folder = sys.argv[1]
    tensors, meta = read_expect(folder)
    ckdir = os.path.join(folder, "ckpt")
    with open(os.path.join(ckdir, "latest"), encoding="utf-8") as f:
        name = f.read()
    check(name.endswith("\n") and "/" not in name, f"latest holds {name!r}")
    path = os.path.join(ckdir, name.strip())
    with h5py.File(path, "r") as f:
        a = f.attrs
        check(text_attr(a["format"]) == "perfcell-checkpoint", f"format {a['format']!r}")
        check(int(a["format_version"]) == 1, "format_version")
        check(text_attr(a["kind"]) == meta["kind"], f"kind {a['kind']!r}")
        for key in ("step", "epoch", "seed"):
            check(int(a[key]) == int(meta[key]), f"{key}: {a[key]} != {meta[key]}")
        check(text_attr(a["vocab_hash"]) == meta["vocab_hash"], "vocab_hash")
        check(name.strip() == "ckpt-%08d.h5" % int(meta["step"]), f"file name {name!r}")

        model = f["model"]
        check(len(model) == len(tensors), f"{len(model)} tensors, expected {len(tensors)}")
        trainable = []
        for index, (tname, shape, train, decay, value1) in enumerate(tensors):
            if tname not in model:
                failures.append(f"tensor {tname} missing")
                continue
            d = model[tname]
            x = d[()]
            check(d.dtype == np.float32, f"{tname}: dtype {d.dtype}")
            check(d.shape == shape, f"{tname}: shape {d.shape}, expected {shape}")
            check(tuple(int(v) for v in d.attrs["shape"]) == shape, f"{tname}: shape attribute")
            check(int(d.attrs["crc32"]) == crc_of(x, "<f4"), f"{tname}: CRC-32")
            check(int(d.attrs["index"]) == index, f"{tname}: index {d.attrs['index']} != {index}")
            check(int(d.attrs["trainable"]) == train and int(d.attrs["decay"]) == decay,
                  f"{tname}: flags")
            check(float(x.reshape(-1)[1]) == np.float32(value1), f"{tname}: value {x.reshape(-1)[1]}")
            if train:
                trainable.append(tname)
        for moment in ("exp_avg", "exp_avg_sq"):
            g = f["optim"][moment]
            check(sorted(g) == sorted(trainable), f"{moment} holds {sorted(g)}")
            for tname in g:
                check(g[tname].shape == model[tname].shape, f"{moment}/{tname}: shape")
                check(int(g[tname].attrs["crc32"]) == crc_of(g[tname][()], "<f4"),
                      f"{moment}/{tname}: CRC-32")

        depth, m, e = int(meta["depth"]), int(meta["n_features"]), int(meta["dim_head"])
        buffers = f["buffers"]
        check(len(buffers) == depth, f"{len(buffers)} projection matrices")
        for layer in range(depth):
            pname = f"performer.net.layers.{layer}.0.fn.fast_attention.projection_matrix"
            if pname not in buffers:
                failures.append(f"{pname} missing")
                continue
            p = buffers[pname]
            check(p.shape == (m, e), f"{pname}: shape {p.shape}")
            check(int(p.attrs["crc32"]) == crc_of(p[()], "<f4"), f"{pname}: CRC-32")

        state = f["state"]
        check(int(state.attrs["redraw_index"]) == int(meta["redraw_index"]), "redraw_index")
        for key, value in meta["scalar"].items():
            check(float(state.attrs[key]) == value, f"scalar {key}")
        cursor = state["cursor"][()]
        check(cursor.dtype == np.int64 and list(cursor) == meta["cursor"], f"cursor {cursor}")
        check(int(state["cursor"].attrs["crc32"]) == crc_of(cursor, "<i8"), "cursor CRC-32")

        config = f["config"].asstr()[()]
        vocab = f["vocab"].asstr()[()]
        labels = list(f["labels"].asstr()[()])
        check(isinstance(config, str) and config == meta["config"], f"config {config!r}")
        check(isinstance(vocab, str) and vocab == meta["vocab"], f"vocab {vocab!r}")
        check(labels == meta["label"], f"labels {labels}")
        check(int(f["config"].attrs["crc32"]) == crc_strings([config]), "config CRC-32")
        check(int(f["vocab"].attrs["crc32"]) == crc_strings([vocab]), "vocab CRC-32")
        check(int(f["labels"].attrs["crc32"]) == crc_strings(labels), "labels CRC-32")

    for msg in failures:
        print("FAIL:", msg, file=sys.stderr)
    if failures:
        sys.exit(1)
    print(f"{path}: {len(tensors)} tensors, config, vocabulary and labels read by h5py as expected")


if __name__ == "__main__":
    main()
