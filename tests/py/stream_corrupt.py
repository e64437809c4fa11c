#!/usr/bin/env python3
"""Damaged shard folders: every reader reports the fault, naming the file,
with a non-zero exit, and never crashes or hangs.

    /usr/bin/python3 tests/py/stream_corrupt.py GOOD_FOLDER SCRATCH BIN TBIN

For each case a copy of GOOD_FOLDER is damaged, then these run under a
timeout: `perfcell-inspect DIR --verify`, `test_stream drain` (the training
stream, with and without the file CRC check, threaded and synchronous), and
where it applies `perfcell-inspect FILE --verify` on the damaged shard alone.
A run passes when it exits with status 1 and its output names the expected
file; a signal, a timeout, a sanitizer report, exit 0 or a message without
the file fails.
"""
import os
import shutil
import subprocess
import sys
import zlib

import h5py
import numpy as np

GOOD, SCRATCH, BIN, TBIN = sys.argv[1:5]
SHARD = "shard-00001.h5ad"
failures = []


def copy(name):
    d = os.path.join(SCRATCH, name)
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(GOOD, d)
    return d


def flip(path, offset, n):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(x ^ 0x5A for x in b))


def chunk_of(path, name, i):
    with h5py.File(path, "r") as f:
        d = f[name]
        i = min(i, d.id.get_num_chunks() - 1)
        info = d.id.get_chunk_info(i)
        return info.byte_offset, info.size


def header_of(path, name):
    with h5py.File(path, "r") as f:
        return h5py.h5o.get_info(f[name].id).addr


def refresh_file_checksums(folder, shard):
    """Make the manifest's size and file CRC match a rewritten shard, so that
    only the content checks can catch what was changed."""
    path = os.path.join(folder, shard)
    raw = open(path, "rb").read()
    mpath = os.path.join(folder, "manifest.tsv")
    lines = open(mpath).read().split("\n")
    for i, line in enumerate(lines):
        p = line.split("\t")
        if p[0] == shard:
            p[5], p[6] = str(len(raw)), f"{zlib.crc32(raw):08x}"
            lines[i] = "\t".join(p)
    open(mpath, "w").write("\n".join(lines))


def edit_manifest(folder, fn):
    mpath = os.path.join(folder, "manifest.tsv")
    lines = open(mpath).read().split("\n")
    open(mpath, "w").write("\n".join(fn(lines)))


def run(case, cmd, expect):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        failures.append(f"{case}: timed out: {' '.join(cmd)}")
        print(f"  HANG  {' '.join(cmd)}")
        return
    out = r.stdout + r.stderr
    fault_lines = [l for l in out.splitlines() if "FAULT" in l or "error" in l]
    msg = fault_lines[0] if fault_lines else out.strip().splitlines()[-1:] or [""]
    msg = msg if isinstance(msg, str) else msg[0]
    expect = (expect,) if isinstance(expect, str) else expect
    # Sanitizer builds also exit 1 on a memory error: that is a crash here.
    crashed = "Sanitizer" in out or "runtime error" in out
    ok = r.returncode == 1 and all(e in out for e in expect) and not crashed
    print(f"  {'ok  ' if ok else 'FAIL'}  exit {r.returncode:3d}  {os.path.basename(cmd[0])} "
          f"{' '.join(os.path.basename(c) if c.startswith('/') else c for c in cmd[1:])}\n        {msg.strip()[:200]}")
    if not ok:
        failures.append(f"{case}: exit {r.returncode}, expected 1 and {expect} in the output: {' '.join(cmd)}\n{out[-2000:]}")


def readers(case, folder, expect, crc_only=False, file=None):
    """Run the readers on a damaged folder. crc_only: the damage is one that
    only the file checksum is sure to catch (skip the stream without it)."""
    inspect, drain = os.path.join(BIN, "perfcell-inspect"), os.path.join(TBIN, "test_stream")
    print(case)
    run(case, [inspect, folder, "--verify"], expect)
    run(case, [drain, "drain", folder, "2"], expect)
    run(case, [drain, "drain", folder, "2", "--prefetch", "0"], expect)
    if not crc_only:
        run(case, [drain, "drain", folder, "2", "--no-crc"], expect)
    if file:
        run(case, [inspect, os.path.join(folder, file), "--verify"], expect)


def main():
    # Truncated shard: the size check catches it before HDF5; HDF5 itself
    # refuses the lone file.
    d = copy("truncated")
    p = os.path.join(d, SHARD)
    os.truncate(p, os.path.getsize(p) * 6 // 10)
    readers("truncated shard", d, SHARD, file=SHARD)

    # Bytes flipped inside a compressed chunk of X/indices: the file CRC
    # catches any flip; without it, a damaged frame header must still fail
    # the decode.
    d = copy("chunk-middle")
    p = os.path.join(d, SHARD)
    off, size = chunk_of(p, "X/indices", 3)
    flip(p, off + size // 2, 16)
    readers("bytes flipped in the middle of a compressed chunk", d, SHARD, crc_only=True, file=SHARD)
    d = copy("chunk-header")
    p = os.path.join(d, SHARD)
    off, size = chunk_of(p, "X/data", 2)
    flip(p, off, 8)
    readers("bytes flipped at the start of a compressed chunk", d, SHARD, file=SHARD)

    # HDF5 metadata: the object header of X/indptr, the superblock. The file
    # CRC check keeps such files away from the HDF5 parser; the lone-file
    # inspection relies on HDF5's own checks.
    d = copy("metadata")
    p = os.path.join(d, SHARD)
    flip(p, header_of(p, "X/indptr") + 24, 8)
    readers("bytes flipped in an HDF5 object header", d, SHARD, crc_only=True)
    d = copy("superblock")
    p = os.path.join(d, SHARD)
    flip(p, 0, 8)
    readers("bytes flipped in the HDF5 superblock", d, SHARD, file=SHARD)

    # A missing shard.
    d = copy("deleted")
    os.remove(os.path.join(d, "shard-00002.h5ad"))
    readers("deleted shard", d, "shard-00002.h5ad")

    # Damaged manifest lines.
    d = copy("manifest-row")
    edit_manifest(d, lambda ls: [l.replace("\t1000\t1000\t", "\t1000\tx1000\t") for l in ls])
    readers("manifest row with a bad number", d, "manifest.tsv")
    d = copy("manifest-gap")
    edit_manifest(d, lambda ls: [l.replace("\t1000\t1000\t", "\t1000\t1001\t") for l in ls])
    readers("manifest rows that leave a gap", d, "manifest.tsv")
    d = copy("manifest-cut")
    edit_manifest(d, lambda ls: [l for l in ls if not l.startswith("file")])
    readers("manifest without its table", d, "manifest.tsv")
    d = copy("manifest-nnz")
    edit_manifest(d, lambda ls: [("\t".join(p[:3] + [str(int(p[3]) + 1)] + p[4:]) if (p := l.split("\t"))[0] == SHARD
                                  else (f"#nnz\t{int(p[1]) + 1}" if p[0] == "#nnz" else l)) for l in ls])
    readers("manifest nnz disagrees with the shard", d, SHARD)

    # Wrong vocabulary: the manifest's hash differs from the shards'; the
    # reader asked for another vocabulary; vocab.tsv edited.
    d = copy("vocab-manifest")
    edit_manifest(d, lambda ls: ["#vocab_hash\t0123456789abcdef" if l.startswith("#vocab_hash") else l for l in ls])
    readers("manifest vocabulary hash differs from the shards'", d, "shard-00000.h5ad")
    print("reader asked for another vocabulary")
    run("expected vocabulary", [os.path.join(TBIN, "test_stream"), "drain", GOOD, "1", "--expect-hash",
                                "0123456789abcdef"], "vocabulary")
    d = copy("vocab-tsv")
    vp = os.path.join(d, "vocab.tsv")
    genes = open(vp).read().split("\n")
    genes[5] = genes[5] + "_renamed"
    open(vp, "w").write("\n".join(genes))
    print("vocab.tsv edited")
    run("vocab.tsv edited", [os.path.join(BIN, "perfcell-inspect"), d, "--verify"], "vocab.tsv")

    # Content that decodes but breaks the format, with the file checksums
    # refreshed so that only the content checks see it.
    cases = [
        ("gene index outside the vocabulary", "X/indices", lambda a: a.__setitem__(1000, 10 ** 6), "outside the vocabulary"),
        ("genes not ascending", "X/indices", lambda a: a.__setitem__(2001, a[2000]), "not ascending"),
        ("zero count", "X/data", lambda a: a.__setitem__(5000, 0), "count 0"),
        ("indptr not monotonic", "X/indptr", lambda a: a.__setitem__(10, a[12]), "indptr"),
        ("cell ids out of place", "obs/cell_id", lambda a: a.__setitem__(7, 3), "cell_id"),
    ]
    for case, name, fn, expect in cases:
        d = copy("content-" + name.replace("/", "-") + "-" + expect.split()[0])
        p = os.path.join(d, SHARD)
        with h5py.File(p, "r+") as f:
            a = f[name][:]
            fn(a)
            f[name][:] = a
        refresh_file_checksums(d, SHARD)
        readers(case, d, (SHARD, expect), file=SHARD)

    print()
    if failures:
        print(f"{len(failures)} failures:")
        for f in failures:
            print(" -", f)
        sys.exit(1)
    print("every damaged folder was reported")


if __name__ == "__main__":
    main()
