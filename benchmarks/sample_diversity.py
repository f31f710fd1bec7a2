"""Are generated heads copies? Per unseen task: IoU of misclassified test images (rpg.experiments.task_zoo.analysis) between the
generated samples and the task's held-out originals, among the originals, and among the samples, plus L2 distances
in weight space. Writes results/benchmarks/sample_diversity.csv.

    .venv/bin/python benchmarks/sample_diversity.py        # after `make table11`
"""

from __future__ import annotations

import argparse
import glob

import pandas as pd
import torch

from rpg.experiments.task_zoo.analysis import max_iou_to_reference, misclassified_iou
from rpg.experiments.task_zoo.features import load_features
from rpg.experiments.task_zoo.pipeline import read_split
from rpg.experiments.task_zoo.tasks import binary_labels
from rpg.utils import load_safetensors, write_csv_atomic
from rpg.experiments.task_zoo.heads import HeadEvaluator, load_task_checkpoints


def _flat(sds: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.cat([v.flatten() for v in sd.values()]) for sd in sds])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cifar10_binary")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default="results/benchmarks/sample_diversity.csv")
    args = p.parse_args()
    r, e = args.results, args.experiment
    feats = load_features(f"{r}/features/{e}/features.safetensors")
    evaluator = HeadEvaluator(feats["test_x"], feats["test_y"])
    rows = []
    for t in read_split(f"{r}/zoo/{e}/split.json").unseen:
        paths = sorted(glob.glob(f"{r}/generated/{e}/models/{t:04d}_s*.safetensors"))
        gen = [load_safetensors(path)[0] for path in paths]
        orig, _ = load_task_checkpoints(f"{r}/zoo/{e}", [t], 3)
        y = binary_labels(feats["test_y"], [t])[0]
        pg, po = evaluator.predict(gen), evaluator.predict(orig)
        pairwise = misclassified_iou(pg, pg, y)
        n = len(pg)
        rows.append({
            "task_id": t, "n_samples": n,
            "gen_to_orig_max_iou": max_iou_to_reference(pg, po, y).mean().item(),
            "orig_to_orig_max_iou": max_iou_to_reference(po, po, y, exclude_self=True).mean().item(),
            "gen_to_gen_mean_iou": ((pairwise.sum() - pairwise.diag().sum()) / (n * n - n)).item(),
            "gen_to_nearest_orig_l2": torch.cdist(_flat(gen), _flat(orig)).min(1).values.mean().item(),
            "orig_to_orig_l2": torch.pdist(_flat(orig)).mean().item(),
            "gen_to_gen_l2": torch.pdist(_flat(gen)).mean().item(),
        })
    frame = pd.DataFrame(rows)
    mean = frame.drop(columns=["task_id"]).mean().to_frame().T.assign(task_id="mean")
    frame = pd.concat([frame, mean], ignore_index=True)
    print(frame.round(3).to_string(index=False))
    write_csv_atomic(args.out, frame.round(4))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
