"""Does canonicalising hidden units make a per-task-init zoo structured again? (issue 13, item 4)

For each gauge (none / sort / match) of `rpg.experiments.task_zoo.canonical`, on a zoo's training split: how much
closer Hamming-1 neighbours' heads are than any two tasks' heads, and the seen-VALIDATION accuracy (held-out training
images) of the affine / nearest baselines built in that gauge. Unseen tasks are never read. Writes
results/probes/canonical_alignment.csv (one row per zoo x gauge).

    PYTHONPATH=. python probes/canonical_alignment.py --features results/features/cifar10_binary/features.safetensors \
        --zoo shared=results/zoo/cifar10_binary per_task=results/study/zoos/<key> --split results/study/per_task_init/split.json
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from rpg.experiments.task_zoo.alignment import alignment_report
from rpg.experiments.task_zoo.canonical import CANONICALISE
from rpg.experiments.task_zoo.features import load_features
from rpg.experiments.task_zoo.heads import HeadEvaluator
from rpg.experiments.task_zoo.pipeline import read_split
from rpg.utils import write_csv_atomic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", required=True)
    p.add_argument("--zoo", nargs="+", required=True, help="name=folder pairs")
    p.add_argument("--split", required=True, help="split.json (train / val tasks)")
    p.add_argument("--n-checkpoints", type=int, default=3)
    p.add_argument("--out", default="results/probes/canonical_alignment.csv")
    args = p.parse_args()
    torch.set_num_threads(2)
    feats = load_features(args.features)
    evaluator = HeadEvaluator(feats["val_x"], feats["val_y"])
    split = read_split(args.split)
    rows = []
    for entry in args.zoo:
        name, folder = entry.split("=", 1)
        for method in CANONICALISE:
            start = time.time()
            rows.append({"zoo": name, **alignment_report(Path(folder), split, args.n_checkpoints, method, evaluator),
                         "seconds": round(time.time() - start, 1)})
            print(rows[-1], flush=True)
    write_csv_atomic(args.out, pd.DataFrame(rows).round(4))


if __name__ == "__main__":
    main()
