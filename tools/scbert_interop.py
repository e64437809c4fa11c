#!/usr/bin/python3
"""scBERT / performer-pytorch weights in and out of perfcell checkpoints.

    /usr/bin/python3 tools/scbert_interop.py import MODEL.pth --vocab VOCAB.tsv --out CKPT.h5
    /usr/bin/python3 tools/scbert_interop.py export CKPT.h5 --out MODEL.pth
    /usr/bin/python3 tools/scbert_interop.py verify CKPT.h5

(tools/scbert_import.py and tools/scbert_export.py are the first two
subcommands under their own names.) Run with Debian's /usr/bin/python3, which
has python3-torch, python3-h5py and python3-numpy.

import
    Reads the state_dict of scBERT's PerformerLM (a raw state_dict, or a
    dict holding it under 'model_state_dict' or 'state_dict', as scBERT's
    panglao_pretrain.pth and its fine-tuned saves do) and writes a perfcell
    checkpoint (include/perfcell/checkpoint.h) that `perfcell embed`,
    `perfcell predict` and `perfcell finetune --init` read. The model's
    sizes come from the tensors:

        dim, bins       token_emb.weight          (bins + 2, dim)
        genes G         pos_emb.emb.weight        (G + 1, dim); G must be the
                                                  vocabulary's length
        depth           the layer indices of performer.net.layers.{i}
        dim_head, M     the projection matrices   (M, dim_head)
        heads           to_q rows / dim_head      (--heads checks it)
        ff_dim          w1.weight                 (ff_dim, dim)

    A model with scBERT's classification head (to_out.conv1, to_out.fc1,
    fc2, fc3, as scBERT's finetune.py builds it) becomes a fine-tuning
    checkpoint: --labels names its classes (one per line, in the order of
    fc3's rows, e.g. scBERT's label_dict). perfcell's pooled head (cls.fc1,
    cls.fc2, from `export`) is read too. Without a head the checkpoint is a
    pretraining one (the masked-expression head to_out.weight/bias is kept
    when present).

    The checkpoint holds every tensor as float32 (scBERT keeps its gene2vec
    embedding in float64: it is rounded to float32, with a note), the
    projection matrices as its random features (redraw index 0), the
    vocabulary text, the labels, step 0, no optimizer state and an empty data
    cursor, and a resolved configuration: every key of perfcell's
    TRAIN_SCHEMA at its default, read from src/train/schema.c next to this
    tool, except data.mode (--mode), the model keys (from the tensors),
    model.gene_emb (--gene-emb), finetune.head and finetune.hidden (from the
    head; finetune.pooling from --pooling for the pooled head). The file is
    written under a temporary name, checked with the same rules as perfcell's
    reader (see `verify`), and renamed into place; on any error no output is
    left.

    Entries that are not model tensors are skipped with a note: the wrapper
    dict's other entries (epoch, optimizer state, ...) and performer-pytorch's
    redraw counter performer.calls_since_last_redraw (perfcell counts feature
    redraws by optimizer step). Tensors that perfcell's model has no place for
    (query/key/value biases, local attention, ReZero, ...) are an error that
    lists them.

export
    Writes the checkpoint's tensors as a PyTorch state_dict under scBERT's
    names and shapes (to_out.conv1.weight as (1, 1, 1, dim)), every tensor
    float32, the projection matrices included. A pretraining checkpoint loads
    into tools/perfcell_torch.py's PerformerModel with strict=True; a
    fine-tuning one into scBERT's PerformerLM whose to_out is its
    classification head. perfcell's contrastive projection (contrastive.*)
    has no place in scBERT's model and is left out, with a note. --wrap
    writes {'model_state_dict': state_dict} as scBERT's scripts expect, and
    --redraw-counter adds performer.calls_since_last_redraw (int64 zero), the
    one buffer scBERT's own PerformerLM has besides these.

verify
    Checks a checkpoint with the rules of perfcell's reader
    (src/checkpoint/checkpoint.c): HDF5 1.8 file format, fixed-length string
    attributes on /, every tensor float32 with its shape, index, flags and
    CRC-32, projection matrices, /state, contiguous string datasets with their
    CRC-32, and the vocabulary's hash. Exit status 0 when it passes.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TOOLS_DIR)
SCHEMA_C = os.path.join(REPO_ROOT, "src", "train", "schema.c")

# include/perfcell/checkpoint.h, params.h, classifier.h
CKPT_FORMAT = "perfcell-checkpoint"
CKPT_FORMAT_VERSION = 1
PARAM_NAME_MAX = 96
SCALAR_KEY_MAX = 64
CLS_SCBERT_FC1 = 512
PROJ_NAME = "performer.net.layers.{}.0.fn.fast_attention.projection_matrix"
REDRAW_COUNTER = "performer.calls_since_last_redraw"
MLM_HEAD = ["to_out.weight", "to_out.bias"]
# The checkpoint's seed and feature seed: run.seed's default in TRAIN_SCHEMA.
SEED_KEY = "run.seed"
FNV_INIT = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class InteropError(Exception):
    """A user-facing failure: the message names the file and the problem."""


def note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Checksums and names (as in src/common/util.c and src/checkpoint/checkpoint.c)
# ---------------------------------------------------------------------------

def crc32_bytes(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def crc32_f32(x: np.ndarray) -> int:
    """CRC-32 of an array's little-endian float32 bytes."""
    return crc32_bytes(np.ascontiguousarray(x, dtype="<f4").tobytes())


def crc32_strings(strings: Sequence[str]) -> int:
    """CRC-32 of UTF-8 strings, each followed by a NUL byte."""
    return crc32_bytes(b"".join(s.encode("utf-8") + b"\0" for s in strings))


def fnv1a64(data: bytes) -> int:
    h = FNV_INIT
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def name_ok(s: str, limit: int) -> bool:
    """A name perfcell stores as an HDF5 link or attribute name."""
    return (0 < len(s) < limit and s not in (".", "..")
            and all(" " < ch <= "~" and ch != "/" for ch in s))


def kind_ok(s: str) -> bool:
    return 0 < len(s) < 16 and re.fullmatch(r"[a-z0-9_-]+", s) is not None


# ---------------------------------------------------------------------------
# Vocabulary (the rules of vocab_load in src/shards/vocab.c)
# ---------------------------------------------------------------------------

@dataclass
class Vocabulary:
    text: str                 # the file's text, stored as is in /vocab
    symbols: List[str]
    ids: List[str]

    def __len__(self) -> int:
        return len(self.symbols)

    def hash(self) -> int:
        """perfcell's vocabulary hash: FNV-1a 64 of 'symbol<TAB>id<LF>' per gene."""
        return fnv1a64("".join(f"{s}\t{i}\n" for s, i in zip(self.symbols, self.ids)).encode("utf-8"))


def parse_vocabulary(text: str, where: str) -> Vocabulary:
    """Check a vocabulary text as perfcell's vocab_load does and list its genes."""
    if text.encode("utf-8")[:8] == HDF5_SIGNATURE:
        raise InteropError(f"{where}: not a vocabulary: it is an HDF5 file")
    if "\0" in text:
        raise InteropError(f"{where}: not a vocabulary: it holds binary data")
    if not text:
        raise InteropError(f"{where}: the vocabulary is empty")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    symbols: List[str] = []
    ids: List[str] = []
    by_symbol: Dict[str, int] = {}
    by_id: Dict[str, int] = {}
    for no, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            raise InteropError(f"{where}:{no}: blank line (a vocabulary has one gene on every line)")
        if line.startswith("#"):
            raise InteropError(f"{where}:{no}: comment lines are not allowed in a vocabulary")
        fields = line.split("\t")
        if len(fields) > 2:
            raise InteropError(f"{where}:{no}: more than two fields (expected 'symbol' or "
                               "'symbol<TAB>ensembl_id')")
        symbol, gid = fields[0], fields[1] if len(fields) == 2 else ""
        if not symbol:
            raise InteropError(f"{where}:{no}: empty gene symbol")
        if "\r" in symbol or "\r" in gid:
            raise InteropError(f"{where}:{no}: gene '{symbol}' holds a carriage return")
        same = by_id.get(gid, -1) if gid else -1
        if same < 0:
            s = by_symbol.get(symbol, -1)
            if s >= 0 and (not gid or not ids[s]):
                same = s
        if same >= 0:
            raise InteropError(f"{where}:{no}: duplicate gene '{symbol}': the same gene as line "
                               f"{same + 1} ('{symbols[same]}')")
        by_symbol.setdefault(symbol, len(symbols))
        if gid:
            by_id[gid] = len(symbols)
        symbols.append(symbol)
        ids.append(gid)
    return Vocabulary(text, symbols, ids)


def read_text_file(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InteropError(f"cannot read the {what} '{path}': {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InteropError(f"{path}: the {what} is not UTF-8 text (byte {e.start})") from None


def read_labels(path: str, expected: int) -> List[str]:
    """Class names, one per line, exactly `expected` of them."""
    text = read_text_file(path, "label file")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    labels = [line[:-1] if line.endswith("\r") else line for line in lines]
    for no, name in enumerate(labels, 1):
        if not name.strip():
            raise InteropError(f"{path}:{no}: empty class name")
        if "\t" in name or "\0" in name:
            raise InteropError(f"{path}:{no}: a class name holds a tab or a NUL byte")
    seen: Dict[str, int] = {}
    for no, name in enumerate(labels, 1):
        if name in seen:
            raise InteropError(f"{path}:{no}: class '{name}' repeats line {seen[name]}")
        seen[name] = no
    if len(labels) != expected:
        raise InteropError(f"{path} names {len(labels)} classes, but the model's classifier has "
                           f"{expected} outputs (rows of its last layer)")
    return labels


# ---------------------------------------------------------------------------
# Configuration (TRAIN_SCHEMA of src/train/schema.c, written as config_to_ini does)
# ---------------------------------------------------------------------------

_SCHEMA_TABLE = re.compile(r"TRAIN_SCHEMA\s*\[\s*\]\s*=\s*\{(.*?)\n\};", re.S)
_SCHEMA_ENTRY = re.compile(r'\{\s*"([A-Za-z0-9_]+\.[A-Za-z0-9_]+)"\s*,\s*(CFG_[A-Z]+)\s*,\s*"((?:[^"\\]|\\.)*)"')


def schema_defaults(path: str = SCHEMA_C) -> "collections.OrderedDict[str, str]":
    """Every configuration key of TRAIN_SCHEMA with its default, in table order.

    Read from perfcell's source, so that an imported checkpoint carries the
    same keys and defaults as one written by this tree's `perfcell`; the
    test suite (tests/suite_interop.sh) compares the result with the
    config.ini that `perfcell pretrain` writes.
    """
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
    except OSError as e:
        raise InteropError(f"cannot read perfcell's configuration schema '{path}': {e.strerror} "
                           "(this tool reads the defaults from the source tree it sits in)") from None
    table = _SCHEMA_TABLE.search(src)
    entries = _SCHEMA_ENTRY.findall(table.group(1)) if table else []
    if not entries:
        raise InteropError(f"{path}: no TRAIN_SCHEMA table found")
    out: "collections.OrderedDict[str, str]" = collections.OrderedDict()
    for key, _, default in entries:
        out[key] = default.encode("utf-8").decode("unicode_escape")
    for key in ("finetune.freeze", SEED_KEY):
        if key not in out:
            raise InteropError(f"{path}: TRAIN_SCHEMA has no key '{key}'")
    return out


def config_to_ini(values: "collections.OrderedDict[str, str]") -> str:
    """The text config_to_ini() writes: '[section]' then 'key = value' lines."""
    out: List[str] = []
    section = None
    for name, value in values.items():
        sec, key = name.split(".", 1)
        if sec != section:
            out.append(("\n" if out else "") + f"[{sec}]\n")
            section = sec
        out.append(f"{key} = {value}\n")
    return "".join(out)


def ini_values(text: str) -> Dict[str, str]:
    """section.key -> value of an INI text as perfcell writes it."""
    values: Dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1].strip()
            continue
        if "=" in s:
            k, v = s.split("=", 1)
            values[f"{section}.{k.strip()}"] = v.strip()
    return values


# ---------------------------------------------------------------------------
# Reading a PyTorch file
# ---------------------------------------------------------------------------

def _restricted_pickle():
    """A pickle module whose Unpickler builds only tensors, containers and numbers.

    Arbitrary code runs during unpickling only through the globals a pickle
    names (find_class); this one resolves only torch's tensor rebuilders,
    dtypes and storages, OrderedDict, and numpy's scalar and array
    rebuilders. Unlike torch 1.13's weights_only loader it reads every pickle
    opcode, so the floats and tuples of an optimizer state (as in scBERT's
    saves) load too.
    """
    import pickle
    import types

    import torch

    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy.core.multiarray", "scalar"): np.core.multiarray.scalar,
        ("numpy.core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    }
    for name in dir(torch):
        if isinstance(getattr(torch, name), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    for mod, names in (("torch._utils", ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                                           "_rebuild_parameter_with_state")),
                       ("torch._tensor", ("_rebuild_from_type_v2",))):
        m = sys.modules.get(mod)
        for name in names:
            if m is not None and hasattr(m, name):
                allowed[(mod, name)] = getattr(m, name)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return allowed[(module, name)]
            if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f"it holds a pickled {module}.{name}, which is neither a tensor "
                                         "nor a number or container")

    mod = types.ModuleType("perfcell_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    return mod


def _load_restricted(path: str):
    """torch.load with _restricted_pickle().

    torch.load's own pickle_module argument is ignored by some torch releases
    (1.13 replaces it with pickle), so the file goes through
    torch.serialization's loaders with the restricted module directly: the
    zip format of torch.save since 1.6, or the legacy pickle format. Where
    those internal loaders are missing or differ, torch.load(weights_only=True)
    reads the file instead.
    """
    import zipfile

    import torch

    ser = torch.serialization
    with open(path, "rb") as f:
        magic = f.read(2)
    try:
        if zipfile.is_zipfile(path):
            if hasattr(ser, "_load") and hasattr(ser, "_open_zipfile_reader"):
                with open(path, "rb") as f, ser._open_zipfile_reader(f) as z:
                    return ser._load(z, "cpu", _restricted_pickle(), encoding="utf-8")
        elif magic[:1] == b"\x80":
            if hasattr(ser, "_legacy_load"):
                with open(path, "rb") as f:
                    return ser._legacy_load(f, "cpu", _restricted_pickle(), encoding="utf-8")
        else:
            raise InteropError(f"{path}: not a PyTorch file (torch.save writes a zip archive, or a pickle "
                               "in its legacy format)")
    except TypeError as e:
        if "_load()" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(path: str, unsafe: bool) -> "collections.OrderedDict[str, object]":
    """The state_dict in a .pth file: raw, or under 'model_state_dict' / 'state_dict'."""
    import torch

    if not os.path.isfile(path):
        raise InteropError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu") if unsafe else _load_restricted(path)
    except InteropError:
        raise
    except Exception as e:  # torch raises many kinds for unreadable files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("" if unsafe else "; if you trust the file, --unsafe-load lets torch unpickle any object")
        raise InteropError(f"{path}: cannot load as a PyTorch file: {msg}{hint}") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise InteropError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    sd = obj
    for key in ("model_state_dict", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            sd = obj[key]
            others = sorted(str(k) for k in obj if k != key)
            if others:
                note(f"{path}: using '{key}'; ignoring the file's other entries ({', '.join(others)})")
            break
    else:
        if not any(torch.is_tensor(v) for v in obj.values()):
            raise InteropError(f"{path}: no state_dict found: the file is a dict of "
                               f"{', '.join(sorted(map(str, obj))[:12])}, without tensors and without "
                               "'model_state_dict' or 'state_dict'")
    sd = collections.OrderedDict((str(k), v) for k, v in sd.items())
    if sd and all(k.startswith("module.") for k in sd):
        note(f"{path}: removed the 'module.' prefix of a DistributedDataParallel state_dict")
        sd = collections.OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


# ---------------------------------------------------------------------------
# The model's shape, from the tensors
# ---------------------------------------------------------------------------

@dataclass
class ModelShape:
    dim: int
    depth: int
    heads: int
    dim_head: int
    nb_features: int
    ff_dim: int
    bins: int
    n_genes: int
    head: str                 # "none", "scbert" or "pooled"
    n_classes: int = 0
    hidden: int = 128         # finetune.hidden: fc2 rows (scBERT) or cls.fc1 rows (pooled)
    mlm: bool = False         # to_out.weight / to_out.bias present
    expected: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # torch shapes

    def describe(self) -> str:
        head = {"none": "no classifier", "scbert": f"scBERT head ({self.n_classes} classes)",
                "pooled": f"pooled head ({self.n_classes} classes)"}[self.head]
        return (f"dim {self.dim}, depth {self.depth}, {self.heads} heads x {self.dim_head}, "
                f"{self.nb_features} random features, ff {self.ff_dim}, {self.bins} bins, "
                f"{self.n_genes} genes, {head}{', MLM head' if self.mlm else ''}")


def encoder_shapes(dim: int, depth: int, inner: int, ff: int, bins: int,
                   n_genes: int) -> "collections.OrderedDict[str, Tuple[int, ...]]":
    """Encoder tensors in perfcell's table order (model_table_add_encoder)."""
    s: "collections.OrderedDict[str, Tuple[int, ...]]" = collections.OrderedDict()
    s["token_emb.weight"] = (bins + 2, dim)
    s["pos_emb.emb.weight"] = (n_genes + 1, dim)
    for i in range(depth):
        a, f = f"performer.net.layers.{i}.0", f"performer.net.layers.{i}.1"
        s[f"{a}.norm.weight"] = (dim,)
        s[f"{a}.norm.bias"] = (dim,)
        s[f"{a}.fn.to_q.weight"] = (inner, dim)
        s[f"{a}.fn.to_k.weight"] = (inner, dim)
        s[f"{a}.fn.to_v.weight"] = (inner, dim)
        s[f"{a}.fn.to_out.weight"] = (dim, inner)
        s[f"{a}.fn.to_out.bias"] = (dim,)
        s[f"{f}.norm.weight"] = (dim,)
        s[f"{f}.norm.bias"] = (dim,)
        s[f"{f}.fn.fn.w1.weight"] = (ff, dim)
        s[f"{f}.fn.fn.w1.bias"] = (ff,)
        s[f"{f}.fn.fn.w2.weight"] = (dim, ff)
        s[f"{f}.fn.fn.w2.bias"] = (dim,)
    s["norm.weight"] = (dim,)
    s["norm.bias"] = (dim,)
    return s


def _shape(t) -> Tuple[int, ...]:
    return tuple(int(x) for x in t.shape)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _listing(names: Sequence[str], limit: int = 12) -> str:
    names = list(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def infer_shape(sd: Dict[str, object], path: str, heads: Optional[int],
                vocab_len: int) -> ModelShape:
    """Sizes of the model from its tensors; every tensor checked against them."""
    import torch

    anchors = ["token_emb.weight", "performer.net.layers.0.0.fn.to_q.weight", PROJ_NAME.format(0),
               "performer.net.layers.0.1.fn.fn.w1.weight"]
    absent = [a for a in anchors if a not in sd]
    if absent:
        found = [k for k, v in sd.items() if torch.is_tensor(v)]
        raise InteropError(f"{path}: not a scBERT / performer-pytorch PerformerLM state_dict: missing "
                           f"{_listing(absent)} (found {_count(len(found), 'tensor')}: {_listing(found, 6)})")
    for a in anchors:
        if len(_shape(sd[a])) != 2:
            raise InteropError(f"{path}: '{a}' has shape {_shape(sd[a])}, expected a matrix")
    n_tokens, dim = _shape(sd["token_emb.weight"])
    bins = n_tokens - 2
    if bins < 1:
        raise InteropError(f"{path}: token_emb.weight has {n_tokens} rows: a model needs bins + 2 "
                           "tokens with at least one bin")
    depth = 1 + max(int(m.group(1)) for m in
                    (re.match(r"performer\.net\.layers\.(\d+)\.", k) for k in sd) if m)
    inner = _shape(sd[anchors[1]])[0]
    nb_features, dim_head = _shape(sd[anchors[2]])
    ff = _shape(sd[anchors[3]])[0]
    if heads is None:
        if inner % dim_head:
            raise InteropError(f"{path}: to_q has {inner} rows, not a multiple of the projection "
                               f"matrices' width {dim_head} (dim_head)")
        heads = inner // dim_head
    elif heads < 1 or inner % heads or inner // heads != dim_head:
        raise InteropError(f"{path}: --heads {heads} does not fit: to_q has {inner} rows (heads x "
                           f"dim_head) and the projection matrices are {dim_head} wide (dim_head), "
                           f"so heads = {inner // dim_head if inner % dim_head == 0 else 'none'}")
    if "pos_emb.emb.weight" in sd:
        n_genes = _shape(sd["pos_emb.emb.weight"])[0] - 1
        if n_genes != vocab_len:
            raise InteropError(f"{path}: pos_emb.emb.weight has {n_genes + 1} rows, so the model "
                               f"knows {n_genes} genes (rows - 1), but the vocabulary has {vocab_len} "
                               "genes; give the vocabulary the model was trained with, in its order")
    else:
        n_genes = vocab_len
    expected = encoder_shapes(dim, depth, inner, ff, bins, n_genes)
    projections = {PROJ_NAME.format(i): (nb_features, dim_head) for i in range(depth)}
    shape = ModelShape(dim, depth, heads, dim_head, nb_features, ff, bins, n_genes, "none")
    if any(k in sd for k in MLM_HEAD):
        shape.mlm = True
        expected["to_out.weight"] = (n_tokens, dim)
        expected["to_out.bias"] = (n_tokens,)
    if any(k.startswith(("to_out.conv1.", "to_out.fc")) for k in sd):
        shape.head = "scbert"
        fc2 = sd.get("to_out.fc2.weight")
        fc3 = sd.get("to_out.fc3.weight")
        shape.hidden = _shape(fc2)[0] if fc2 is not None else 0
        shape.n_classes = _shape(fc3)[0] if fc3 is not None else 0
        conv = _shape(sd["to_out.conv1.weight"]) if "to_out.conv1.weight" in sd else (1, 1, 1, dim)
        expected["to_out.conv1.weight"] = conv if conv == (1, dim) else (1, 1, 1, dim)
        expected["to_out.conv1.bias"] = (1,)
        expected["to_out.fc1.weight"] = (CLS_SCBERT_FC1, n_genes + 1)
        expected["to_out.fc1.bias"] = (CLS_SCBERT_FC1,)
        expected["to_out.fc2.weight"] = (shape.hidden, CLS_SCBERT_FC1)
        expected["to_out.fc2.bias"] = (shape.hidden,)
        expected["to_out.fc3.weight"] = (shape.n_classes, shape.hidden)
        expected["to_out.fc3.bias"] = (shape.n_classes,)
    if any(k.startswith("cls.") for k in sd):
        if shape.head == "scbert":
            raise InteropError(f"{path}: holds both scBERT's classification head (to_out.fc*) and "
                               "perfcell's pooled head (cls.*); a model has one")
        shape.head = "pooled"
        fc1 = sd.get("cls.fc1.weight")
        fc2 = sd.get("cls.fc2.weight")
        shape.hidden = _shape(fc1)[0] if fc1 is not None else 0
        shape.n_classes = _shape(fc2)[0] if fc2 is not None else 0
        expected["cls.fc1.weight"] = (shape.hidden, dim)
        expected["cls.fc1.bias"] = (shape.hidden,)
        expected["cls.fc2.weight"] = (shape.n_classes, shape.hidden)
        expected["cls.fc2.bias"] = (shape.n_classes,)

    tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    wanted = dict(expected)
    wanted.update(projections)
    missing = [k for k in wanted if k not in tensors]
    if "pos_emb.emb.weight" in missing:
        missing.remove("pos_emb.emb.weight")
    unexpected = [k for k in tensors if k not in wanted and k != REDRAW_COUNTER]
    wrong = [f"{k} {_shape(tensors[k])} (expected {wanted[k]})" for k in wanted
             if k in tensors and _shape(tensors[k]) != wanted[k]]
    problems = []
    if missing:
        problems.append(f"missing {_count(len(missing), 'tensor')}: {_listing(missing)}")
    if wrong:
        fc1 = (f" (scBERT's head, as perfcell has it, has {CLS_SCBERT_FC1} units after fc1)"
               if any(w.startswith(("to_out.fc1.", "to_out.fc2.")) for w in wrong) else "")
        problems.append(f"{_count(len(wrong), 'tensor')} of the wrong shape: {_listing(wrong, 6)}{fc1}")
    if unexpected:
        problems.append(f"{_count(len(unexpected), 'tensor')} perfcell's model has no place for (query/key/value "
                        f"biases, local attention, ReZero, GLU or another layout): {_listing(unexpected)}")
    if problems:
        raise InteropError(f"{path}: does not match a PerformerLM of {shape.describe()} (the sizes its "
                           "tensors give): " + "; ".join(problems))
    if shape.head != "none" and (shape.hidden < 1 or shape.n_classes < 1):
        raise InteropError(f"{path}: the classification head has no hidden units or no classes")
    shape.expected = dict(expected)
    return shape


def tensor_f32(t, name: str, path: str) -> Tuple[np.ndarray, Optional[str]]:
    """A tensor as a C-ordered float32 numpy array; a note when it was rounded."""
    import torch

    t = t.detach().cpu()
    if not t.is_floating_point():
        raise InteropError(f"{path}: tensor '{name}' is {t.dtype}, not floating point")
    msg = None
    if t.dtype != torch.float32:
        x64 = t.to(torch.float64).numpy()
        x = x64.astype(np.float32)
        finite = np.isfinite(x64)
        if not finite.all():
            raise InteropError(f"{path}: tensor '{name}' holds NaN or infinite values")
        if not np.isfinite(x).all():
            raise InteropError(f"{path}: tensor '{name}' ({t.dtype}) overflows float32")
        err = float(np.max(np.abs(x.astype(np.float64) - x64))) if x.size else 0.0
        msg = (f"{name}: {str(t.dtype).replace('torch.', '')} rounded to float32 (largest change "
               f"{err:.3g})")
    else:
        x = t.contiguous().numpy()
    if not np.isfinite(x).all():
        raise InteropError(f"{path}: tensor '{name}' holds NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32), msg


# ---------------------------------------------------------------------------
# Writing a checkpoint
# ---------------------------------------------------------------------------

@dataclass
class CheckpointData:
    kind: str
    step: int
    epoch: int
    seed: int
    vocab_hash: str
    tensors: "collections.OrderedDict[str, np.ndarray]"   # perfcell shapes (1-D or 2-D), table order
    trainable: Dict[str, int]
    decay: Dict[str, int]
    projections: List[np.ndarray]                        # (M, E) per layer
    redraw_index: int
    feature_seed: int
    config: str
    vocab: str
    labels: Optional[List[str]]
    scalars: Dict[str, float] = field(default_factory=dict)
    cursor: Optional[np.ndarray] = None
    has_optim: bool = False
    created: str = ""


def _fixed_str_attr(obj, name: str, value: str) -> None:
    """A fixed-length UTF-8 string attribute (checkpoint.c: attr_put_str)."""
    import h5py

    data = value.encode("utf-8")
    obj.attrs.create(name, np.array(data, dtype=h5py.string_dtype("utf-8", max(len(data), 1))))


def _tensor_dataset(group, name: str, x: np.ndarray, meta: Optional[Tuple[int, int, int]]) -> None:
    d = group.create_dataset(name, data=np.ascontiguousarray(x, dtype="<f4"), dtype="<f4")
    d.attrs.create("crc32", np.uint32(crc32_f32(x)))
    d.attrs.create("shape", np.array(x.shape, dtype="<i8"))
    if meta is not None:
        for key, value in zip(("index", "trainable", "decay"), meta):
            d.attrs.create(key, np.int64(value))


def _string_dataset(loc, name: str, strings: Sequence[str], scalar: bool) -> None:
    import h5py

    for s in strings:
        if "\0" in s:
            raise InteropError(f"/{name} would hold a NUL byte, which checkpoints cannot store")
    dt = h5py.string_dtype("utf-8")
    data = strings[0] if scalar else np.array(list(strings), dtype=object)
    d = loc.create_dataset(name, data=data, dtype=dt)
    d.attrs.create("crc32", np.uint32(crc32_strings(strings)))


def _hdf5_library():
    """The HDF5 library h5py runs on, for the one property h5py 3.7 does not
    expose (H5Pset_link_phase_change)."""
    import ctypes
    import h5py  # noqa: F401  (loads the library)
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f
                       if "/libhdf5" in line and ".so" in line and "_hl" not in line.rsplit("/", 1)[-1]})
    for path in libs:
        lib = ctypes.CDLL(path)
        if hasattr(lib, "H5Pset_link_phase_change"):
            lib.H5Pset_link_phase_change.argtypes = [ctypes.c_int64, ctypes.c_uint, ctypes.c_uint]
            lib.H5Pset_link_phase_change.restype = ctypes.c_int
            return lib
    raise InteropError("cannot find the HDF5 library that h5py uses (to write compact groups)")


def _compact_group(parent, name):
    """A group that keeps its links in its object header (compact storage up to
    65535 links), as perfcell writes them: readers refuse dense link storage,
    whose fractal heap and B-tree carry no checksums."""
    import h5py
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    if _hdf5_library().H5Pset_link_phase_change(gcpl.id, 65535, 65535) < 0:
        raise InteropError("HDF5 refused compact link storage for a checkpoint group")
    gid = h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl)
    return h5py.Group(gid)


def root_checksum(c: CheckpointData, created: str) -> int:
    """The root attribute crc32 of a checkpoint without optimizer state: the
    CRC-32 of the lines include/perfcell/checkpoint.h lists."""
    import struct

    lines = [f"format={CKPT_FORMAT} format_version={CKPT_FORMAT_VERSION}",
             f"kind={c.kind} step={c.step} epoch={c.epoch} seed={c.seed} vocab_hash={c.vocab_hash.lower()} "
             f"created={created}"]
    for i, (name, x) in enumerate(c.tensors.items()):
        shape = "x".join(str(d) for d in x.shape)
        lines.append(f"/model/{name} index={i} trainable={int(bool(c.trainable[name]))} "
                     f"decay={int(bool(c.decay[name]))} shape={shape} crc32={crc32_f32(x):08x}")
    lines.append("/optim 0")
    m, e = c.projections[0].shape if c.projections else (0, 0)
    lines.append(f"/buffers depth={len(c.projections)} shape={m}x{e}")
    lines += [f"/buffers/{i} crc32={crc32_f32(p):08x}" for i, p in enumerate(c.projections)]
    lines.append(f"/state redraw_index={c.redraw_index} feature_seed={c.feature_seed}")
    for key in sorted(c.scalars):
        bits = struct.unpack("<Q", struct.pack("<d", float(c.scalars[key])))[0]
        lines.append(f"/state {key}={bits:016x}")
    cursor = np.asarray(c.cursor if c.cursor is not None else np.zeros(0), dtype="<i8")
    lines.append(f"/state/cursor n={cursor.size} crc32={crc32_bytes(cursor.tobytes()) if cursor.size else 0:08x}")
    lines.append(f"/config crc32={crc32_strings([c.config]):08x}")
    lines.append(f"/vocab crc32={crc32_strings([c.vocab]):08x}")
    if c.labels:
        lines.append(f"/labels n={len(c.labels)} crc32={crc32_strings(c.labels):08x}")
    return crc32_bytes("".join(line + "\n" for line in lines).encode("utf-8"))


def write_checkpoint(path: str, c: CheckpointData) -> None:
    """Write `c` to `path` atomically, checked with the reader's rules first."""
    import h5py

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InteropError(f"cannot write '{path}': the folder '{folder}' does not exist")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w", libver=("v108", "v108")) as f:
            _fixed_str_attr(f, "format", CKPT_FORMAT)
            f.attrs.create("format_version", np.int64(CKPT_FORMAT_VERSION))
            _fixed_str_attr(f, "kind", c.kind)
            f.attrs.create("step", np.int64(c.step))
            f.attrs.create("epoch", np.int64(c.epoch))
            f.attrs.create("seed", np.uint64(c.seed))
            _fixed_str_attr(f, "vocab_hash", c.vocab_hash)
            created = c.created or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            _fixed_str_attr(f, "created", created)
            f.attrs.create("crc32", np.uint32(root_checksum(c, created)))
            g = _compact_group(f, "model")
            for i, (name, x) in enumerate(c.tensors.items()):
                _tensor_dataset(g, name, x, (i, c.trainable[name], c.decay[name]))
            b = _compact_group(f, "buffers")
            for i, p in enumerate(c.projections):
                _tensor_dataset(b, PROJ_NAME.format(i), p, None)
            s = _compact_group(f, "state")
            s.attrs.create("redraw_index", np.int64(c.redraw_index))
            s.attrs.create("feature_seed", np.uint64(c.feature_seed))
            for key, value in c.scalars.items():
                s.attrs.create(key, np.float64(value))
            cursor = c.cursor if c.cursor is not None else np.zeros(0, dtype="<i8")
            d = s.create_dataset("cursor", data=np.asarray(cursor, dtype="<i8"), dtype="<i8")
            d.attrs.create("crc32", np.uint32(crc32_bytes(np.asarray(cursor, dtype="<i8").tobytes())))
            _string_dataset(f, "config", [c.config], True)
            _string_dataset(f, "vocab", [c.vocab], True)
            if c.labels:
                _string_dataset(f, "labels", c.labels, False)
        read_checkpoint(tmp, shown_as=path)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise InteropError(f"cannot write '{path}': {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------
# Reading and checking a checkpoint (the rules of ckpt_read in
# src/checkpoint/checkpoint.c)
# ---------------------------------------------------------------------------

class _Checker:
    def __init__(self, path: str, shown_as: str) -> None:
        self.path = path
        self.shown = shown_as
        self.budget = os.path.getsize(path)

    def fail(self, msg: str) -> "InteropError":
        return InteropError(f"checkpoint '{self.shown}': {msg}")

    def take(self, nbytes: int, objname: str) -> None:
        if nbytes > self.budget:
            raise self.fail(f"'{objname}' claims more data than the file holds: the file is truncated "
                            "or corrupt")
        self.budget -= nbytes

    def obj(self, loc, name: str, objname: str, kind: str, required: bool = True):
        import h5py

        if name not in loc:
            if required:
                raise self.fail(f"'{objname}' is missing")
            return None
        link = loc.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise self.fail(f"'{objname}' is a link, not stored in the file")
        o = loc[name]
        want = h5py.Group if kind == "group" else h5py.Dataset
        if not isinstance(o, want):
            raise self.fail(f"'{objname}' is not a {kind}")
        return o

    def attr_int(self, obj, objname: str, attr: str) -> int:
        import h5py

        if attr not in obj.attrs:
            raise self.fail(f"'{objname}' has no '{attr}' attribute")
        aid = obj.attrs.get_id(attr)
        if aid.get_type().get_class() != h5py.h5t.INTEGER or aid.get_space().get_simple_extent_npoints() != 1:
            raise self.fail(f"attribute '{attr}' of '{objname}' is not a single integer")
        return int(np.asarray(obj.attrs[attr]).reshape(-1)[0])

    def attr_flag(self, obj, objname: str, attr: str) -> int:
        v = self.attr_int(obj, objname, attr)
        if v not in (0, 1):
            raise self.fail(f"attribute '{attr}' of '{objname}' is {v}, not 0 or 1")
        return v

    def attr_crc(self, obj, objname: str) -> int:
        v = self.attr_int(obj, objname, "crc32")
        if not 0 <= v <= 0xFFFFFFFF:
            raise self.fail(f"attribute 'crc32' of '{objname}' is not a 32-bit value")
        return v

    def attr_str(self, obj, objname: str, attr: str, limit: int) -> str:
        import h5py

        if attr not in obj.attrs:
            raise self.fail(f"'{objname}' has no '{attr}' attribute")
        aid = obj.attrs.get_id(attr)
        t = aid.get_type()
        if t.get_class() != h5py.h5t.STRING or aid.get_space().get_simple_extent_npoints() != 1:
            raise self.fail(f"attribute '{attr}' of '{objname}' is not a single string")
        if t.is_variable_str():
            raise self.fail(f"attribute '{attr}' of '{objname}' is a variable-length string; "
                            "checkpoints hold fixed-length ones")
        if t.get_size() == 0 or t.get_size() >= limit:
            raise self.fail(f"attribute '{attr}' of '{objname}' is too long ({t.get_size()} bytes)")
        v = obj.attrs[attr]
        v = v.tobytes() if isinstance(v, np.ndarray) else v
        v = v if isinstance(v, bytes) else str(v).encode("utf-8")
        return v.split(b"\0", 1)[0].decode("utf-8", errors="replace")

    def tensor(self, loc, name: str, objname: str) -> Tuple[np.ndarray, object]:
        d = self.obj(loc, name, objname, "dataset")
        if d.dtype.kind != "f" or d.dtype.itemsize != 4:
            raise self.fail(f"tensor '{objname}' is not float32")
        if d.shape is None or not 1 <= len(d.shape) <= 2:
            raise self.fail(f"tensor '{objname}' is not 1-D or 2-D")
        if "shape" not in d.attrs:
            raise self.fail(f"tensor '{objname}' has no valid 'shape' attribute of {len(d.shape)} integers")
        sh = np.asarray(d.attrs["shape"]).reshape(-1)
        if sh.dtype.kind not in "iu" or sh.size != len(d.shape):
            raise self.fail(f"tensor '{objname}' has no valid 'shape' attribute of {len(d.shape)} integers")
        if tuple(int(v) for v in sh) != tuple(d.shape):
            raise self.fail(f"tensor '{objname}' has shape {tuple(d.shape)}, but its 'shape' attribute "
                            f"says {tuple(int(v) for v in sh)}")
        if 0 in d.shape:
            raise self.fail(f"tensor '{objname}' is empty")
        self.take(int(np.prod(d.shape)) * 4, objname)
        crc = self.attr_crc(d, objname)
        x = np.asarray(d[()], dtype=np.float32)
        if crc32_f32(x) != crc:
            raise self.fail(f"tensor '{objname}' is corrupt: CRC-32 {crc32_f32(x):08x}, stored {crc:08x}")
        return x, d

    def strings(self, loc, name: str, scalar: bool) -> List[str]:
        import h5py

        objname = f"/{name}"
        d = self.obj(loc, name, objname, "dataset")
        if d.dtype.kind not in "OSU" or h5py.check_string_dtype(d.dtype) is None:
            raise self.fail(f"'{objname}' is not {'a single string' if scalar else 'a 1-D array of strings'}")
        if scalar and d.size != 1 or not scalar and len(d.shape) != 1:
            raise self.fail(f"'{objname}' is not {'a single string' if scalar else 'a 1-D array of strings'}")
        if d.id.get_type().is_variable_str():
            layout = d.id.get_create_plist().get_layout()
            if d.size and (layout != h5py.h5d.CONTIGUOUS or d.id.get_offset() is None):
                raise self.fail(f"'{objname}' is not stored contiguously, as checkpoints store strings")
        values = d.asstr()[()]
        out = [values] if scalar else list(values)
        out = [v if isinstance(v, str) else str(v) for v in out]
        self.take(sum(len(s.encode("utf-8")) + 1 for s in out), objname)
        crc = self.attr_crc(d, objname)
        if crc32_strings(out) != crc:
            raise self.fail(f"'{objname}' is corrupt: its CRC-32 does not match")
        return out


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or the one a run's checkpoint folder names in `latest`."""
    if not os.path.isdir(path):
        return path
    latest = os.path.join(path, "latest")
    try:
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
    except OSError as e:
        raise InteropError(f"'{path}' is a folder without a readable 'latest' file ({e.strerror}); give "
                           "a checkpoint file (ckpt-*.h5)") from None
    if not name or "/" in name:
        raise InteropError(f"'{latest}' does not hold a checkpoint file name")
    return os.path.join(path, name)


def read_checkpoint(path: str, shown_as: Optional[str] = None) -> CheckpointData:
    """Read and check a perfcell checkpoint; InteropError on the first fault."""
    import h5py

    ck = _Checker(path, shown_as or path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as e:
        raise InteropError(f"cannot read checkpoint '{ck.shown}': {e.strerror}") from None
    if len(head) < 9 or head[:8] != HDF5_SIGNATURE:
        raise ck.fail("not an HDF5 file")
    if head[8] < 2:
        raise ck.fail(f"written in the HDF5 1.6 file format (superblock version {head[8]}), without "
                      "metadata checksums; checkpoints use the 1.8 format (h5py: libver='v108')")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ck.fail(f"cannot open (the file is truncated or damaged): {e}") from None
    with f:
        if f.userblock_size != 0:
            raise ck.fail(f"unusual HDF5 file layout (user block {f.userblock_size})")
        if "format" not in f.attrs:
            raise ck.fail("not a perfcell checkpoint (no 'format' attribute on the root group)")
        fmt = ck.attr_str(f, "/", "format", 64)
        if fmt != CKPT_FORMAT:
            raise ck.fail(f"not a perfcell checkpoint (format is '{fmt}', expected '{CKPT_FORMAT}')")
        version = ck.attr_int(f, "/", "format_version")
        if version != CKPT_FORMAT_VERSION:
            raise ck.fail(f"checkpoint format version {version}; this tool reads version {CKPT_FORMAT_VERSION}")
        kind = ck.attr_str(f, "/", "kind", 16)
        if not kind_ok(kind):
            raise ck.fail(f"the checkpoint kind '{kind}' is not a short lower-case word")
        step, epoch = ck.attr_int(f, "/", "step"), ck.attr_int(f, "/", "epoch")
        seed = ck.attr_int(f, "/", "seed")
        if step < 0 or epoch < 0:
            raise ck.fail(f"negative step ({step}) or epoch ({epoch})")
        vocab_hash = ck.attr_str(f, "/", "vocab_hash", 64)
        if re.fullmatch(r"[0-9a-f]{16}", vocab_hash) is None:
            raise ck.fail(f"the vocabulary hash '{vocab_hash}' is not 16 hexadecimal digits")
        created = ck.attr_str(f, "/", "created", 40)

        g = ck.obj(f, "model", "/model", "group")
        if len(g) == 0:
            raise ck.fail("'/model' holds no tensors")
        entries = []
        for name in sorted(g):
            if not name_ok(name, PARAM_NAME_MAX):
                raise ck.fail(f"an entry of '/model' has an unusable name ({name!r})")
            objname = f"/model/{name}"
            x, d = ck.tensor(g, name, objname)
            entries.append((ck.attr_int(d, objname, "index"), name, x,
                            ck.attr_flag(d, objname, "trainable"), ck.attr_flag(d, objname, "decay")))
        if sorted(e[0] for e in entries) != list(range(len(entries))):
            raise ck.fail(f"the indices of the {len(entries)} tensors of /model are not 0..{len(entries) - 1}")
        entries.sort()
        tensors = collections.OrderedDict((e[1], e[2]) for e in entries)
        trainable = {e[1]: e[3] for e in entries}
        decay = {e[1]: e[4] for e in entries}

        has_optim = False
        og = ck.obj(f, "optim", "/optim", "group", required=False)
        if og is not None:
            has_optim = True
            names = sorted(n for n in tensors if trainable[n])
            for which in ("exp_avg", "exp_avg_sq"):
                mg = ck.obj(og, which, f"/optim/{which}", "group")
                for n in mg:
                    if n not in tensors or not trainable[n]:
                        raise ck.fail(f"'/optim/{which}/{n}' is an optimizer moment of "
                                      f"{'a tensor marked frozen' if n in tensors else 'no tensor of /model'}")
                for n in names:
                    x, _ = ck.tensor(mg, n, f"/optim/{which}/{n}")
                    if x.shape != tensors[n].shape:
                        raise ck.fail(f"'/optim/{which}/{n}' has shape {x.shape}, its tensor {tensors[n].shape}")

        bg = ck.obj(f, "buffers", "/buffers", "group")
        projections = []
        for i in range(len(bg)):
            x, _ = ck.tensor(bg, PROJ_NAME.format(i), f"/buffers/{PROJ_NAME.format(i)}")
            if x.ndim != 2 or x.shape != (projections[0].shape if projections else x.shape):
                raise ck.fail(f"projection matrix {i} has shape {x.shape}, layer 0's is "
                              f"{projections[0].shape if projections else None}")
            projections.append(x)

        sg = ck.obj(f, "state", "/state", "group")
        redraw_index = ck.attr_int(sg, "/state", "redraw_index")
        feature_seed = ck.attr_int(sg, "/state", "feature_seed")
        scalars = {}
        for key in sorted(sg.attrs):
            if not name_ok(key, SCALAR_KEY_MAX):
                raise ck.fail(f"an attribute of '/state' has an unusable name ({key!r})")
            if key in ("redraw_index", "feature_seed"):
                continue
            aid = sg.attrs.get_id(key)
            if aid.get_type().get_class() != h5py.h5t.FLOAT or aid.get_space().get_simple_extent_npoints() != 1:
                raise ck.fail(f"attribute '{key}' of '/state' is not a single floating-point number")
            scalars[key] = float(np.asarray(sg.attrs[key]).reshape(-1)[0])
        cd = ck.obj(sg, "cursor", "/state/cursor", "dataset")
        if cd.dtype.kind not in "iu" or cd.dtype.itemsize != 8 or len(cd.shape or ()) != 1:
            raise ck.fail("'/state/cursor' is not a 1-D array of 64-bit integers")
        cursor = np.asarray(cd[()], dtype="<i8")
        ck.take(cursor.size * 8, "/state/cursor")
        if crc32_bytes(cursor.tobytes()) != ck.attr_crc(cd, "/state/cursor"):
            raise ck.fail("'/state/cursor' is corrupt: its CRC-32 does not match")

        config = ck.strings(f, "config", True)[0]
        vocab = ck.strings(f, "vocab", True)[0]
        labels = None
        if ck.obj(f, "labels", "/labels", "dataset", required=False) is not None:
            labels = ck.strings(f, "labels", False)
    v = parse_vocabulary(vocab, f"checkpoint '{ck.shown}': /vocab")
    if f"{v.hash():016x}" != vocab_hash:
        raise ck.fail(f"the stored vocabulary's hash is {v.hash():016x}, the file says {vocab_hash}")
    return CheckpointData(kind, step, epoch, seed, vocab_hash, tensors, trainable, decay, projections,
                          redraw_index, feature_seed, config, vocab, labels, scalars, cursor, has_optim,
                          created)


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------

def _freeze(names: Sequence[str], depth: int, gene_frozen: bool, kind: str,
            policy: str) -> Dict[str, int]:
    """Trainable flags as perfcell's trainers set them (finetune.c: apply_freeze)."""
    out = {}
    keep = f"performer.net.layers.{depth - 2 if depth >= 2 else 0}."
    for n in names:
        t = 1
        if n == "pos_emb.emb.weight":
            t = 0 if gene_frozen else 1
        if kind == "finetune" and not n.startswith(("to_out.", "cls.")):
            if policy == "all":
                t = 0
            elif policy == "embeddings":
                t = 0 if n in ("token_emb.weight", "pos_emb.emb.weight") else 1
            elif policy == "scbert":
                t = 1 if n.startswith("norm.") or n.startswith(keep) else 0
        out[n] = t
    return out


def _decay(name: str, ndim: int) -> int:
    """Weight decay applies to the weight matrices of linear layers (and the conv)."""
    return int(name.endswith(".weight") and ndim == 2 and not name.endswith("emb.weight"))


def cmd_import(args: argparse.Namespace) -> int:
    vocab = parse_vocabulary(read_text_file(args.vocab, "vocabulary"), args.vocab)
    schema = schema_defaults()
    sd = load_state_dict(args.model, args.unsafe_load)
    import torch

    skipped = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if skipped:
        note(f"{args.model}: skipped the state_dict's entries that are not tensors ({len(skipped)}): "
             f"{_listing(skipped)}")
    if REDRAW_COUNTER in sd:
        note(f"{args.model}: skipped {REDRAW_COUNTER} (performer-pytorch's redraw counter; perfcell "
             "redraws its random features by optimizer step and starts at redraw index 0)")
    shape = infer_shape(sd, args.model, args.heads, len(vocab))
    kind = "finetune" if shape.head != "none" else "pretrain"
    if kind == "finetune":
        if args.labels is None:
            raise InteropError(f"{args.model} has a classification head with {shape.n_classes} outputs: "
                               "give their class names with --labels FILE (one per line, in output "
                               "order; for scBERT, the entries of its label_dict)")
        labels = read_labels(args.labels, shape.n_classes)
    else:
        if args.labels is not None:
            raise InteropError(f"--labels {args.labels} given, but {args.model} has no classification "
                               "head (to_out.fc3 or cls.fc2)")
        labels = None
    if shape.head == "scbert" and args.mode != "full":
        raise InteropError(f"{args.model} has scBERT's classification head, which reads every gene "
                           "position: it needs --mode full")

    overrides = {"data.mode": args.mode, "model.dim": shape.dim, "model.depth": shape.depth,
                 "model.heads": shape.heads, "model.dim_head": shape.dim_head,
                 "model.nb_features": shape.nb_features, "model.ff_dim": shape.ff_dim,
                 "model.bins": shape.bins, "model.gene_emb": args.gene_emb,
                 "finetune.head": ("pooled" if shape.head == "pooled"
                                   else "scbert" if args.mode == "full" else "auto"),
                 "finetune.hidden": shape.hidden}
    if shape.head == "pooled":
        overrides["finetune.pooling"] = args.pooling
    values = collections.OrderedDict(schema)
    for key, value in overrides.items():
        if key not in values:
            raise InteropError(f"{SCHEMA_C}: TRAIN_SCHEMA has no key '{key}'")
        values[key] = str(value)
    config = config_to_ini(values)

    tensors: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
    for name, torch_shape in shape.expected.items():
        if name == "pos_emb.emb.weight" and name not in sd:
            note(f"{args.model} has no gene embedding (scBERT without gene2vec): pos_emb.emb.weight "
                 f"is written as zeros {torch_shape}, model.gene_emb = {args.gene_emb}")
            tensors[name] = np.zeros(torch_shape, dtype=np.float32)
            continue
        x, msg = tensor_f32(sd[name], name, args.model)
        if msg:
            note(f"{args.model}: {msg}")
        if name == "to_out.conv1.weight":
            x = x.reshape(1, shape.dim)   # perfcell stores the (1, 1, 1, C) kernel as (1, C)
        tensors[name] = x
    projections = []
    for i in range(shape.depth):
        x, msg = tensor_f32(sd[PROJ_NAME.format(i)], PROJ_NAME.format(i), args.model)
        if msg:
            note(f"{args.model}: {msg}")
        projections.append(x)
    seed = int(schema[SEED_KEY])
    ckpt = CheckpointData(
        kind=kind, step=0, epoch=0, seed=seed, vocab_hash=f"{vocab.hash():016x}", tensors=tensors,
        trainable=_freeze(list(tensors), shape.depth, args.gene_emb == "frozen", kind,
                          values["finetune.freeze"]),
        decay={n: _decay(n, x.ndim) for n, x in tensors.items()},
        projections=projections, redraw_index=0, feature_seed=seed, config=config, vocab=vocab.text,
        labels=labels)
    write_checkpoint(args.out, ckpt)
    n_params = sum(x.size for x in tensors.values())
    print(f"wrote {args.out}: {kind} checkpoint, {shape.describe()}; {len(tensors)} tensors, "
          f"{n_params} parameters, {args.mode} mode, gene embedding {args.gene_emb}")
    return 0


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------

def checkpoint_state_dict(c: CheckpointData) -> "collections.OrderedDict[str, object]":
    """The checkpoint's tensors under scBERT's names and torch shapes (float32)."""
    import torch

    sd: "collections.OrderedDict[str, object]" = collections.OrderedDict()
    placed = set()
    for name, x in c.tensors.items():
        if name.startswith("contrastive."):
            continue
        if name == "to_out.conv1.weight":
            x = x.reshape(1, 1, 1, -1)
        sd[name] = torch.from_numpy(np.array(x, dtype=np.float32))
        m = re.fullmatch(r"performer\.net\.layers\.(\d+)\.0\.norm\.bias", name)
        if m and int(m.group(1)) < len(c.projections):
            # PerformerLM registers the projection after the layer's norm.
            i = int(m.group(1))
            sd[PROJ_NAME.format(i)] = torch.from_numpy(np.array(c.projections[i], dtype=np.float32))
            placed.add(i)
    for i, p in enumerate(c.projections):
        if i not in placed:
            sd[PROJ_NAME.format(i)] = torch.from_numpy(np.array(p, dtype=np.float32))
    return sd


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    args.checkpoint = resolve_checkpoint(args.checkpoint)
    c = read_checkpoint(args.checkpoint)
    sd = checkpoint_state_dict(c)
    dropped = [n for n in c.tensors if n.startswith("contrastive.")]
    if dropped:
        note(f"left out {len(dropped)} tensors of perfcell's contrastive projection "
             f"({_listing(dropped, 4)}): scBERT's model has no place for them")
    if any(n.startswith("cls.") for n in sd):
        note("cls.* is perfcell's pooled classification head; scBERT's PerformerLM has no such module")
    if args.redraw_counter:
        sd[REDRAW_COUNTER] = torch.tensor(0)
    obj = {"model_state_dict": sd} if args.wrap else sd
    cfg = ini_values(c.config)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise InteropError(f"cannot write '{args.out}': the folder '{folder}' does not exist")
    tmp = os.path.join(folder, f".{os.path.basename(args.out)}.tmp-{os.getpid()}")
    written = []
    try:
        torch.save(obj, tmp)
        os.replace(tmp, args.out)
        written.append(args.out)
        if args.vocab_out:
            _write_text(args.vocab_out, c.vocab)
            written.append(args.vocab_out)
        if args.labels_out:
            if not c.labels:
                raise InteropError(f"--labels-out: checkpoint '{args.checkpoint}' holds no labels")
            _write_text(args.labels_out, "".join(f"{s}\n" for s in c.labels))
            written.append(args.labels_out)
    except OSError as e:
        for p in written:
            os.unlink(p)
        raise InteropError(f"cannot write '{args.out}': {e.strerror or e}") from None
    except InteropError:
        for p in written:
            os.unlink(p)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    te = c.tensors["token_emb.weight"]
    n_genes = c.tensors["pos_emb.emb.weight"].shape[0] - 1
    ctor = (f"PerformerLM(num_tokens={te.shape[0]}, dim={te.shape[1]}, depth={len(c.projections)}, "
            f"max_seq_len={n_genes + 1}, heads={cfg.get('model.heads', '?')}, "
            f"dim_head={c.projections[0].shape[1]}, nb_features={c.projections[0].shape[0]}, "
            f"local_attn_heads=0, g2v_position_emb=True)")
    print(f"wrote {args.out}: {len(sd)} entries from {c.kind} checkpoint {args.checkpoint} "
          f"(step {c.step}); scBERT's model for it: {ctor}")
    if c.labels:
        print(f"classes ({len(c.labels)}, the order of the head's outputs): {', '.join(c.labels)}")
    return 0


def _write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    args.checkpoint = resolve_checkpoint(args.checkpoint)
    c = read_checkpoint(args.checkpoint)
    n_params = sum(x.size for x in c.tensors.values())
    proj = (f"{len(c.projections)} x {c.projections[0].shape}" if c.projections else "none")
    print(f"{args.checkpoint}: OK: {c.kind} checkpoint, step {c.step}, {len(c.tensors)} tensors "
          f"({n_params} parameters), projections {proj}, vocabulary hash {c.vocab_hash}, "
          f"{len(c.labels or [])} labels, {'with' if c.has_optim else 'no'} optimizer state")
    return 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.pth",
                   help="scBERT / performer-pytorch PerformerLM state_dict (raw, or under "
                        "'model_state_dict' or 'state_dict')")
    p.add_argument("--vocab", required=True, metavar="VOCAB.tsv",
                   help="the model's genes in pos_emb row order, one per line ('symbol' or "
                        "'symbol<TAB>ensembl_id'); its length must be pos_emb rows - 1")
    p.add_argument("--out", required=True, metavar="CKPT.h5", help="perfcell checkpoint to write")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads (default: to_q rows / projection width, 10 for scBERT); "
                        "checked against the tensors")
    p.add_argument("--labels", metavar="LABELS.txt", default=None,
                   help="class names of the classification head, one per line in output order "
                        "(required when the model has one)")
    p.add_argument("--gene-emb", choices=("frozen", "learned"), default="frozen",
                   help="model.gene_emb: keep the gene embedding frozen (scBERT's gene2vec, "
                        "default) or let fine-tuning train it")
    p.add_argument("--mode", choices=("full", "nonzero"), default="full",
                   help="data.mode: every gene in vocabulary order, as scBERT (default), or only "
                        "each cell's nonzero genes (not with scBERT's classification head)")
    p.add_argument("--pooling", choices=("mean", "last"), default="mean",
                   help="finetune.pooling of perfcell's pooled head (cls.*); unused otherwise")
    p.add_argument("--unsafe-load", action="store_true",
                   help="let torch.load unpickle any object (only for files you trust); without it "
                        "only tensors, numbers, strings and containers are read")
    p.set_defaults(func=cmd_import)


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT.h5",
                   help="perfcell checkpoint, or a checkpoint folder (RUN_DIR/best): the file its "
                        "'latest' names")
    p.add_argument("--out", required=True, metavar="MODEL.pth", help="PyTorch file to write")
    p.add_argument("--wrap", action="store_true",
                   help="write {'model_state_dict': state_dict}, as scBERT's scripts load it")
    p.add_argument("--redraw-counter", action="store_true",
                   help=f"add {REDRAW_COUNTER} = 0 (int64), which scBERT's own PerformerLM expects "
                        "when loading with strict=True")
    p.add_argument("--vocab-out", metavar="VOCAB.tsv", help="also write the checkpoint's vocabulary")
    p.add_argument("--labels-out", metavar="LABELS.txt",
                   help="also write the checkpoint's class names, one per line")
    p.set_defaults(func=cmd_export)


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT.h5", help="perfcell checkpoint, or a checkpoint folder")
    p.set_defaults(func=cmd_verify)


def _docs(section: str) -> str:
    """The part of the module docstring about one subcommand."""
    m = re.search(rf"^{section}\n(.*?)(?=^\S|\Z)", __doc__, re.S | re.M)
    return m.group(1).rstrip() if m else ""


def run(argv: Sequence[str], only: Optional[str] = None, prog: Optional[str] = None) -> int:
    """Parse argv and run one subcommand (`only` fixes it, for the per-command scripts)."""
    fmt = argparse.RawDescriptionHelpFormatter
    adders = {"import": _add_import, "export": _add_export, "verify": _add_verify}
    if only:
        p = argparse.ArgumentParser(prog=prog, formatter_class=fmt, description=_docs(only))
        adders[only](p)
    else:
        p = argparse.ArgumentParser(prog=prog, formatter_class=fmt,
                                    description=__doc__.split("\n\n", 1)[0],
                                    epilog="`SUBCOMMAND --help` describes each.")
        sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
        short = {"import": "a scBERT / performer-pytorch .pth -> a perfcell checkpoint",
                 "export": "a perfcell checkpoint -> a scBERT state_dict (.pth)",
                 "verify": "check a checkpoint with the rules of perfcell's reader"}
        for name, add in adders.items():
            add(sub.add_parser(name, formatter_class=fmt, description=_docs(name), help=short[name]))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except InteropError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
