"""Context for Table 11/16: how well do *seen* tasks' original heads do on each unseen task?

For every unseen task, evaluates (on the unseen task's test labels) the zoo heads of the seen training tasks whose
embedding differs in one bit (Hamming distance 1), and the head of the bitwise complement with its two outputs
swapped (the same classifier, relabelled: Table 12's "flip"), beside the task's own original accuracy and RPG's.
If RPG only copied a one-bit neighbour its accuracy would look like that column; the complement column shows that
a seen complement already holds the answer up to a relabelling, which a generator can learn to exploit. Writes results/benchmarks/neighbour_baseline.csv.

    .venv/bin/python benchmarks/neighbour_baseline.py            # after `make table11`
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from rpg.experiments.task_zoo.features import load_features
from rpg.experiments.task_zoo.pipeline import read_split
from rpg.experiments.task_zoo.tasks import id_to_embedding
from rpg.utils import write_csv_atomic
from rpg.experiments.task_zoo.heads import evaluate_heads, load_task_checkpoints, stack_state_dicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cifar10_binary")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default="results/benchmarks/neighbour_baseline.csv")
    args = p.parse_args()
    r, e = args.results, args.experiment
    feats = load_features(f"{r}/features/{e}/features.safetensors")
    split = read_split(f"{r}/zoo/{e}/split.json")
    train = set(split.train)
    samples = pd.read_csv(f"{r}/generated/{e}/samples.csv")
    rows = []
    for t in split.unseen:
        neighbours = [t ^ (1 << b) for b in range(10) if t ^ (1 << b) in train]
        sds, _ = load_task_checkpoints(f"{r}/zoo/{e}", neighbours, 1)
        acc = evaluate_heads(stack_state_dicts(sds), [t] * len(sds), feats["test_x"], feats["test_y"])["accuracy"]
        comp = (1 << 10) - 1 - t
        comp_acc = float("nan")
        if comp in train:
            sd = load_task_checkpoints(f"{r}/zoo/{e}", [comp], 1)[0][0]
            swapped = {**sd, "2.weight": sd["2.weight"].flip(0)}  # output 0 <-> 1
            comp_acc = 100 * float(evaluate_heads(stack_state_dicts([swapped]), [t], feats["test_x"],
                                                  feats["test_y"])["accuracy"][0])
        own = samples[(samples.task_id == t) & (samples.group == "unseen")]
        rows.append({
            "task_id": t, "embedding": id_to_embedding(t), "n_seen_neighbours": len(neighbours),
            "best_neighbour_acc": 100 * float(acc.max()) if len(acc) else float("nan"),
            "mean_neighbour_acc": 100 * float(acc.mean()) if len(acc) else float("nan"),
            "complement_swapped_acc": comp_acc,
            "original_acc": 100 * own[own.kind == "original"].accuracy.mean(),
            "rpg_mean_acc": 100 * own[own.kind == "rpg"].accuracy.mean(),
        })
    frame = pd.DataFrame(rows)
    mean = frame.drop(columns=["embedding", "task_id"]).mean().to_frame().T.assign(embedding="mean", task_id="")
    frame = pd.concat([frame, mean])
    print(frame.round(2).to_string(index=False))
    write_csv_atomic(args.out, frame.round(3))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
