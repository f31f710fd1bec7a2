"""Diagnostics of a hidden-unit gauge (`rpg.experiments.task_zoo.canonical`): does it make the zoo's heads of similar
tasks close, and the zoo linear in the task, again? Scored on seen validation tasks only
(`probes/canonical_alignment.py`)."""

from __future__ import annotations

import torch

from rpg.experiments.task_zoo.baselines import affine_heads, hamming, load_training_zoo, nearest_heads, unflatten_heads
from rpg.experiments.task_zoo.heads import load_task_checkpoints, task_metrics


def alignment_report(zoo_dir, split, n_checkpoints: int, method: str, evaluator) -> dict[str, float]:
    """How structured the training split's zoo is in gauge `method`, scored on seen validation tasks only.

    Returns:
        neighbour_ratio: mean L2 distance of a training task's mean head to its Hamming-1 training neighbours',
            over the mean distance to all other training tasks' (1 = no structure; shared init is far below 1);
        relative_neighbour_distance: the same neighbour distance over the mean head norm;
        affine_val_acc / nearest_val_acc: mean accuracy (percent, on the evaluator's images) of the `affine` and
            `nearest` baselines built in this gauge for the validation tasks (never unseen tasks);
        affine_plus_residual_val_acc: the affine head plus a random training task's residual from its own affine
            head (what an ideal sampler adds to the conditional mean: the zoo's per-task spread, init noise included);
        affine_plus_coordinate_residual_val_acc: the same with each coordinate's residual from an independent random
            task (a sampler that gets every marginal right and no correlation between parameters);
        val_original_acc: the validation tasks' own checkpoints.
    """
    zoo = load_training_zoo(zoo_dir, split, n_checkpoints, method)
    heads = zoo.mean_heads.double()  # (T, P)
    dist = torch.cdist(heads, heads)  # (T, T)
    near = hamming(zoo.task_ids, zoo.task_ids) == 1
    off = ~torch.eye(len(heads), dtype=torch.bool)
    neighbour = (dist * near).sum(1) / near.sum(1).clamp_min(1)
    has = near.any(1)
    report = {"method": method, "n_train_tasks": len(zoo.task_ids),
              "neighbour_ratio": float((neighbour[has] / ((dist * off).sum(1)[has] / off.sum(1)[has])).mean()),
              "relative_neighbour_distance": float(neighbour[has].mean() / heads.norm(dim=1).mean())}
    val = list(split.val)
    affine = affine_heads(zoo, val)
    residual = zoo.mean_heads - affine_heads(zoo, zoo.task_ids)  # (T, P)
    gen = torch.Generator().manual_seed(0)
    other = residual[torch.randint(0, len(residual), (len(val),), generator=gen)]
    coordinate = residual.gather(0, torch.randint(0, len(residual), (len(val), residual.shape[1]), generator=gen))
    for name, flat in (("affine", affine), ("nearest", nearest_heads(zoo, val)),
                       ("affine_plus_residual", affine + other), ("affine_plus_coordinate_residual", affine + coordinate)):
        preds = evaluator.predict(unflatten_heads(flat, zoo.shapes))
        report[f"{name}_val_acc"] = 100 * float(task_metrics(preds, evaluator.classes, val)["accuracy"].mean())
    sds, _ = load_task_checkpoints(zoo_dir, val, n_checkpoints)
    ids = [t for t in val for _ in range(n_checkpoints)]
    report["val_original_acc"] = 100 * float(task_metrics(evaluator.predict(sds), evaluator.classes, ids)["accuracy"]
                                             .mean())
    return report
