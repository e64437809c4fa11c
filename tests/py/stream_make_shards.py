#!/usr/bin/env python3
"""Write a perfcell shard folder from an .h5ad with h5py, following
shards/README.md literally (an independent second writer).

The reader tests use it to craft shards the C writer would never produce
(other chunk sizes, no labels, odd but valid layouts) and to check that the
reader accepts any shard that follows the format, not only our own writer's.

    HDF5_PLUGIN_PATH=lib/hdf5-plugin /usr/bin/python3 tests/py/stream_make_shards.py \
        IN.h5ad --out DIR --shard-cells 1000 [--label-key celltype] [--chunk 65536]
        [--shard-sizes 13,1,250,...]   (uneven shards: these sizes, then --shard-cells)
"""
import argparse
import os
import zlib

import h5py
import numpy as np
import scipy.sparse as sp

ZSTD = 32015


def fnv1a64(data, h=0xCBF29CE484222325):
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def fixed(values):
    """Fixed-length UTF-8 strings (shards keep no string in HDF5's global heap)."""
    enc = [v.encode() for v in values]
    width = max([len(e) for e in enc] + [1])
    dtype = h5py.string_dtype("utf-8", width)  # numpy 'S' carrying h5py's UTF-8 tag
    return np.array(enc, dtype=dtype), dtype


def str_attr(obj, name, value):
    data, dtype = fixed([value])
    obj.attrs.create(name, data[0], dtype=dtype)


def str_attrs(obj, name, values):
    data, dtype = fixed(values)
    obj.attrs.create(name, data, dtype=dtype)


def set_enc(obj, kind, version):
    str_attr(obj, "encoding-type", kind)
    str_attr(obj, "encoding-version", version)


def strings(group, name, values):
    data, dtype = fixed(values)
    d = group.create_dataset(name, data=data, dtype=dtype)
    set_enc(d, "string-array", "0.2.0")


def categorical(group, name, codes, categories):
    g = group.create_group(name)
    set_enc(g, "categorical", "0.2.0")
    g.attrs["ordered"] = False
    g.create_dataset("codes", data=np.asarray(codes, dtype=np.int8 if len(categories) < 127 else np.int32))
    strings(g, "categories", categories)


def scalar(group, name, value):
    if isinstance(value, str):
        data, dtype = fixed([value])
        d = group.create_dataset(name, data=data[0], dtype=dtype)
        set_enc(d, "string", "0.2.0")
    else:
        d = group.create_dataset(name, data=np.int64(value))
        set_enc(d, "numeric-scalar", "0.2.0")


def read_input(path, label_key):
    with h5py.File(path, "r") as f:
        x = f["X"]
        shape = tuple(int(v) for v in x.attrs["shape"])
        m = sp.csr_matrix((x["data"][:], x["indices"][:], x["indptr"][:]), shape=shape)
        obs = f["obs"]
        names = [s.decode() if isinstance(s, bytes) else s for s in obs[obs.attrs["_index"]][:]]
        var = f["var"]
        genes = [s.decode() if isinstance(s, bytes) else s for s in var[var.attrs["_index"]][:]]
        codes, cats = None, []
        if label_key:
            g = obs[label_key]
            codes = g["codes"][:].astype(np.int32)
            cats = [s.decode() if isinstance(s, bytes) else s for s in g["categories"][:]]
    m.eliminate_zeros()
    m.sort_indices()
    if not np.all(m.data == np.round(m.data)) or (m.data < 0).any():
        raise SystemExit(f"{path}: X is not raw counts")
    return m, names, genes, codes, cats


def write_shard(path, idx, first, m, names, genes, codes, cats, label_key, dataset, vhash, chunk):
    n, g = m.shape
    data = m.data.astype(np.int32)
    indices = m.indices.astype(np.int32)
    indptr = m.indptr.astype(np.int64)
    cell_id = np.arange(first, first + n, dtype=np.int64)
    with h5py.File(path, "w", libver=("v108", "v108")) as f:
        set_enc(f, "anndata", "0.1.0")
        x = f.create_group("X")
        set_enc(x, "csr_matrix", "0.1.0")
        x.attrs["shape"] = np.array([n, g], dtype=np.int64)
        c = max(1, min(chunk, len(data)))
        for name, arr in (("data", data), ("indices", indices)):
            x.create_dataset(name, data=arr, chunks=(c,), shuffle=True, compression=ZSTD,
                             compression_opts=(3,), maxshape=(None,))
        x.create_dataset("indptr", data=indptr)
        obs = f.create_group("obs")
        set_enc(obs, "dataframe", "0.2.0")
        str_attr(obs, "_index", "cell")
        cols = ["cell_id", "total_counts", "dataset"] + ([label_key] if label_key else [])
        str_attrs(obs, "column-order", cols)
        strings(obs, "cell", names)
        for name, arr in (("cell_id", cell_id), ("total_counts", np.asarray(m.sum(axis=1)).ravel().astype(np.int64))):
            d = obs.create_dataset(name, data=arr)
            set_enc(d, "array", "0.2.0")
        categorical(obs, "dataset", np.zeros(n, dtype=np.int8), [dataset])
        if label_key:
            categorical(obs, label_key, codes, cats)
        var = f.create_group("var")
        set_enc(var, "dataframe", "0.2.0")
        str_attr(var, "_index", "gene")
        str_attrs(var, "column-order", ["gene_ids"])
        strings(var, "gene", genes)
        strings(var, "gene_ids", [""] * len(genes))
        uns = f.create_group("uns")
        set_enc(uns, "dict", "0.1.0")
        pc = uns.create_group("perfcell")
        set_enc(pc, "dict", "0.1.0")
        scalar(pc, "format_version", 1)
        scalar(pc, "vocab_hash", f"{vhash:016x}")
        scalar(pc, "shard_index", idx)
        scalar(pc, "first_cell", first)
        scalar(pc, "label_key", label_key or "-")
        for name in ("layers", "obsm", "varm", "obsp", "varp"):
            set_enc(f.create_group(name), "dict", "0.1.0")
    crc = 0
    for arr, dt in ((indptr, "<i8"), (indices, "<i4"), (data, "<i4"), (cell_id, "<i8")):
        crc = zlib.crc32(arr.astype(dt).tobytes(), crc)
    if label_key:
        crc = zlib.crc32(np.asarray(codes, dtype="<i4").tobytes(), crc)
    raw = open(path, "rb").read()
    return len(data), crc, len(raw), zlib.crc32(raw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-cells", type=int, default=1000)
    ap.add_argument("--label-key", default="")
    ap.add_argument("--chunk", type=int, default=1 << 16)
    ap.add_argument("--shard-sizes", default="", help="comma-separated cells of the first shards")
    a = ap.parse_args()
    m, names, genes, codes, cats = read_input(a.input, a.label_key)
    os.makedirs(a.out, exist_ok=True)
    canon = "".join(f"{s}\t\n" for s in genes).encode()
    vhash = fnv1a64(canon)
    with open(os.path.join(a.out, "vocab.tsv"), "w") as f:
        f.write("".join(f"{s}\n" for s in genes))
    dataset = os.path.splitext(os.path.basename(a.input))[0]
    rows = []
    sizes = [int(x) for x in a.shard_sizes.split(",") if x]
    if any(n <= 0 for n in sizes):
        raise SystemExit(f"--shard-sizes {a.shard_sizes}: every size must be positive")
    cuts, c0 = [], 0
    while c0 < m.shape[0]:
        c1 = min(c0 + (sizes[len(cuts)] if len(cuts) < len(sizes) else a.shard_cells), m.shape[0])
        cuts.append((c0, c1))
        c0 = c1
    for i, (c0, c1) in enumerate(cuts):
        fn = f"shard-{i:05d}.h5ad"
        nnz, crc, size, fcrc = write_shard(os.path.join(a.out, fn), i, c0, m[c0:c1], names[c0:c1], genes,
                                           codes[c0:c1] if codes is not None else None, cats,
                                           a.label_key, dataset, vhash, a.chunk)
        rows.append(f"{fn}\t{c1 - c0}\t{c0}\t{nnz}\t{crc:08x}\t{size}\t{fcrc:08x}\n")
    nnz = sum(int(r.split("\t")[3]) for r in rows)
    head = [f"#format\tperfcell-shards\t1\n", f"#vocab_hash\t{vhash:016x}\n", f"#n_genes\t{len(genes)}\n",
            f"#n_cells\t{m.shape[0]}\n", f"#nnz\t{nnz}\n", f"#label_key\t{a.label_key or '-'}\n"]
    if a.label_key:
        for k, name in enumerate(cats):
            head.append(f"#label\t{k}\t{name}\t{int((codes == k).sum())}\n")
    head.append(f"#dataset\t0\t{dataset}\t{os.path.abspath(a.input)}\t{m.shape[0]}\n")
    head.append("file\tn_cells\tfirst_cell\tnnz\tcontent_crc32\tbytes\tfile_crc32\n")
    tmp = os.path.join(a.out, "manifest.tsv.tmp")
    with open(tmp, "w") as f:
        f.write("".join(head + rows))
    os.replace(tmp, os.path.join(a.out, "manifest.tsv"))


if __name__ == "__main__":
    main()
