"""RPG-initialised fine-tuning with few labels (issue 31, item 2): where a generated head should pay.

In the study's `domains_few` regime every baseline lands far below the originals, and RPG's best sample is the best
method yet still below them. The question a user asks is then how many labelled images of a new task each starting
point needs. For every unseen task of the regime, its head (on the regime's cached features; the backbone stays
frozen) is fine-tuned on k labelled training images, from each *arm*:

- `rpg`: of the regime's generated samples for the task, the one with the best accuracy on those same k images
  (ties: lower cross-entropy on them, then the lower sample index); never chosen on test images;
- every head baseline of `rpg.experiments.task_zoo.baselines` (`baseline_heads`, built from the training split only,
  exactly as the generate rule builds them; `complement` where it exists, `mean` is the mean training head);
  `compose` has no weights and so cannot start a fine-tuning;
- `zoo_init`: the head the zoo's task started from (`heads.initial_heads`; the shared initial head);
- `fresh`: a random head (PyTorch's default init under `seed + seed_offset`).

One recipe for every arm and k: the zoo's own (`heads.train_heads`: AdamW at zoo.lr and zoo.weight_decay, batches
of min(zoo.batch_size, k) drawn with replacement) for a fixed number of steps (`study.finetune_few.steps`, default
the zoo's, fixed before any run). All arms of a task train as one stack, hence on the same minibatches: they differ
only in where they start. The k images are the first k of one seeded order of the domain's training rows per task,
so a larger k holds the smaller ones. Test accuracy is recorded at `eval_steps` and at the last step; the originals
(the zoo's own checkpoints of the task, trained on all its images) stand beside.

A fixed step count over-trains a good start on 8 images. So every arm is also run *early-stopped* (`<arm>_early`),
as a practitioner with k labels would: the last `holdout` fraction of the k images (at least one) is held out, the
arm is fine-tuned on the rest by the same recipe, and of the steps 0, `eval_steps` and the last, the one with the
best accuracy on the held-out images (ties: lower cross-entropy on them, then the earlier step) is kept. Its row
sits at the last step (so it lines up with the fixed recipe's) with the kept step in `stop_step`; step 0 means the
start was not improved by training. RPG's sample is chosen on all k images, before the hold-out.

With few images a held-out quarter is too few to choose a step (2 images at k = 8), and the kept head never saw
them. So every arm is also stopped by cross-validation (`<arm>_cv`): the k images are split into `folds` parts
(image i in part i mod parts), the arm is fine-tuned on all parts but one for each part, and every saved step is
scored on the left-out images of all parts together; the step with the most of them right (ties: lower summed
cross-entropy, then the earlier step) is chosen, and the fixed recipe's head on all k images is kept at that step
(its row is the fixed recipe's test score at that step, `stop_step` says which).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from rpg.config import Config, config_to_yaml
from rpg.experiments.task_zoo.analysis import generated_files
from rpg.experiments.task_zoo.baselines import (HEAD_BASELINES, NOISE_SEED_OFFSET, baseline_heads, flatten_heads,
                                                load_training_zoo, unflatten_heads)
from rpg.experiments.task_zoo.features import load_features
from rpg.experiments.task_zoo.heads import (HEAD_KEYS, evaluate_heads, head_logits, initial_head, initial_heads,
                                            load_task_checkpoints, stack_state_dicts, train_heads)
from rpg.experiments.task_zoo.pipeline import read_split
from rpg.experiments.task_zoo.tasks import binary_labels, id_to_embedding, split_task_id
from rpg.utils import load_safetensors, write_csv_atomic, write_text_atomic

ARMS = ("rpg", *HEAD_BASELINES, "zoo_init", "fresh")
EARLY = "_early"  # suffix of an arm's early-stopped recipe
CV = "_cv"  # suffix of an arm's cross-validated stopping
STOPPED = (EARLY, CV)  # the recipes that choose a stopping step, beside the fixed one
ALL = "all"


@dataclass(frozen=True)
class Recipe:
    """How every arm is fine-tuned (the zoo's head recipe for `steps`)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    eval_steps: tuple[int, ...]
    task_chunk: int
    holdout: float = 0.0
    folds: int = 0

    @property
    def save_at(self) -> list[int]:
        return sorted({s for s in self.eval_steps if s <= self.steps} | {self.steps})


def recipe(cfg: Config) -> Recipe:
    ff, z = cfg.study.finetune_few, cfg.zoo
    return Recipe(ff.steps or z.steps, z.batch_size, z.lr, z.weight_decay, tuple(ff.eval_steps), z.task_chunk,
                  ff.holdout, ff.folds)


def base_arm(arm: str) -> str:
    """The start an arm's row comes from, whatever its recipe: `rpg_early` and `rpg_cv` -> `rpg`."""
    for suffix in STOPPED:
        if arm.endswith(suffix):
            return arm.removesuffix(suffix)
    return arm


def training_order(n: int, seed: int) -> torch.Tensor:
    """One seeded order of n training rows; the k images of a task are its first k."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def shot_rows(order: torch.Tensor, k: int | str) -> torch.Tensor:
    """The rows of k labelled images (`all`: every row, in `order`)."""
    if k == ALL:
        return order
    if int(k) > len(order):
        raise ValueError(f"{k} labelled images asked, {len(order)} training images exist")
    return order[: int(k)]


@torch.no_grad()
def select_sample(heads: Sequence[dict[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor) -> tuple[int, float]:
    """The head with the best accuracy on the labelled images (x, y) (ties: lower cross-entropy, lower index).

    Shapes: x (k, d), y (k,) in {0, 1}. Returns its index and accuracy (fraction).
    """
    logits = head_logits(stack_state_dicts(heads), x.float())  # (S, k, 2)
    acc = (logits.argmax(-1) == y).float().mean(1)
    loss = F.cross_entropy(logits.transpose(1, 2), y[None].expand(len(heads), -1), reduction="none").mean(1)
    best = best_index(acc, loss)
    return best, float(acc[best])


def best_index(score: torch.Tensor, loss: torch.Tensor) -> int:
    """The one rule that picks a head among candidates: the highest score (accuracy, or images right), ties
    broken by the lower cross-entropy, then the lower index. Shapes: score, loss (n,)."""
    return min(range(len(score)), key=lambda i: (-float(score[i]), float(loss[i]), i))


def _train_arms(starts: dict[str, dict[str, torch.Tensor]], x: torch.Tensor, class_labels: torch.Tensor,
                task_id: int, rec: Recipe, seed: int) -> dict[str, torch.Tensor]:
    """Every arm's head fine-tuned on (x, class_labels) as one stack (the same minibatches for all): stacked heads
    {key: (arms, len(rec.save_at), ...)}."""
    return train_heads(x, class_labels, [task_id] * len(starts), steps=rec.steps,
                       batch_size=min(rec.batch_size, len(x)), lr=rec.lr, weight_decay=rec.weight_decay, seed=seed,
                       task_chunk=rec.task_chunk, progress=False,
                       start=stack_state_dicts(list(starts.values())), save_at=rec.save_at)


def finetune_arms(starts: dict[str, dict[str, torch.Tensor]], x: torch.Tensor, class_labels: torch.Tensor,
                  task_id: int, test_x: torch.Tensor, test_classes: torch.Tensor, rec: Recipe, seed: int
                  ) -> list[dict]:
    """Fine-tune every arm's head on (x, class_labels) as one stack (the same minibatches for all), test metrics
    at `rec.save_at`. Shapes: x (k, d), class_labels (k,) CIFAR-10 classes; test likewise.
    Returns rows: arm, step, accuracy, balanced_accuracy (percent)."""
    names = list(starts)
    ids = [task_id] * len(names)
    out = _train_arms(starts, x, class_labels, task_id, rec, seed)
    rows = []
    for j, step in enumerate(rec.save_at):
        m = evaluate_heads({key: v[:, j] for key, v in out.items()}, ids, test_x, test_classes)
        rows += [{"arm": name, "step": step, "accuracy": 100 * float(m["accuracy"][i]),
                  "balanced_accuracy": 100 * float(m["balanced_accuracy"][i])} for i, name in enumerate(names)]
    return rows


def holdout_size(k: int, fraction: float) -> int:
    """Images held out of k to choose the stopping step: round(fraction * k), at least 1 and at most k - 1 (0 when
    fraction is 0 or k < 2: no early stopping)."""
    if fraction <= 0 or k < 2:
        return 0
    return min(k - 1, max(1, round(fraction * k)))


def early_stopped_arms(starts: dict[str, dict[str, torch.Tensor]], x: torch.Tensor, class_labels: torch.Tensor,
                       task_id: int, test_x: torch.Tensor, test_classes: torch.Tensor, rec: Recipe, seed: int
                       ) -> list[dict]:
    """Every arm fine-tuned on the first k - h of the k images and stopped at the saved step that does best on the
    last h (`holdout_size`; see the module docstring). Test images are scored only at the kept step.
    Returns rows: arm (`<arm>_early`), step (the recipe's last), stop_step, accuracy, balanced_accuracy; none when
    nothing can be held out."""
    h = holdout_size(len(x), rec.holdout)
    if h == 0:
        return []
    fit, held = slice(0, len(x) - h), slice(len(x) - h, len(x))
    out = _train_arms(starts, x[fit], class_labels[fit], task_id, rec, seed)
    y_held = binary_labels(class_labels[held], [task_id])[0]
    # Of each arm's saved heads (in step order) the one select_sample picks on the held-out images: the same rule
    # that picks RPG's sample (accuracy, then cross-entropy, then the earlier step).
    kept = torch.tensor([select_sample([{key: v[i, j] for key, v in out.items()} for j in range(len(rec.save_at))],
                                       x[held], y_held)[0] for i in range(len(starts))])
    m = evaluate_heads({key: v[torch.arange(len(starts)), kept] for key, v in out.items()}, [task_id] * len(starts),
                       test_x, test_classes)
    return [{"arm": name + EARLY, "step": rec.steps, "stop_step": rec.save_at[int(kept[i])],
             "accuracy": 100 * float(m["accuracy"][i]), "balanced_accuracy": 100 * float(m["balanced_accuracy"][i])}
            for i, name in enumerate(starts)]


@torch.no_grad()
def cross_validated_steps(starts: dict[str, dict[str, torch.Tensor]], x: torch.Tensor, class_labels: torch.Tensor,
                          task_id: int, rec: Recipe, seed: int) -> list[int] | None:
    """Per arm, the saved step chosen by cross-validation over the k images (see the module docstring); None when
    fewer than 2 parts can be made (rec.folds < 2 or k < 2). Shapes: x (k, d), class_labels (k,)."""
    parts = min(rec.folds, len(x))
    if parts < 2:
        return None
    y = binary_labels(class_labels, [task_id])[0]
    part = torch.arange(len(x)) % parts
    right = torch.zeros(len(starts), len(rec.save_at))
    loss = torch.zeros(len(starts), len(rec.save_at))
    for f in range(parts):
        fit, held = part != f, part == f
        out = _train_arms(starts, x[fit], class_labels[fit], task_id, rec, seed)
        for j in range(len(rec.save_at)):
            logits = head_logits({key: v[:, j] for key, v in out.items()}, x[held].float())  # (arms, h, 2)
            right[:, j] += (logits.argmax(-1) == y[held]).sum(1)
            loss[:, j] += F.cross_entropy(logits.transpose(1, 2), y[held][None].expand(len(starts), -1),
                                          reduction="none").sum(1)
    return [rec.save_at[best_index(right[i], loss[i])] for i in range(len(starts))]


def cross_validated_rows(curve: Sequence[dict], steps: Sequence[int], names: Sequence[str], last: int) -> list[dict]:
    """The `<arm>_cv` rows: each arm's fixed-recipe row (in `curve`) at its chosen step, placed at the last step."""
    at = {(r["arm"], r["step"]): r for r in curve}
    return [{**at[(name, step)], "arm": name + CV, "step": last, "stop_step": step} for name, step in zip(names, steps)]


def rpg_samples(generated_dir: str | Path, task_ids: Sequence[int]) -> dict[int, list[dict[str, torch.Tensor]]]:
    """The generated heads of each task, in sample order."""
    files = generated_files(generated_dir)
    out = {}
    for t in task_ids:
        part = files[files.task_id == t].sort_values("sample")
        if part.empty:
            raise FileNotFoundError(f"no generated heads for task {t} in {generated_dir}")
        out[t] = [{k: load_safetensors(p)[0][k] for k in HEAD_KEYS} for p in part.path]
    return out


def finetune_few(cfg: Config, features_path: str | Path, zoo_dir: str | Path, split_path: str | Path,
                 generated_dir: str | Path, progress: bool = False) -> pd.DataFrame:
    """Rows per unseen task, arm, k and step (see the module docstring), then `mean` rows over tasks.

    `cfg` is the regime's config. Columns: task_id, embedding, domain, arm, k, n_images, step, accuracy,
    balanced_accuracy, stop_step (early-stopped and cross-validated arms: the step kept), sample and
    select_accuracy (RPG's chosen sample, its accuracy on the k images),
    original_accuracy, original_balanced_accuracy (the task's originals, mean over its checkpoints), minus_original
    (points); mean rows add n_tasks. Test images are read for scoring only, after every head is chosen.
    """
    ff, rec = cfg.study.finetune_few, recipe(cfg)
    feats = load_features(features_path)
    split = read_split(split_path)
    tasks = list(split.unseen)
    n_ckpt = cfg.zoo.n_checkpoints
    # The baselines see the training split only, read before any unseen task's checkpoint (as in generate).
    zoo = load_training_zoo(zoo_dir, split, n_ckpt, cfg.train.canonicalise)
    samples = rpg_samples(generated_dir, tasks)
    flat = flatten_heads(zoo.canonical([sd for t in tasks for sd in samples[t]]))
    noise_l2 = float(zoo.collection.novelty(flat).mean())  # the noise baseline's distance, as generate measures it
    baselines = baseline_heads(zoo, tasks, noise_l2, seed=cfg.seed + NOISE_SEED_OFFSET)  # generate's unseen group
    per_domain = feats["train_x"].ndim == 3
    d = feats["train_x"].shape[-1]
    fresh = initial_head(d, cfg.seed + ff.seed_offset)
    rows = []
    for i, t in enumerate(tasks):
        dom = split_task_id(t)[1] if per_domain else None
        train_x = feats["train_x"][dom] if per_domain else feats["train_x"]
        test_x = feats["test_x"][dom] if per_domain else feats["test_x"]
        zoo_init = {k: v[0] for k, v in initial_heads(d, cfg.seed, [t], cfg.zoo.init).items()}
        order = training_order(len(train_x), cfg.seed + ff.seed_offset + t)
        for k in ff.shots:
            rows_k = shot_rows(order, k)
            x, classes = train_x[rows_k], feats["train_y"][rows_k]
            pick, pick_acc = select_sample(samples[t], x, binary_labels(classes, [t])[0])
            starts = {"rpg": samples[t][pick]}
            for name, heads in baselines.items():
                if not bool(heads[i].isnan().any()):  # a baseline that does not exist for the task is no arm
                    starts[name] = unflatten_heads(heads[i][None], zoo.shapes)[0]
            starts.update(zoo_init=zoo_init, fresh=fresh)
            seed = cfg.seed + ff.seed_offset + t
            curve = finetune_arms(starts, x, classes, t, test_x, feats["test_y"], rec, seed)
            cv_steps = cross_validated_steps(starts, x, classes, t, rec, seed)
            if cv_steps is not None:
                curve += cross_validated_rows(curve, cv_steps, list(starts), rec.steps)
            curve += early_stopped_arms(starts, x, classes, t, test_x, feats["test_y"], rec, seed)
            rows += [{"task_id": t, "k": str(k), "n_images": len(rows_k), **r,
                      "sample": pick if base_arm(r["arm"]) == "rpg" else None,
                      "select_accuracy": 100 * pick_acc if base_arm(r["arm"]) == "rpg" else None}
                     for r in curve]
            if progress:
                last = {r["arm"]: r["accuracy"] for r in curve if r["step"] == rec.steps}
                print(f"task {t} k={k}: " + ", ".join(f"{a} {v:.1f}" for a, v in last.items()), flush=True)
    frame = pd.DataFrame(rows)
    originals = _originals(zoo_dir, tasks, n_ckpt, feats, per_domain)  # read only now, after every choice
    frame = frame.merge(originals, on="task_id")
    frame["minus_original"] = frame.accuracy - frame.original_accuracy
    frame.insert(1, "embedding", [id_to_embedding(t) for t in frame.task_id])
    names = list(cfg.domains.names)
    frame.insert(2, "domain", [names[split_task_id(t)[1]] if names else "" for t in frame.task_id])
    return _with_means(frame).round(3)


def _originals(zoo_dir: str | Path, tasks: Sequence[int], n_ckpt: int, feats: dict, per_domain: bool
               ) -> pd.DataFrame:
    """Each task's originals on its test images: mean accuracy and balanced accuracy over its checkpoints."""
    sds, _ = load_task_checkpoints(zoo_dir, tasks, n_ckpt)
    rows = []
    for i, t in enumerate(tasks):
        test_x = feats["test_x"][split_task_id(t)[1]] if per_domain else feats["test_x"]
        m = evaluate_heads(stack_state_dicts(sds[i * n_ckpt:(i + 1) * n_ckpt]), [t] * n_ckpt, test_x, feats["test_y"])
        rows.append({"task_id": t, "original_accuracy": 100 * float(m["accuracy"].mean()),
                     "original_balanced_accuracy": 100 * float(m["balanced_accuracy"].mean())})
    return pd.DataFrame(rows)


def _with_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Append `mean` rows over tasks per arm, k and step (over the tasks where the arm exists: n_tasks)."""
    keys = ["arm", "k", "step"]
    values = ["n_images", "accuracy", "balanced_accuracy", "stop_step", "select_accuracy", "original_accuracy",
              "original_balanced_accuracy", "minus_original"]
    if "stop_step" not in frame.columns:  # no arm that chooses its step (holdout 0, folds < 2)
        frame = frame.assign(stop_step=float("nan"))
    mean = frame.groupby(keys, sort=False, as_index=False)[values].mean()
    mean["n_tasks"] = frame.groupby(keys, sort=False).size().to_numpy()
    mean["task_id"] = "mean"
    return pd.concat([frame, mean], ignore_index=True)


def images_needed(frame: pd.DataFrame, within: float) -> pd.DataFrame:
    """Per arm: mean accuracy at the last step for each k, the originals' mean, and the smallest k whose mean is
    within `within` points of the originals' on the same tasks (`minus_original` >= -within), or "none".

    Returns columns arm, n_tasks, one `k=<k>` column per k (in order of images), original, needs.
    """
    mean = frame[frame.task_id.astype(str) == "mean"]
    last = mean[mean.step == mean.step.max()]
    shots = list(dict.fromkeys(last.sort_values("n_images", kind="stable").k))
    rows = []
    for arm in [a for a in (*ARMS, *(a + suffix for suffix in STOPPED for a in ARMS)) if a in set(last.arm)]:
        part = last[last.arm == arm].set_index("k")
        reached = [k for k in shots if k in part.index and part.loc[k, "minus_original"] >= -within]
        rows.append({"arm": arm, "n_tasks": int(part.n_tasks.min()),
                     **{f"k={k}": part.loc[k, "accuracy"] if k in part.index else float("nan") for k in shots},
                     "original": float(part.original_accuracy.iloc[0]), "needs": reached[0] if reached else "none"})
    return pd.DataFrame(rows).round(3)


def write_finetune_few(cfg: Config, features_path: str | Path, zoo_dir: str | Path, split_path: str | Path,
                       generated_dir: str | Path, out_csv: str | Path, summary_csv: str | Path) -> pd.DataFrame:
    """Rule finetune_few: the curves (`finetune_few.csv`), the summary (`images_needed`) and the resolved config."""
    start = time.time()
    frame = finetune_few(cfg, features_path, zoo_dir, split_path, generated_dir, progress=True)
    write_csv_atomic(out_csv, frame)
    write_csv_atomic(summary_csv, images_needed(frame, cfg.study.finetune_few.within))
    write_text_atomic(Path(out_csv).with_suffix(".config.yaml"), config_to_yaml(cfg))
    print(f"finetune_few: {time.time() - start:.1f} s", flush=True)
    return frame
