#!/usr/bin/env python3
"""Plot a perfcell metrics file (RUN_DIR/metrics.jsonl) to PNG or SVG.

    /usr/bin/python3 tools/plot_metrics.py runs/pbmc_demo/metrics.jsonl -o loss.png

Panels: training and validation masked loss, masked accuracy, learning rate
and throughput (and the contrastive loss when the run has one).
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not a JSON line ({e})")
    if not rows:
        sys.exit(f"{path}: no metrics yet")
    return rows


def series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", help="metrics.jsonl of a run")
    ap.add_argument("-o", "--out", default="metrics.png", help="output file (.png or .svg)")
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    rows = load(a.metrics)

    panels = [("loss", "val_loss", "masked loss"), ("acc", "val_acc", "masked accuracy"),
              ("lr", None, "learning rate"), ("cells_per_s", None, "cells / s")]
    if any("contrastive_loss" in r for r in rows):
        panels.append(("contrastive_loss", "val_contrastive_loss", "contrastive loss"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (train_key, val_key, title) in zip(axes, panels):
        x, y = series(rows, train_key)
        if x:
            ax.plot(x, y, label="train", lw=1.2)
        if val_key:
            vx, vy = series(rows, val_key)
            if vx:
                ax.plot(vx, vy, "o-", label="validation", lw=1.2, ms=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        if train_key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if a.title:
        fig.suptitle(a.title)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
