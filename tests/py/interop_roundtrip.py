#!/usr/bin/python3
"""scBERT checkpoints in and out of perfcell: round trips and the stored configuration.

    interop_roundtrip.py SCRATCH_DIR

1. A pretraining-shaped PerformerModel state_dict (raw, as torch.save writes
   it) -> scbert_import.py -> perfcell checkpoint (which `perfcell-inspect
   --verify` accepts) -> scbert_export.py: every
   tensor is bitwise identical to the original, float32, and the export loads
   into PerformerModel with strict=True. Then export -> import -> export gives
   the same bytes again.
2. The same for a fine-tuning model with scBERT's head, saved as scBERT does
   ({'epoch', 'model_state_dict', 'optimizer_state_dict', ...} with the redraw
   counter buffer) with class names: kind, labels, the scBERT freezing flags;
   the export (--wrap --redraw-counter) loads strict into a PerformerLM-like
   model whose to_out is scBERT's head.
3. scBERT's float64 gene2vec embedding is rounded to float32 with a note.
4. The /config text equals the config.ini that `perfcell pretrain` writes
   for the same keys (so the defaults read from src/train/schema.c are this
   build's), and the checkpoint holds what include/perfcell/checkpoint.h says.
"""
import os
import subprocess
import sys

import h5py
import numpy as np
import torch

from interop_common import (BIN, CLASSES, CONFIG, HEAD_HIDDEN, check, finetune_model, finish,
                            inspect_verify, pretrain_model, pt, scbert_counter_model, scbert_interop, script,
                            state_dict, tool_ok, write_lines, write_vocab)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes())


def compare_sd(got: dict, want: dict, what: str) -> None:
    check(sorted(got) == sorted(want),
          f"{what}: keys differ: extra {sorted(set(got) - set(want))}, missing {sorted(set(want) - set(got))}")
    for k in want:
        if k in got:
            g = got[k]
            check(torch.is_tensor(g) and same_bits(g, want[k]),
                  f"{what}: {k} differs ({getattr(g, 'dtype', type(g))} {tuple(getattr(g, 'shape', ()))} "
                  f"vs {want[k].dtype} {tuple(want[k].shape)})")


def checkpoint_tensors(path: str) -> dict:
    c = scbert_interop.read_checkpoint(path)
    out = {k: v.tobytes() for k, v in c.tensors.items()}
    out.update({f"proj{i}": p.tobytes() for i, p in enumerate(c.projections)})
    return out


def main() -> None:
    tmp = sys.argv[1]
    vocab = os.path.join(tmp, "vocab.tsv")
    write_vocab(vocab)

    # 1. pretraining-shaped model, through the two scripts as a user runs them
    sd = state_dict(pretrain_model())
    pth = os.path.join(tmp, "pretrain.pth")
    torch.save(sd, pth)
    ck = os.path.join(tmp, "pretrain.h5")
    r = script("scbert_import.py", [pth, "--vocab", vocab, "--out", ck, "--heads", "4"])
    check(r.returncode == 0, f"scbert_import.py failed: {r.stderr}")
    out = os.path.join(tmp, "pretrain_export.pth")
    r = script("scbert_export.py", [ck, "--out", out])
    check(r.returncode == 0, f"scbert_export.py failed: {r.stderr}")
    back = torch.load(out)
    compare_sd(back, sd, "pretrain import -> export")
    check(all(v.dtype == torch.float32 for v in back.values()), "export holds non-float32 tensors")
    m = pt.PerformerModel(CONFIG)
    m.load_state_dict(back, strict=True)

    rc, log = inspect_verify(ck)
    check(rc == 0, f"perfcell-inspect --verify refuses the imported checkpoint: {log}")
    c = scbert_interop.read_checkpoint(ck)
    check(c.kind == "pretrain" and c.step == 0 and c.labels is None and not c.has_optim,
          f"pretrain checkpoint: kind {c.kind}, step {c.step}, labels {c.labels}, optim {c.has_optim}")
    check(c.redraw_index == 0 and c.cursor.size == 0, "redraw index 0 and an empty cursor")
    check(c.trainable["pos_emb.emb.weight"] == 0 and c.trainable["token_emb.weight"] == 1,
          "frozen gene embedding flags")
    check(c.decay["to_out.weight"] == 1 and c.decay["to_out.bias"] == 0 and c.decay["token_emb.weight"] == 0,
          "decay flags")
    with open(vocab, encoding="utf-8") as f:
        check(c.vocab == f.read(), "/vocab is not the vocabulary file's text")
    with open(ck, "rb") as f:
        check(f.read(9)[8] >= 2, "not the HDF5 1.8 format (superblock version >= 2)")
    with h5py.File(ck, "r") as f:
        for attr in ("format", "kind", "vocab_hash", "created"):
            t = f.attrs.get_id(attr).get_type()
            check(not t.is_variable_str(), f"root attribute {attr} is a variable-length string")
        check(f["model/to_out.weight"].attrs["shape"].tolist() == [CONFIG.n_tokens, CONFIG.dim],
              "shape attribute")

    # export -> import -> export: the same bytes again, and the same checkpoint
    ck2 = os.path.join(tmp, "pretrain2.h5")
    vocab2 = os.path.join(tmp, "vocab_out.tsv")
    tool_ok(["export", ck, "--out", os.path.join(tmp, "e1.pth"), "--vocab-out", vocab2])
    tool_ok(["import", os.path.join(tmp, "e1.pth"), "--vocab", vocab2, "--out", ck2])
    tool_ok(["export", ck2, "--out", os.path.join(tmp, "e2.pth")])
    compare_sd(torch.load(os.path.join(tmp, "e2.pth")), sd, "pretrain export -> import -> export")
    check(checkpoint_tensors(ck) == checkpoint_tensors(ck2), "re-imported checkpoint tensors differ")
    c2 = scbert_interop.read_checkpoint(ck2)
    check(c2.config == c.config and c2.vocab_hash == c.vocab_hash, "re-imported config or vocabulary differ")

    # 2. fine-tuning model with scBERT's head, saved the way scBERT saves it
    fm = scbert_counter_model(finetune_model())
    fsd = state_dict(fm)
    check("performer.calls_since_last_redraw" in fsd and "to_out.conv1.weight" in fsd, "fixture keys")
    fpth = os.path.join(tmp, "finetune.pth")
    torch.save({"epoch": 7, "model_state_dict": fsd, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "scheduler_state_dict": {"last_epoch": 6}, "losses": 0.25}, fpth)
    labels = os.path.join(tmp, "labels.txt")
    write_lines(labels, CLASSES)
    fck = os.path.join(tmp, "finetune.h5")
    log = tool_ok(["import", fpth, "--vocab", vocab, "--labels", labels, "--out", fck])
    check("calls_since_last_redraw" in log and "optimizer_state_dict" in log,
          f"import does not say what it skipped: {log}")
    rc, log = inspect_verify(fck)
    check(rc == 0, f"perfcell-inspect --verify refuses the imported fine-tuning checkpoint: {log}")
    c = scbert_interop.read_checkpoint(fck)
    check(c.kind == "finetune" and c.labels == CLASSES, f"finetune checkpoint: {c.kind}, {c.labels}")
    check(c.tensors["to_out.conv1.weight"].shape == (1, CONFIG.dim), "conv1 stored (1, C)")
    check("to_out.weight" not in c.tensors, "a fine-tuned scBERT model has no MLM head")
    cfg = scbert_interop.ini_values(c.config)
    check(cfg["finetune.head"] == "scbert" and cfg["finetune.hidden"] == str(HEAD_HIDDEN)
          and cfg["data.mode"] == "full", f"finetune config: {cfg}")
    # scBERT's freezing (finetune.freeze = scbert): final norm, the second-to-last block, the head
    for name, t in c.trainable.items():
        want = int(name.startswith(("norm.", "to_out.", f"performer.net.layers.{CONFIG.depth - 2}.")))
        check(t == want, f"trainable flag of {name}: {t}, expected {want}")

    fout = os.path.join(tmp, "finetune_export.pth")
    labels2 = os.path.join(tmp, "labels_out.txt")
    tool_ok(["export", fck, "--out", fout, "--wrap", "--redraw-counter", "--labels-out", labels2])
    fback = torch.load(fout)
    check(list(fback) == ["model_state_dict"], f"--wrap: {list(fback)}")
    fback = fback["model_state_dict"]
    compare_sd(fback, fsd, "finetune import -> export")
    check(fback["to_out.conv1.weight"].shape == (1, 1, 1, CONFIG.dim), "conv1 exported (1, 1, 1, C)")
    target = scbert_counter_model(finetune_model(seed=9))
    target.load_state_dict(fback, strict=True)
    with open(labels2, encoding="utf-8") as f:
        check(f.read().splitlines() == CLASSES, "--labels-out")
    fck2 = os.path.join(tmp, "finetune2.h5")
    tool_ok(["export", fck, "--out", os.path.join(tmp, "f1.pth")])
    tool_ok(["import", os.path.join(tmp, "f1.pth"), "--vocab", vocab, "--labels", labels2, "--out", fck2])
    tool_ok(["export", fck2, "--out", os.path.join(tmp, "f2.pth")])
    fsd_plain = {k: v for k, v in fsd.items() if k != "performer.calls_since_last_redraw"}
    compare_sd(torch.load(os.path.join(tmp, "f2.pth")), fsd_plain, "finetune export -> import -> export")
    check(checkpoint_tensors(fck) == checkpoint_tensors(fck2), "re-imported finetune tensors differ")

    # 3. scBERT's gene2vec embedding is float64: rounded to float32, with a note
    sd64 = dict(sd)
    sd64["pos_emb.emb.weight"] = sd["pos_emb.emb.weight"].double() + 1e-12
    p64 = os.path.join(tmp, "g2v64.pth")
    torch.save({"model_state_dict": sd64}, p64)
    log = tool_ok(["import", p64, "--vocab", vocab, "--out", os.path.join(tmp, "g2v64.h5")])
    check("float64 rounded to float32" in log, f"no note on the float64 tensor: {log}")
    c = scbert_interop.read_checkpoint(os.path.join(tmp, "g2v64.h5"))
    check(np.array_equal(c.tensors["pos_emb.emb.weight"], sd64["pos_emb.emb.weight"].float().numpy()),
          "float64 embedding not rounded to nearest float32")

    # 4. the stored configuration is what `perfcell pretrain` resolves for the same keys
    run_dir = os.path.join(tmp, "pretrain_run")
    empty = os.path.join(tmp, "empty.ini")
    open(empty, "w").close()
    cfg = scbert_interop.ini_values(scbert_interop.read_checkpoint(ck).config)
    keys = ["data.mode", "model.dim", "model.depth", "model.heads", "model.dim_head", "model.nb_features",
            "model.ff_dim", "model.bins", "model.gene_emb", "finetune.head", "finetune.hidden"]
    # `perfcell pretrain --print-config` prints config_to_ini() of the resolved
    # configuration (what a run saves as RUN_DIR/config.ini) and runs nothing.
    pc = subprocess.run([os.path.join(BIN, "perfcell"), "pretrain", "--config", empty, "--print-config",
                         f"run.dir={run_dir}", *[f"{k}={cfg[k]}" for k in keys]], capture_output=True, text=True)
    check(pc.returncode == 0 and pc.stdout.startswith("["), f"perfcell pretrain --print-config failed: {pc.stderr}")
    check(not os.path.exists(run_dir), "perfcell pretrain --print-config created the run folder")
    if pc.returncode == 0:
        want = pc.stdout.replace(f"dir = {run_dir}\n", "dir = runs/pretrain\n", 1)
        got = scbert_interop.read_checkpoint(ck).config
        check(got == want, f"/config differs from perfcell's resolved configuration:\n{got}\n---\n{want}")
    check(cfg["model.dim"] == str(CONFIG.dim) and cfg["model.heads"] == str(CONFIG.heads)
          and cfg["model.dim_head"] == str(CONFIG.dim_head) and cfg["model.nb_features"] == str(CONFIG.nb_features)
          and cfg["model.ff_dim"] == str(CONFIG.ff_dim) and cfg["model.depth"] == str(CONFIG.depth)
          and cfg["model.bins"] == str(CONFIG.bins) and cfg["model.gene_emb"] == "frozen",
          f"inferred model keys: {cfg}")
    finish("import/export round trips are bitwise; config matches perfcell's")


if __name__ == "__main__":
    main()
