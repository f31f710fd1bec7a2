"""Figure of `bench_train_memory.py`'s output: training memory (train peak) vs. generated parameters, one line per
configuration (activation checkpointing, token size), beside the paper's claim.

The paper (Fig. 9b / Table 8) reports GPU memory that stays almost flat as the generated model grows; its numbers
are not reproduced here (other hardware, other generator sizes), so the claim is drawn as what it says: a flat
guide, with the issue's target slope (memory ~ params^0.3) and a linear slope for scale.

    .venv/bin/python benchmarks/plot_train_memory.py results/benchmarks/train_memory.csv \
        --out results/benchmarks/train_memory.png

Several CSVs (e.g. runs before and after a change) go on one figure, each line labelled with its `--labels` entry:

    .venv/bin/python benchmarks/plot_train_memory.py old.csv new.csv --labels "before" "now" --out both.png
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, nargs="+", help="train_memory.csv file(s) written by bench_train_memory.py")
    p.add_argument("--labels", nargs="+", default=None, help="one prefix per CSV for its lines' labels")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the first CSV)")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.csv):
        p.error(f"--labels needs one entry per CSV ({len(args.csv)}), got {len(args.labels)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, lines = [], defaultdict(list)  # lines: (prefix, variant) -> [(params, train peak MB, step s)]
    for i, path in enumerate(args.csv):
        with path.open() as fh:
            these = [r for r in csv.DictReader(fh) if r["row"] == "size"]
        rows += these
        prefix = args.labels[i] if args.labels else ""
        for r in these:
            lines[prefix, r.get("variant") or "off"].append(
                (float(r["n_params"]), float(r["train_peak_mb"]), float(r["step_s"])))
    cpu = rows[0].get("cpu_model", "") if rows else ""

    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = {"off": "no checkpointing", "layer": "checkpointing per block (all tokens)"}
    for (prefix, name), pts in lines.items():
        pts.sort()
        xs, ys, ts = zip(*pts)
        base, _, token = name.partition("@")
        base, _, allocator = base.partition("+")
        label = labels.get(base, f"checkpointing per {base.split('/')[-1]}-token segment"
                           if base.startswith("segment") else base)
        if allocator:
            label += f", glibc {allocator.replace('mmap', 'mmap threshold ')}"
        if token:
            label += f", token size {token}"
        if prefix:
            label = f"{prefix}: {label}"
        ax.plot(xs, ys, marker="o", label=label)
        ax_t.plot(xs, ts, marker="o", label=label)
    all_x = [x for pts in lines.values() for x, _, _ in pts]
    lo, hi = min(all_x), max(all_x)
    y0 = min(y for pts in lines.values() for _, y, _ in pts)
    # Guides anchored at 1M parameters (the start of the target range) on the lowest measured memory.
    x_anchor = 1e6
    for k, style, text in ((0.0, ":", "paper's claim: almost flat (Fig. 9b / Table 8, GPU)"),
                           (0.3, "--", "target: memory ~ params^0.3 (1M-30M)"),
                           (1.0, "-.", "linear: memory ~ params")):
        xs = [x_anchor, hi]
        ax.plot(xs, [y0 * (x / x_anchor) ** k for x in xs], color="grey", linestyle=style, linewidth=1, label=text)
    for a in (ax, ax_t):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("generated parameters")
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("train peak memory (MB, RSS increase over a step)")
    ax.set_title("RPG training memory vs. generated model size")
    ax_t.set_ylabel("seconds per training step")
    ax_t.set_title("step time (1 thread)")
    ax.legend(fontsize=7, loc="upper left")
    ax_t.legend(fontsize=7, loc="upper left")
    ax.set_xlim(lo / 1.5, hi * 1.5)
    ax_t.set_xlim(lo / 1.5, hi * 1.5)
    fig.suptitle(f"bench_train_memory.py, cpu_tiny RPG, fp32 on {cpu}" if cpu else "bench_train_memory.py",
                 fontsize=9)
    fig.tight_layout()
    out = args.out or args.csv[0].with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
