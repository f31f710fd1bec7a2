"""What every generated Table 1 / ablation row is compared with (spec §2d, unconditional): the baselines of
Zeng et al. 2025 and the novelty of every sample.

Baselines, each sampled as many times as the generator was and scored by the same evaluator:
  noise      a random collection checkpoint plus isotropic Gaussian noise whose L2 norm is the generated samples'
             mean distance to their nearest collection checkpoint (same novelty as the generator's samples)
  average16  the average of 16 random collection checkpoints (all of them when there are fewer)
  gaussian   an independent Gaussian per parameter with the collection's mean and std
Beside the generated models (kind `rpg`), `rpg_bn_recomputed`: the same samples with their BatchNorm running
statistics recomputed on training images instead of generated (when `architectures.bn_recompute_images` > 0).
Novelty of every model (generated, baseline, and each original against the *other* originals), in the vocabulary of
`rpg.evaluation`:
  l2_novelty        L2 distance to the nearest collection checkpoint (for originals: their own nearest-neighbour
                    distance)
  max_iou_original  maximum IoU of its misclassified test images against any collection checkpoint's
  l2_spread         mean L2 distance to the other models of its own kind (originals: the other collection
                    checkpoints), how spread a generator's samples are beside the collection they were learnt from:
                    samples much closer to one another than the checkpoints are have collapsed towards one model,
                    whatever their accuracy
The baselines are registered in `rpg.evaluation` under family `collection` (FAMILY), called as
`fn(points, n, novelty, generator)` -> (n, P), drawn in registration order from one generator.
A generator whose samples are no better than `noise` at the same novelty, or than an average, has learnt no more than
to copy or to average its training checkpoints.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from rpg.evaluation import (ACCURACY, BEST_BASELINE, KIND, KIND_ORIGINAL, KIND_RPG, L2_NOVELTY, L2_SPREAD,
                            MAX_IOU_ORIGINAL, STATS, acc_column, best_baseline, best_baseline_column, create_baseline,
                            l2_novelty, list_baselines, minus_baseline_column, novelty_column, register_baseline)
from rpg.vision.similarity import max_iou_to_reference
from rpg.weightspace import (flatten, gaussian_samples, mean_distance, nearest_and_mean_distance, noise_at_distance,
                              random_averages, unflatten)

StateDict = Mapping[str, torch.Tensor]
Predictor = Callable[[StateDict], torch.Tensor]  # state dict -> predicted classes (N,)
FAMILY = "collection"  # this experiment's baselines in the `rpg.evaluation` registry
RPG_BN_RECOMPUTED = "rpg_bn_recomputed"
VARIANTS = (RPG_BN_RECOMPUTED,)  # generated models changed after sampling (scored beside them)
AVERAGE_OF = 16


@register_baseline(FAMILY)
def noise(points: torch.Tensor, n: int, novelty: float, generator: torch.Generator) -> torch.Tensor:
    """`n` random collection checkpoints plus noise of L2 norm `novelty`. Shapes: (K, P) -> (n, P)."""
    return noise_at_distance(points[torch.randint(0, len(points), (n,), generator=generator)], novelty, generator)


@register_baseline(FAMILY)
def average16(points: torch.Tensor, n: int, novelty: float, generator: torch.Generator) -> torch.Tensor:
    """`n` averages of AVERAGE_OF random collection checkpoints. Shapes: (K, P) -> (n, P)."""
    return random_averages(points, n, AVERAGE_OF, generator)


@register_baseline(FAMILY)
def gaussian(points: torch.Tensor, n: int, novelty: float, generator: torch.Generator) -> torch.Tensor:
    """`n` draws of the collection's per-parameter Gaussian. Shapes: (K, P) -> (n, P)."""
    return gaussian_samples(points, n, generator)


BASELINES = tuple(list_baselines(FAMILY))


def baseline_points(points: torch.Tensor, n: int, novelty: float, seed: int) -> dict[str, torch.Tensor]:
    """kind -> (n, P) baseline models as flat vectors, from the collection's points (K, P), drawn in turn from one
    generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return {name: create_baseline(name, FAMILY, points, n, novelty, gen) for name in BASELINES}


def model_rows(kind: str, points: torch.Tensor, preds: torch.Tensor, reference: torch.Tensor,
               reference_preds: torch.Tensor, labels: torch.Tensor, of_reference: bool = False,
               index: Sequence[int] | None = None,
               distances: tuple[torch.Tensor, torch.Tensor] | None = None) -> pd.DataFrame:
    """One row per model: kind, index, accuracy, l2_novelty, max_iou_original (against the reference = the
    collection) and l2_spread (against the other models of these points).

    With of_reference the models are the collection itself and each is compared with the others (NaN for a
    collection of one). distances: (l2_novelty, l2_spread) when the caller has them (the originals': from the
    whole collection, of which the rows may be a part). Shapes: points (A, P), preds (A, N), reference (B, P),
    reference_preds (B, N), labels (N,).
    """
    lonely = of_reference and len(reference) < 2
    nan = torch.full((len(points),), float("nan"))
    if distances is None:
        distances = (nan if lonely else l2_novelty(points, reference, exclude_self=of_reference),
                     mean_distance(points, points, exclude_self=True))
    return pd.DataFrame({
        KIND: kind, "index": range(len(points)) if index is None else list(index),
        ACCURACY: (preds == labels).float().mean(1).numpy(),
        L2_NOVELTY: distances[0].numpy(),
        MAX_IOU_ORIGINAL: (nan if lonely else max_iou_to_reference(preds, reference_preds, labels,
                                                                   exclude_self=of_reference)).numpy(),
        L2_SPREAD: distances[1].numpy(),
    })


def compare_with_collection(collection: Sequence[StateDict], generated: Sequence[StateDict], predict: Predictor,
                            labels: torch.Tensor, seed: int, *, scored: Sequence[int] | None = None,
                            n_baseline: int | None = None,
                            variants: Mapping[str, Sequence[StateDict]] | None = None,
                            scored_preds: torch.Tensor | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Rows for the originals, the generated models and `n_baseline` (default `len(generated)`) models of each
    baseline, and the settings the baselines were drawn with (noise norm, number averaged).

    The noise norm is the generated models' mean `l2_novelty`, so `noise` has their novelty by construction.
    scored: the collection checkpoints that are evaluated (default all): the "original" rows and the reference of
        max_iou_original; l2_novelty is always against the whole collection (an original's: against all the others).
    variants: further kinds of models scored like the generated ones (e.g. the generated models with their
        BatchNorm statistics recomputed), kind -> state dicts.
    scored_preds: (len(scored), N) the scored checkpoints' predictions, when already known (saved at collection).
    """
    points, gen_points = flatten(collection), flatten(generated)
    scored = list(range(len(collection))) if scored is None else list(scored)
    ref_preds = (torch.stack([predict(collection[i]) for i in scored]) if scored_preds is None
                 else scored_preds.long())
    gen_preds = torch.stack([predict(sd) for sd in generated])
    # an original's distances: to all the other checkpoints (one pass); its mistakes: against the other scored ones
    if len(collection) > 1:
        nearest, spread = nearest_and_mean_distance(points, points, exclude_self=True)
    else:
        nearest = spread = torch.full((1,), float("nan"))
    originals = model_rows(KIND_ORIGINAL, points[scored], ref_preds, points[scored], ref_preds, labels,
                           of_reference=True, index=scored, distances=(nearest[scored], spread[scored]))
    frames = [originals, model_rows(KIND_RPG, gen_points, gen_preds, points, ref_preds, labels)]
    for kind, models in (variants or {}).items():
        preds = torch.stack([predict(sd) for sd in models])
        frames.append(model_rows(kind, flatten(models), preds, points, ref_preds, labels))
    novelty = float(frames[1][L2_NOVELTY].mean())
    n = len(generated) if n_baseline is None else n_baseline
    for kind, kind_points in baseline_points(points, n, novelty, seed).items():
        models = [unflatten(p, collection[0]) for p in kind_points]
        # back from the state dicts: a clipped running_var is what was scored, so it is what is measured
        kind_points = flatten(models)
        preds = torch.stack([predict(sd) for sd in models])
        frames.append(model_rows(kind, kind_points, preds, points, ref_preds, labels))
    settings = {"noise_l2": novelty, "average_of": min(AVERAGE_OF, len(collection))}
    return pd.concat(frames, ignore_index=True), settings


def summary_columns(samples: pd.DataFrame) -> dict[str, float]:
    """Table columns from a samples table with baseline and novelty columns (accuracies in percent).

    Per baseline (and rpg_bn_recomputed): best / mean / min accuracy; per kind: the mean l2_novelty,
    max_iou_original and l2_spread. Novelty: the originals' mean nearest-neighbour distance and max IoU among
    themselves, the generated models' mean distance to the collection relative to it (`rpg_novelty_ratio`).
    Diversity: the originals' mean distance to the other checkpoints (`original_l2_spread`) and the generated
    models' mean distance to one another relative to it (`rpg_spread_ratio`; 1 = as spread as the collection).
    The best baseline (`rpg.evaluation.best_baseline`, by mean accuracy) and RPG's mean accuracy minus it.
    """
    out: dict[str, float] = {}
    by_kind = {kind: part for kind, part in samples.groupby(KIND)}
    for kind in (KIND_RPG, *VARIANTS, *BASELINES):
        part = by_kind.get(kind)
        if part is None:
            continue
        if kind != KIND_RPG:
            acc = part[ACCURACY] * 100
            stats = (acc.max(), acc.mean(), acc.min())
            out.update({acc_column(kind, stat): value for stat, value in zip(STATS, stats)})
        out.update({novelty_column(kind, L2_NOVELTY): part[L2_NOVELTY].mean(),
                    novelty_column(kind, MAX_IOU_ORIGINAL): part[MAX_IOU_ORIGINAL].mean()})
        if L2_SPREAD in part:
            out[novelty_column(kind, L2_SPREAD)] = part[L2_SPREAD].mean()
    orig = by_kind[KIND_ORIGINAL]
    out.update({novelty_column(KIND_ORIGINAL, L2_NOVELTY): orig[L2_NOVELTY].mean(),
                novelty_column(KIND_ORIGINAL, MAX_IOU_ORIGINAL): orig[MAX_IOU_ORIGINAL].mean()})
    rpg, orig_col = novelty_column(KIND_RPG, L2_NOVELTY), novelty_column(KIND_ORIGINAL, L2_NOVELTY)
    out["rpg_novelty_ratio"] = out[rpg] / out[orig_col]
    if L2_SPREAD in orig:
        out[novelty_column(KIND_ORIGINAL, L2_SPREAD)] = orig[L2_SPREAD].mean()
        rpg, orig_col = novelty_column(KIND_RPG, L2_SPREAD), novelty_column(KIND_ORIGINAL, L2_SPREAD)
        out["rpg_spread_ratio"] = out[rpg] / out[orig_col]
    name, best = best_baseline({kind: out.get(acc_column(kind, "mean"), float("nan")) for kind in BASELINES})
    out[BEST_BASELINE], out[best_baseline_column()] = name, best
    out[minus_baseline_column("mean")] = by_kind[KIND_RPG][ACCURACY].mean() * 100 - best
    return out
