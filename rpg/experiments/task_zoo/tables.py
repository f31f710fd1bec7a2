"""Paper tables from the evaluated samples (`samples.csv` of the generate stage). Accuracies are in percent.

- table11: the paper's 10 unseen embeddings, in its order; table16: all unseen tasks.
  Columns: original (mean over the task's own checkpoints) and RPG best / mean / min / std over the samples, for
  plain and balanced accuracy, plus the gaps; then original_best, every baseline of
  `rpg.experiments.task_zoo.baselines` (`<name>_acc`, `<name>_bal_acc`), the best baseline and
  `rpg_best_minus_baseline_*`, and the novelty of the samples beside the originals' own (`rpg_l2_novelty` vs
  `original_l2_novelty`, `*_max_iou_original`, `*_pairwise_iou`).
- table12: the flip pair (a seen embedding and its bitwise flip): per-class accuracy of originals, generated and
  the baselines that exist for the task.
- seen_summary: generated vs. original accuracy over the sampled training (seen) tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from rpg.config import Config, config_to_yaml
from rpg.evaluation import (BEST_BASELINE, GAP_BEST, GAP_MEAN, KIND, KIND_ORIGINAL, KIND_RPG, METRICS, NOVELTY,
                            acc_column, best_baseline, best_baseline_column, minus_baseline_column, novelty_column)
from rpg.experiments.task_zoo.baselines import BASELINES
from rpg.experiments.task_zoo.tasks import CIFAR10_CLASSES, embedding_to_id, positive_classes
from rpg.utils import write_csv_atomic, write_text_atomic



def _task_rows(samples: pd.DataFrame, task_ids: Sequence[int]) -> pd.DataFrame:
    rows = []
    for t in task_ids:
        orig = samples[(samples.task_id == t) & (samples[KIND] == KIND_ORIGINAL)]
        gen = samples[(samples.task_id == t) & (samples[KIND] == KIND_RPG)]
        if orig.empty or gen.empty:
            raise ValueError(f"task {t} has no {'original' if orig.empty else 'generated'} models in samples.csv")
        emb = orig.embedding.iloc[0]
        row = {"embedding": emb, "task_id": t, "positive_classes": ", ".join(positive_classes(emb))}
        for metric, short in METRICS:
            g = 100 * gen[metric]
            row[acc_column(KIND_ORIGINAL, None, short)] = 100 * orig[metric].mean()
            row[acc_column(KIND_RPG, "best", short)] = g.max()
            row[acc_column(KIND_RPG, "mean", short)] = g.mean()
            row[acc_column(KIND_RPG, "min", short)] = g.min()
            row[acc_column(KIND_RPG, "std", short)] = g.std(ddof=0)
        row[GAP_BEST] = row[acc_column(KIND_ORIGINAL)] - row[acc_column(KIND_RPG, "best")]
        row[GAP_MEAN] = row[acc_column(KIND_ORIGINAL)] - row[acc_column(KIND_RPG, "mean")]
        row["n_samples"] = len(gen)
        row.update(_baseline_columns(samples[samples.task_id == t], row))
        row.update(_novelty_columns(orig, gen))
        rows.append(row)
    frame = pd.DataFrame(rows)
    mean = frame.drop(columns=["embedding", "task_id", "positive_classes", BEST_BASELINE]).mean()
    summary = {"embedding": "mean", "task_id": "", "positive_classes": "", **mean.to_dict(), BEST_BASELINE: ""}
    summary["n_samples"] = int(frame.n_samples.min())
    return pd.concat([frame, pd.DataFrame([summary])], ignore_index=True).round(3)


def _baseline_columns(task_samples: pd.DataFrame, row: dict) -> dict:
    """`original_best_*`, each baseline's accuracy and balanced accuracy (NaN where it does not exist), the best
    baseline's score per metric, `rpg_best_minus_baseline_*` (RPG's best sample minus the best baseline, in points)
    and the name of the baseline best in plain accuracy."""
    orig = task_samples[task_samples[KIND] == KIND_ORIGINAL]
    cols = {acc_column(KIND_ORIGINAL, "best", short): 100 * orig[metric].max() for metric, short in METRICS}
    for name in BASELINES:
        part = task_samples[task_samples[KIND] == name]
        cols.update({acc_column(name, None, short): 100 * part[metric].mean() if len(part) else float("nan")
                     for metric, short in METRICS})
    names = {}
    for _, short in METRICS:
        names[short], best = best_baseline({name: cols[acc_column(name, None, short)] for name in BASELINES})
        cols[best_baseline_column(short)] = best  # NaN only if no baseline exists
        cols[minus_baseline_column("best", short)] = row[acc_column(KIND_RPG, "best", short)] - best
    return {**cols, BEST_BASELINE: names["acc"]}


def _novelty_columns(orig: pd.DataFrame, gen: pd.DataFrame) -> dict:
    """Means over the task's RPG samples and, for reference, over its originals: L2 to the nearest training
    checkpoint (for originals: the zoo's own nearest-neighbour spread), max wrong-prediction IoU against the task's
    (other) originals, and mean pairwise IoU among the task's models of the same kind."""
    return {novelty_column(kind, name): frame[name].mean()
            for kind, frame in ((KIND_RPG, gen), (KIND_ORIGINAL, orig)) for name in NOVELTY}


def unseen_table(samples: pd.DataFrame, embeddings: Sequence[str] | None = None,
                 task_ids: Sequence[int] | None = None) -> pd.DataFrame:
    ids = [embedding_to_id(e) for e in embeddings] if embeddings is not None else list(task_ids or [])
    return _task_rows(samples[samples.group == "unseen"], ids)


def flip_table(samples: pd.DataFrame, pair: Sequence[str]) -> pd.DataFrame:
    rows = []
    for emb in pair:
        t = embedding_to_id(emb)
        sub = samples[(samples.task_id == t) & (samples.group == "flip")]
        for kind in ("original", "rpg", *BASELINES):
            part = sub[sub.kind == kind]
            if part.empty and kind in ("original", "rpg"):
                raise ValueError(f"no {kind} models for flip-pair embedding {emb}")
            if part.empty:
                continue
            row = {"embedding": emb, "task_id": t, "model": kind, "n_models": len(part),
                   "accuracy": 100 * part.accuracy.mean(), "balanced_accuracy": 100 * part.balanced_accuracy.mean()}
            row.update({name: 100 * part[f"class_{c}"].mean() for c, name in enumerate(CIFAR10_CLASSES)})
            rows.append(row)
    return pd.DataFrame(rows).round(3)


def seen_summary(samples: pd.DataFrame) -> pd.DataFrame:
    seen = samples[samples.group == "seen"]
    per_task = _task_rows(seen, sorted(seen.task_id.unique()))
    return per_task


def write_tables(cfg: Config, samples_csv: str | Path, out: dict[str, str | Path],
                 names: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Build the tables `names` (default: table11, table16, table12, seen_summary), write those that `out` names
    atomically with the resolved config beside them (`<name>.config.yaml`). A study regime builds only table16 and
    seen_summary: its tasks need not include table11's embeddings (the domain regime's do not)."""
    samples = pd.read_csv(samples_csv, dtype={"embedding": str})
    unseen_ids = sorted(samples[samples.group == "unseen"].task_id.unique())
    makers = {
        "table11": lambda: unseen_table(samples, embeddings=cfg.tasks.table11),
        "table16": lambda: unseen_table(samples, task_ids=unseen_ids),
        "table12": lambda: flip_table(samples, cfg.tasks.flip_pair),
        "seen_summary": lambda: seen_summary(samples),
    }
    tables = {name: make() for name, make in makers.items() if names is None or name in names}
    for name, frame in tables.items():
        if name not in out:
            continue
        write_csv_atomic(out[name], frame)
        write_text_atomic(Path(out[name]).with_suffix(".config.yaml"), config_to_yaml(cfg))
    return tables
