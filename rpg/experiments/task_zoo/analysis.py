"""Analysis helpers used by the notebooks and reports: similarity of classifiers (after p-diff, Fig. 4).

Similarity of two classifiers = IoU of their sets of misclassified test images. A generated model that is as
accurate as the originals but has a low maximum IoU against them is not a copy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from rpg.config import Config, config_to_yaml
from rpg.evaluation import MAX_IOU_ORIGINAL
from rpg.experiments.task_zoo.pipeline import make_evaluator, read_split
from rpg.experiments.task_zoo.tasks import TaskSplit, binary_labels
from rpg.utils import load_safetensors, load_safetensors_keys, write_csv_atomic, write_text_atomic
from rpg.vision.similarity import max_iou_to_reference, misclassified_iou  # noqa: F401 (re-exported)
from rpg.weightspace import flatten
from rpg.experiments.task_zoo.heads import HEAD_KEYS, binary_metrics, checkpoint_path, load_task_checkpoints


# ----------------------------------------------------------------------------------------------------------------
# Inputs of the analysis notebooks: PCA of classifier heads (Fig. 7) and similarity vs. accuracy (Fig. 4)
# ----------------------------------------------------------------------------------------------------------------

GENERATED_NAME = re.compile(r"^(\d{4})_s(\d+)\.safetensors$")


def head_keys(keys: Iterable[str]) -> list[str]:
    """The classifier-head entries of a state dict, in a fixed order.

    Head-only checkpoints (the default profile) hold exactly `rpg.experiments.task_zoo.heads.HEAD_KEYS`; full models (paper profile) hold
    them under the `head.` prefix beside the backbone.
    """
    keys = list(keys)
    if all(k in keys for k in HEAD_KEYS):
        return list(HEAD_KEYS)
    prefixed = [f"head.{k}" for k in HEAD_KEYS]
    if all(k in keys for k in prefixed):
        return prefixed
    raise ValueError(f"no classifier head ({', '.join(HEAD_KEYS)}, optionally under 'head.') among keys {keys[:8]}")


def load_head_vectors(paths: Sequence[str | Path]) -> torch.Tensor:
    """Flattened head parameters of each checkpoint file, reading only the head tensors. Shape: (len(paths), P)."""
    rows = []
    for path in paths:
        head = load_safetensors_keys(path, head_keys)
        rows.append(flatten([head], list(head))[0])
    return torch.stack(rows) if rows else torch.empty(0, 0)


def fit_pca(x: torch.Tensor, n_components: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """PCA of the rows by a seeded randomised SVD (the zoo's 3,066 x 16,640 matrix in seconds, not minutes).

    Shapes: x (n, P) -> mean (P,), components (k, P) (sign fixed: largest |entry| positive), explained_ratio (k,).
    """
    mean = x.mean(0)
    xc = (x - mean).double()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(xc, q=min(n_components + 10, *xc.shape), niter=6)
    comps = v[:, :n_components].T  # (k, P)
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    ratio = s[:n_components] ** 2 / (xc**2).sum()
    return {"mean": mean, "components": (comps * sign).float(), "explained_ratio": ratio.float()}


def project(x: torch.Tensor, pca: dict[str, torch.Tensor]) -> torch.Tensor:
    """Shapes: x (n, P) -> (n, k)."""
    return (x - pca["mean"]) @ pca["components"].T


def own_vs_other_distance(points: torch.Tensor, tasks: Sequence[int], ref: torch.Tensor,
                          ref_tasks: Sequence[int]) -> pd.DataFrame:
    """For each point: L2 distance to the nearest reference of its own task and to the nearest of any other task.

    Shapes: points (n, D), ref (m, D). Every point's task must have references.
    """
    dist = torch.cdist(points.double(), ref.double())  # (n, m)
    ref_tasks_t = torch.tensor(list(ref_tasks))
    same = torch.tensor(list(tasks))[:, None] == ref_tasks_t[None, :]  # (n, m)
    if not bool(same.any(1).all()):
        raise ValueError("some points have no reference of their own task")
    own = dist.masked_fill(~same, float("inf")).min(1).values
    other, idx = dist.masked_fill(same, float("inf")).min(1)
    return pd.DataFrame({"task_id": list(tasks), "own_dist": own.numpy(), "other_dist": other.numpy(),
                         "nearest_other_task": ref_tasks_t[idx].numpy(), "closer": (own < other).numpy()})


def closer_fraction(dist: pd.DataFrame) -> dict[str, float]:
    """Fraction of samples closer to their own task's originals, and of tasks where most samples are."""
    per_task = dist.groupby("task_id").closer.mean()
    return {"n_tasks": int(len(per_task)), "n_samples": int(len(dist)),
            "fraction_tasks": float((per_task > 0.5).mean()), "fraction_samples": float(dist.closer.mean()),
            "median_own_over_other": float((dist.own_dist / dist.other_dist).median())}


def generated_files(generated_dir: str | Path) -> pd.DataFrame:
    """The generated models on disk: path, task_id, sample (from `<task:04d>_s<i>.safetensors`)."""
    rows = []
    for path in sorted(Path(generated_dir).glob("*.safetensors")):
        match = GENERATED_NAME.match(path.name)
        if match:
            rows.append({"path": str(path), "task_id": int(match.group(1)), "sample": int(match.group(2))})
    if not rows:
        raise FileNotFoundError(f"no generated models (<task>_s<i>.safetensors) in {generated_dir}")
    return pd.DataFrame(rows)


def pca_heads(zoo_dir: str | Path, split: TaskSplit, generated_dir: str | Path, n_checkpoints: int
              ) -> dict[str, pd.DataFrame]:
    """Fig. 7 data: a PCA fitted on the seen tasks' original heads; every original and generated head projected.

    Returns:
        points: kind (original / rpg), group (seen / unseen), task_id, index, pc1, pc2.
        distances: per generated head, distances to its own task's originals and to the nearest other task's
            originals, in the full parameter space and in the PCA plane.
        summary: per space and group, the fraction of tasks (majority of samples) and of samples closer to their
            own originals, and the PCA's explained variance.
    """
    unseen = set(split.unseen)
    seen_ids = sorted(set(split.train) | set(split.val))
    all_ids = sorted(set(seen_ids) | unseen)
    orig_paths = [checkpoint_path(zoo_dir, t, k) for t in all_ids for k in range(n_checkpoints)]
    orig_tasks = [t for t in all_ids for _ in range(n_checkpoints)]
    orig = load_head_vectors(orig_paths)
    gen_files = generated_files(generated_dir)
    gen = load_head_vectors(gen_files.path.tolist())
    gen_tasks = gen_files.task_id.tolist()

    is_seen = torch.tensor([t not in unseen for t in orig_tasks])
    pca = fit_pca(orig[is_seen], 2)
    orig_2d, gen_2d = project(orig, pca), project(gen, pca)
    group = lambda tasks: ["unseen" if t in unseen else "seen" for t in tasks]  # noqa: E731
    points = pd.concat([
        pd.DataFrame({"kind": "original", "group": group(orig_tasks), "task_id": orig_tasks,
                      "index": [k for _ in all_ids for k in range(n_checkpoints)]}),
        pd.DataFrame({"kind": "rpg", "group": group(gen_tasks), "task_id": gen_tasks,
                      "index": gen_files["sample"].tolist()}),
    ], ignore_index=True)
    points[["pc1", "pc2"]] = torch.cat([orig_2d, gen_2d]).numpy()

    dist_frames, summary = [], []
    for space, (g, o) in {"full": (gen, orig), "pca2": (gen_2d, orig_2d)}.items():
        d = own_vs_other_distance(g, gen_tasks, o, orig_tasks)
        d.insert(0, "space", space)
        d.insert(1, "group", group(gen_tasks))
        d.insert(3, "sample", gen_files["sample"].tolist())
        dist_frames.append(d)
        for grp, part in d.groupby("group"):
            summary.append({"space": space, "group": grp, **closer_fraction(part),
                            "explained_variance_pc12": float(pca["explained_ratio"].sum())})
    return {"points": points, "distances": pd.concat(dist_frames, ignore_index=True),
            "summary": pd.DataFrame(summary)}


def add_noise(state_dict: dict[str, torch.Tensor], magnitude: float, generator: torch.Generator
              ) -> dict[str, torch.Tensor]:
    """Gaussian noise with std `magnitude` x (each tensor's own std) on every float parameter.

    BatchNorm running statistics and scalars are left alone (they are not weights a generator would perturb).
    """
    out = {}
    for k, v in state_dict.items():
        if v.is_floating_point() and v.numel() > 1 and "running_" not in k:
            v = v + magnitude * v.float().std() * torch.randn(v.shape, generator=generator).to(v.dtype)
        out[k] = v
    return out


def similarity_rows(preds: torch.Tensor, target: torch.Tensor, reference: torch.Tensor,
                    exclude_self: bool = False) -> dict[str, torch.Tensor]:
    """Accuracy, balanced accuracy and max IoU against `reference` of each prediction row (one task).

    Shapes: preds (A, N), target (N,), reference (B, N) -> each (A,).
    """
    m = binary_metrics(preds, target[None].expand_as(preds))
    return {**m, MAX_IOU_ORIGINAL: max_iou_to_reference(preds, reference, target, exclude_self=exclude_self)}


def similarity_analysis(evaluator: Any, zoo_dir: str | Path, task_ids: Sequence[int], generated_dir: str | Path,
                        n_checkpoints: int, magnitudes: Sequence[float], repeats: int, seed: int
                        ) -> dict[str, pd.DataFrame]:
    """Fig. 4 data: accuracy vs. max IoU (against the task's original checkpoints) of every model.

    kinds: `original` (against the task's *other* originals), `rpg` (generated), `noise` (an original plus Gaussian
    noise, against all originals of the task, its source included: magnitude 0 is the original itself, IoU 1).
    `evaluator` has `.predict(state_dicts) -> (T, N)` and `.classes` (N,) (HeadEvaluator / ModelEvaluator).

    Returns models (one row per model), curve (noise curve: mean over tasks per magnitude) and summary (per task:
    originals, generated, and the noise curve's max IoU at the generated models' accuracy; a mean row last).
    """
    gen_files = generated_files(generated_dir)
    gen_files = gen_files[gen_files.task_id.isin(list(task_ids))]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t in task_ids:
        target = binary_labels(evaluator.classes, [t])[0]
        orig_sds, _ = load_task_checkpoints(zoo_dir, [t], n_checkpoints)
        orig_pred = evaluator.predict(orig_sds)
        part = gen_files[gen_files.task_id == t]
        if part.empty:
            raise FileNotFoundError(f"no generated models for task {t} in {generated_dir}")
        gen_pred = evaluator.predict([load_safetensors(p)[0] for p in part.path])
        noisy, noisy_meta = [], []
        for k, sd in enumerate(orig_sds):
            for m in magnitudes:
                for r in range(repeats):
                    noisy.append(add_noise(sd, m, gen))
                    noisy_meta.append((k, m, r))
        noise_pred = evaluator.predict(noisy)
        for kind, pred, meta in (
            ("original", orig_pred, [(k, None, None) for k in range(len(orig_sds))]),
            ("rpg", gen_pred, [(s, None, None) for s in part["sample"]]),
            ("noise", noise_pred, noisy_meta),
        ):
            m = similarity_rows(pred, target, orig_pred, exclude_self=kind == "original")
            if kind == "original" and len(orig_sds) == 1:
                m[MAX_IOU_ORIGINAL] = torch.full_like(m[MAX_IOU_ORIGINAL], float("nan"))  # no other original to compare with
            for i, (index, mag, rep) in enumerate(meta):
                rows.append({"kind": kind, "task_id": t, "index": index, "magnitude": mag, "repeat": rep,
                             "accuracy": float(m["accuracy"][i]), "balanced_accuracy": float(m["balanced_accuracy"][i]),
                             MAX_IOU_ORIGINAL: float(m[MAX_IOU_ORIGINAL][i])})
    models = pd.DataFrame(rows)
    noise = models[models.kind == "noise"]
    curve = noise.groupby("magnitude", as_index=False)[["accuracy", "balanced_accuracy", MAX_IOU_ORIGINAL]].mean()
    curve["n_models"] = noise.groupby("magnitude").size().values
    return {"models": models, "curve": curve, "summary": similarity_summary(models)}


def iou_at_accuracy(curve: pd.DataFrame, accuracy: float) -> float:
    """Max IoU of the noise curve (accuracy, max_iou_original points) at `accuracy`, linearly interpolated.

    Outside the curve's accuracy range the nearest end is used.
    """
    c = curve.sort_values("accuracy")
    return float(np.interp(accuracy, c.accuracy.to_numpy(), c[MAX_IOU_ORIGINAL].to_numpy()))


def similarity_summary(models: pd.DataFrame) -> pd.DataFrame:
    """Per task: original and generated accuracy / max IoU, and the noise curve's max IoU at the generated
    accuracy (same task, mean over checkpoints and draws per magnitude). Accuracies in percent."""
    rows = []
    for t, part in models.groupby("task_id"):
        orig, rpg_ = part[part.kind == "original"], part[part.kind == "rpg"]
        curve = part[part.kind == "noise"].groupby("magnitude")[["accuracy", MAX_IOU_ORIGINAL]].mean()
        noise_iou = iou_at_accuracy(curve, float(rpg_.accuracy.mean()))
        rows.append({
            "task_id": t,
            "original_acc": 100 * float(orig.accuracy.mean()), "original_max_iou_original": float(orig[MAX_IOU_ORIGINAL].mean()),
            "rpg_mean_acc": 100 * float(rpg_.accuracy.mean()), "rpg_best_acc": 100 * float(rpg_.accuracy.max()),
            "rpg_max_iou_original": float(rpg_[MAX_IOU_ORIGINAL].mean()),
            "noise_max_iou_at_rpg_acc": noise_iou,
        })
    frame = pd.DataFrame(rows)
    frame["gap_mean"] = frame.original_acc - frame.rpg_mean_acc
    frame["within_1pt"] = frame.gap_mean <= 1.0
    frame["rpg_less_similar"] = frame.rpg_max_iou_original < frame.noise_max_iou_at_rpg_acc
    mean = frame.drop(columns=["task_id"]).mean(numeric_only=False)
    summary = {"task_id": "mean", **{k: float(v) for k, v in mean.items()}}
    return pd.concat([frame, pd.DataFrame([summary])], ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# Rule entry points: the CSVs the notebooks load, each with the resolved config beside it
# ----------------------------------------------------------------------------------------------------------------


def _write_frames(cfg: Config, frames: dict[str, pd.DataFrame], out: Mapping[str, str | Path]) -> None:
    """Write each frame to `out[name]`, and the resolved config to `out["config"]` when given."""
    for name, frame in frames.items():
        write_csv_atomic(out[name], frame.round(6))
    if "config" in out:
        write_text_atomic(out["config"], config_to_yaml(cfg))


def write_pca_heads(cfg: Config, zoo_dir: str | Path, split_path: str | Path, generated_dir: str | Path,
                    out: Mapping[str, str | Path]) -> dict[str, pd.DataFrame]:
    """Rule pca_heads: `points`, `distances` and `summary` CSVs (see `pca_heads`)."""
    frames = pca_heads(zoo_dir, read_split(split_path), generated_dir, cfg.zoo.n_checkpoints)
    _write_frames(cfg, frames, out)
    return frames


def write_similarity(cfg: Config, zoo_dir: str | Path, split_path: str | Path, generated_dir: str | Path,
                     features_path: str | Path | None, out: Mapping[str, str | Path]) -> dict[str, pd.DataFrame]:
    """Rule similarity: `models`, `curve` and `summary` CSVs for the unseen tasks (see `similarity_analysis`)."""
    split = read_split(split_path)
    evaluator = make_evaluator(cfg, features_path, "test")
    a = cfg.analysis
    frames = similarity_analysis(evaluator, zoo_dir, list(split.unseen), generated_dir, cfg.zoo.n_checkpoints,
                                 a.noise_magnitudes, a.noise_repeats, seed=cfg.seed + 7)
    _write_frames(cfg, frames, out)
    return frames
