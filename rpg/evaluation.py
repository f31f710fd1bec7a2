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

Rows of samples.csv come from one builder, `SampleRows`: a family hands it each kind's models (their predictions,
the true classes, the models as flat points) with the originals and the training collection; it measures every
column above the same way for every family.

Baselines are registered like timm's models: `@register_baseline("<family>")` on a function registers it under
its name; `list_baselines(family)` gives a family's names in registration order (the order they are drawn in),
`get_baseline` / `create_baseline` find or call one and raise a clear error for an unknown name. A method from
outside the package joins a family by its `module:callable` name (`register_spec`, e.g. from a config key).
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch

from rpg.vision.similarity import max_iou_to_reference, misclassified_iou
from rpg.weightspace import mean_distance, nearest_and_mean_distance, nearest_distance

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
# Rows of samples.csv
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Models:
    """One kind's models as a family's predictor scored them (the input of `SampleRows.rows`).

    preds (M, N): each model's predicted class per test image; targets: the true classes, (N,) or per model (M, N);
    flat (M, P): the models as points, in the collection's coordinates (None: no weight-space novelty, NaN);
    index: each model's number in its kind (default 0..M-1); tasks: the task of each model (IoU compares models of
    one task only; None: one task); columns: identity columns after `kind` (e.g. task_id), one value per model;
    metrics: the family's further scores after `accuracy` (e.g. balanced_accuracy), (M,) each.
    """

    kind: str
    preds: torch.Tensor
    targets: torch.Tensor
    flat: torch.Tensor | None = None
    index: Sequence[int] | None = None
    tasks: Sequence[int] | None = None
    columns: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Collection:
    """The checkpoints the generator learnt from, as points (K, P) in the dtype distances are measured in.

    originals_inside: the originals are checkpoints of the collection, at rows `Models.index`; their l2_novelty
        and l2_spread come from one pass over the collection, each skipping itself (NaN for a collection of one).
    self_tolerance: otherwise an original skips any checkpoint within `self_tolerance * |original|` (itself,
        wherever it sits in the collection; an original outside it, e.g. of a held-out task, skips nothing).
    """

    points: torch.Tensor
    originals_inside: bool = False
    self_tolerance: float = 0.0

    def novelty(self, flat: torch.Tensor, of_originals: bool = False) -> torch.Tensor:
        """l2_novelty of models given as points (M, P) (originals: skipping themselves by `self_tolerance`),
        measured in the collection's dtype. -> (M,) float32."""
        tolerance = self.self_tolerance if of_originals else 0.0
        return l2_novelty(flat.to(self.points.dtype), self.points, self_tolerance=tolerance).float()

    @cached_property
    def own_distances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each checkpoint's distance to its nearest other one and its mean distance to the others. (K,), (K,)."""
        if len(self.points) > 1:
            return nearest_and_mean_distance(self.points, self.points, exclude_self=True)
        nan = torch.full((len(self.points),), float("nan"))
        return nan, nan


@dataclass
class SampleRows:
    """Builds the samples.csv rows of every kind of model against one set of originals and one training collection.

    The columns: kind, the models' identity columns, accuracy, the family's metrics, l2_novelty (against
    `collection`; NaN without one), max_iou_original (against the originals of the model's task; an original
    against the *other* ones, NaN where it has none), then pairwise_iou and l2_spread where the family measures them.
    """

    originals: Models
    collection: Collection | None = None
    pairwise_iou: bool = False
    l2_spread: bool = False

    def rows(self, models: Models) -> pd.DataFrame:
        """One row per model of `models` (the originals themselves included)."""
        n = len(models.preds)
        columns: dict[str, Any] = {KIND: models.kind, **{k: list(v) for k, v in models.columns.items()},
                                   "index": list(range(n)) if models.index is None else list(models.index),
                                   ACCURACY: (models.preds == models.targets).float().mean(1)}
        columns.update(models.metrics)
        nearest, spread = self._distances(models)
        iou, pairwise = self._iou(models)
        columns.update({L2_NOVELTY: nearest, MAX_IOU_ORIGINAL: iou})
        if self.pairwise_iou:
            columns[PAIRWISE_IOU] = pairwise
        if self.l2_spread:
            columns[L2_SPREAD] = spread
        return pd.DataFrame({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in columns.items()})

    def _distances(self, models: Models) -> tuple[torch.Tensor, torch.Tensor]:
        """l2_novelty and l2_spread (against the other models of the kind) of each model. (M,), (M,) float32."""
        n = len(models.preds)
        nan = torch.full((n,), float("nan"))
        coll = self.collection
        if coll is None or models.flat is None:
            return nan, nan
        own = models.kind == KIND_ORIGINAL
        if own and coll.originals_inside:
            rows = list(range(n)) if models.index is None else list(models.index)
            nearest, spread = coll.own_distances
            return nearest[rows], spread[rows]
        flat = models.flat.to(coll.points.dtype)
        spread = mean_distance(flat, flat, exclude_self=True).float() if self.l2_spread else nan
        return coll.novelty(flat, of_originals=own), spread

    def _iou(self, models: Models) -> tuple[torch.Tensor, torch.Tensor]:
        """max_iou_original and pairwise_iou of each model, task by task. (M,), (M,)."""
        n, orig = len(models.preds), self.originals
        best, pairwise = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
        tasks = torch.tensor(models.tasks) if models.tasks is not None else torch.zeros(n, dtype=torch.long)
        orig_tasks = (torch.tensor(orig.tasks) if orig.tasks is not None
                      else torch.zeros(len(orig.preds), dtype=torch.long))
        own = models.kind == KIND_ORIGINAL
        for t in sorted(set(tasks.tolist())):
            rows, ref = tasks == t, orig_tasks == t
            target = models.targets if models.targets.ndim == 1 else models.targets[rows][0]
            if not own or int(ref.sum()) > 1:
                best[rows] = max_iou_to_reference(models.preds[rows], orig.preds[ref], target, exclude_self=own)
            m = int(rows.sum())
            if self.pairwise_iou and m > 1:
                iou = misclassified_iou(models.preds[rows], models.preds[rows], target)
                pairwise[rows] = (iou.sum(1) - iou.diag()) / (m - 1)
        return best, pairwise


def samples_table(frames: Sequence[pd.DataFrame], float_dtype: str | None = None) -> pd.DataFrame:
    """Frames of `SampleRows.rows` as one samples table; float_dtype: the dtype its float columns are written in
    (None: the tensors' own, float32; the task zoo's samples.csv has float64)."""
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    if float_dtype is not None:
        frame = frame.astype({c: float_dtype for c in frame.columns if frame[c].dtype.kind == "f"})
    return frame


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


def load_spec(spec: str) -> Any:
    """The object a `module:attribute` name points at (`mypkg.methods:make_method`; dots after the colon walk
    attributes). Raises ValueError: not of that form, or nothing there."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"'{spec}' is not a 'module:callable' name")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load '{spec}': {err}") from err
    return obj


def register_spec(family: str, spec: str) -> str:
    """Register the callable named by `spec` (`module:callable`, `load_spec`) in `family`, under its `name`
    attribute or else its `__name__`; returns that name. A config never replaces another entry (a built-in).

    Raises:
        ValueError: `spec` names no callable, or its name is taken in `family` by another callable.
    """
    fn = load_spec(spec)
    if not callable(fn):
        raise ValueError(f"'{spec}' is not callable")
    name = getattr(fn, "name", None) or fn.__name__
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"'{spec}' has no usable name ({name!r}): give it a `name` attribute")
    known = _BASELINES.get(family, {})
    if name in known and known[name] is not fn:
        raise ValueError(f"'{spec}' is named '{name}', already a {family} method ({', '.join(known)}): rename it")
    register_baseline(family, name)(fn)
    return name


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
