"""What every generated Table 1 / ablation row is compared with (spec §2d, unconditional): the baselines of
Zeng et al. 2025 and the novelty of every sample.

Baselines, each sampled as many times as the generator was and scored by the same evaluator:
  noise      a random collection checkpoint plus isotropic Gaussian noise whose L2 norm is the generated samples'
             mean distance to their nearest collection checkpoint (same novelty as the generator's samples)
  average16  the average of 16 random collection checkpoints (all of them when there are fewer)
  gaussian   an independent Gaussian per parameter with the collection's mean and std
Beside the generated models (kind `rpg`), `rpg_bn_recomputed`: the same samples with their BatchNorm running
statistics recomputed on training images instead of generated (when `architectures.bn_recompute_images` > 0).
Novelty of every model (generated, baseline, and each original against the *other* originals), measured by
`rpg.evaluation.SampleRows` in its vocabulary:
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
                            MAX_IOU_ORIGINAL, STATS, Collection, Models, SampleRows, acc_column, best_baseline,
                            best_baseline_column, create_baseline, list_baselines, minus_baseline_column,
                            novelty_column, register_baseline, samples_table)
from rpg.weightspace import flatten, gaussian_samples, noise_at_distance, random_averages, unflatten

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
    points = flatten(collection)
    scored = list(range(len(collection))) if scored is None else list(scored)
    ref_preds = (torch.stack([predict(collection[i]) for i in scored]) if scored_preds is None
                 else scored_preds.long())

    def models(kind: str, state_dicts: Sequence[StateDict]) -> Models:  # this family's predictor, one kind at a time
        return Models(kind, torch.stack([predict(sd) for sd in state_dicts]), labels, flatten(state_dicts))

    # an original's distances: to all the other checkpoints (one pass); its mistakes: against the other scored ones
    originals = Models(KIND_ORIGINAL, ref_preds, labels, points[scored], index=scored)
    builder = SampleRows(originals, Collection(points, originals_inside=True), l2_spread=True)
    frames = [builder.rows(originals), builder.rows(models(KIND_RPG, generated))]
    frames += [builder.rows(models(kind, variant)) for kind, variant in (variants or {}).items()]
    novelty = float(frames[1][L2_NOVELTY].mean())
    n = len(generated) if n_baseline is None else n_baseline
    for kind, kind_points in baseline_points(points, n, novelty, seed).items():
        # back from the state dicts: a clipped running_var is what was scored, so it is what is measured
        frames.append(builder.rows(models(kind, [unflatten(p, collection[0]) for p in kind_points])))
    settings = {"noise_l2": novelty, "average_of": min(AVERAGE_OF, len(collection))}
    return samples_table(frames), settings


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
