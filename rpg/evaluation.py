"""What every generated model is compared with (spec §2d), one layer for every experiment: the column vocabulary
of `samples.csv` and the tables, the novelty of a model, a registry of baselines and the best-baseline rule.

An experiment supplies its predictor (what scores a state dict) and its set of baselines (registered here under its
family); the geometry (flatten, the exact nearest distance, the noise draw) is `rpg.weightspace`'s.

Vocabulary (the same name for the same quantity in the task zoo and the architecture study):
  samples.csv, one row per model   kind (`original`, `rpg`, a baseline's name), `accuracy`, `balanced_accuracy`,
                                   `l2_novelty`, `max_iou_original`, `pairwise_iou`, `l2_spread`
  tables, one row per task / net   `<kind>_<stat>_acc` (stat best / mean / min / std over the kind's models; a
                                   baseline of one model per task: `<kind>_acc`), `gap_best` / `gap_mean` (original
                                   minus RPG), `<kind>_<novelty>` (the mean of a per-model novelty column),
                                   `best_baseline`, `best_baseline_acc`, `rpg_<stat>_minus_baseline_acc`

Novelty of a model (Zeng et al. 2025; p-diff's similarity):
  l2_novelty        L2 distance to the nearest checkpoint the generator learnt from (for one of those checkpoints:
                    the nearest *other* one, the collection's own spacing)
  max_iou_original  maximum IoU of its misclassified test images against the originals' (`rpg.vision.similarity`)
  pairwise_iou      mean IoU against the other models of its kind (for the same task)
  l2_spread         mean L2 distance to the other models of its kind: how spread a generator's samples are

Baselines are registered like timm's models: `@register_baseline("<family>")` on a function registers it under
its name; `list_baselines(family)` gives a family's names in registration order (the order they are drawn in),
`get_baseline` / `create_baseline` find or call one and raise a clear error for an unknown name.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch

from rpg.weightspace import nearest_distance

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------------

KIND_ORIGINAL = "original"  # kind of the checkpoints the generator learnt from (or the held-out task's own)
KIND_RPG = "rpg"  # kind of the generated models
KIND = "kind"
ACCURACY = "accuracy"
BALANCED_ACCURACY = "balanced_accuracy"
L2_NOVELTY = "l2_novelty"
MAX_IOU_ORIGINAL = "max_iou_original"
PAIRWISE_IOU = "pairwise_iou"
L2_SPREAD = "l2_spread"
NOVELTY = (L2_NOVELTY, MAX_IOU_ORIGINAL, PAIRWISE_IOU)
# accuracy metric of samples.csv -> its suffix in the tables
METRICS = ((ACCURACY, "acc"), (BALANCED_ACCURACY, "bal_acc"))
STATS = ("best", "mean", "min")
GAP_BEST = "gap_best"
GAP_MEAN = "gap_mean"
BEST_BASELINE = "best_baseline"


def acc_column(kind: str, stat: str | None = None, short: str = "acc") -> str:
    """`<kind>_<stat>_<short>` (e.g. rpg_mean_acc), `<kind>_<short>` without a stat (e.g. affine_acc)."""
    return f"{kind}_{stat}_{short}" if stat else f"{kind}_{short}"


def novelty_column(kind: str, name: str) -> str:
    """A table's mean of per-model novelty column `name` over models of `kind` (e.g. rpg_l2_novelty)."""
    return f"{kind}_{name}"


def best_baseline_column(short: str = "acc") -> str:
    return f"{BEST_BASELINE}_{short}"


def minus_baseline_column(stat: str, short: str = "acc") -> str:
    """RPG's `stat` (best sample / mean over samples) minus the best baseline (e.g. rpg_best_minus_baseline_acc)."""
    return f"{KIND_RPG}_{stat}_minus_baseline_{short}"


# ----------------------------------------------------------------------------------------------------------------
# Novelty
# ----------------------------------------------------------------------------------------------------------------


def l2_novelty(points: torch.Tensor, collection: torch.Tensor, *, exclude_self: bool = False,
               self_tolerance: float = 0.0) -> torch.Tensor:
    """L2 distance of each model to the nearest checkpoint of the collection (exact: `rpg.weightspace`).

    For checkpoints of the collection themselves, the nearest *other* one: `exclude_self` when points is the
    collection (row i skips checkpoint i), `self_tolerance` when they may sit anywhere in it (a checkpoint within
    `self_tolerance * |point|` is the point itself). Shapes: (A, P), (B, P) -> (A,) in the inputs' dtype.
    """
    return nearest_distance(points, collection, exclude_self, self_tolerance)


# ----------------------------------------------------------------------------------------------------------------
# Registry of baselines
# ----------------------------------------------------------------------------------------------------------------

_BASELINES: dict[str, dict[str, Callable]] = {}  # family -> name -> function, in registration order


def register_baseline(family: str, name: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator: register a baseline of `family` under `name` (default: the function's name). A name registered
    again is replaced, with a warning (as timm's `register_model`)."""

    def register(fn: Callable) -> Callable:
        key = name or fn.__name__
        found = _BASELINES.setdefault(family, {})
        if key in found and found[key] is not fn:
            warnings.warn(f"baseline '{key}' of family '{family}' registered again: the new one replaces the old",
                          stacklevel=2)
        found[key] = fn
        return fn

    return register


def list_baselines(family: str | None = None) -> list[str]:
    """The names of `family`'s baselines in registration order; every `family/name` without a family."""
    if family is None:
        return [f"{fam}/{name}" for fam, names in _BASELINES.items() for name in names]
    return list(_BASELINES.get(family, {}))


def get_baseline(name: str, family: str) -> Callable:
    """The function registered as `name` in `family`.

    Raises:
        RuntimeError: no such family or no such baseline in it (the message lists the known ones).
    """
    if family not in _BASELINES:
        raise RuntimeError(f"unknown baseline family '{family}' (registered: {', '.join(_BASELINES) or 'none'}; "
                           "a family registers its baselines when its module is imported)")
    if name not in _BASELINES[family]:
        raise RuntimeError(f"unknown baseline '{name}' of family '{family}' "
                           f"(registered: {', '.join(_BASELINES[family])})")
    return _BASELINES[family][name]


def create_baseline(name: str, family: str, *args, **kwargs):
    """Call baseline `name` of `family` with the family's arguments (what it returns is the family's contract)."""
    return get_baseline(name, family)(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The best baseline
# ----------------------------------------------------------------------------------------------------------------


def best_baseline(scores: Mapping[str, float]) -> tuple[str, float]:
    """The baseline with the highest score (its mean accuracy over the models compared) among those that exist
    (a NaN score: absent), the first in `scores`' order on a tie; ("", nan) when none exists.

    Every table uses this rule: table11 / table16 / seen_summary per task, the study per regime and group (among the
    baselines present on every task), table1 / ablations per architecture; `rpg_<stat>_minus_baseline_acc` is RPG's
    best sample (stat best) or mean over samples (stat mean) minus `best_baseline_acc`.
    """
    name, best = "", float("nan")
    for key, value in scores.items():
        if value == value and not best >= value:  # skips NaN; the first maximum wins
            name, best = key, float(value)
    return name, best
