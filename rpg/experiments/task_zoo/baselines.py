"""What every generated head is compared with (spec §2d): non-generative baselines and the novelty of samples.

A generated head's accuracy means little alone: on the shared-init zoo a least-squares map or a neighbour average
already matches the originals. Every baseline here is built from the *training split* of the zoo only (the same
checkpoints RPG trains on; `load_training_zoo` opens no other file) and scored by the same evaluator as RPG's samples.

Head baselines, for any target task (flattened heads in `HEAD_KEYS` order):
- `affine`: least squares from `[1, ±1 bits]` to each training task's head (the mean of its checkpoints);
- `nearest`: the mean head of the training tasks at the smallest Hamming distance (the task itself if it is a
  training task: for seen tasks the baseline is a lookup table, which is what a generator must beat there);
- `complement`: the bitwise complement's head with its two output rows swapped (the same classifier, relabelled),
  when the complement is a training task; absent otherwise;
- `mean`: the mean training head;
- `noise`: the last checkpoint of the (lowest-id) Hamming-nearest training task plus Gaussian noise whose L2 norm is
  the mean novelty of RPG's samples (Zeng et al. 2025: generators often do not beat a checkpoint plus noise). Under a
  sorting gauge (`train.canonicalise: sort`) the noisy head is re-sorted before its novelty is measured, like every
  head, so it can measure a few percent farther than its noise.
Function-space baseline, `compose`: no per-task weights at all; the backbone's own 10-class classifier on the cached
features, p(positive) = sum of its softmax over the task's positive classes (every task is a union of classes).

Domain tasks (`rpg.experiments.task_zoo.domains`): every head baseline is built per domain, from that domain's
training tasks only (the class-set bits as above; a head is only meaningful on the features it was trained on), so
with one domain each is exactly the definition above; `compose` applies the clean 10-class head to each task's
domain features (the classifier a fixed backbone offers: it has never seen a shifted domain).

Novelty (`rpg.evaluation.l2_novelty`, measured by `rpg.evaluation.SampleRows` against `TrainingZoo.collection`): L2
distance of a head to the nearest training checkpoint (for a checkpoint of the training split itself, the nearest
*other* one: the zoo's own spread).

Every baseline is registered in `rpg.evaluation` under family `task` (FAMILY): a head baseline is called as
`fn(zoo, targets, noise_l2, seed)` -> (n, P) flat heads (all but `noise` ignore the last two, and may be called with
`(zoo, targets)`); `compose`, which has no weights, as `fn(classifier, features, task_ids)` -> (T, N) predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch

from rpg.evaluation import Collection, create_baseline, list_baselines, register_baseline
from rpg.experiments.task_zoo.heads import HEAD_KEYS, load_task_checkpoints
from rpg.experiments.task_zoo.tasks import (N_BITS, TaskSplit, domain_task_id, embedding_bits, rows_by_domain,
                                            split_task_id, task_domains)
from rpg.utils import load_safetensors
from rpg.weightspace import flatten, noise_at_distance, unflatten

FAMILY = "task"  # this experiment's baselines in the `rpg.evaluation` registry
# Seed offset (added to cfg.seed) of the noise baseline's draws; a module constant, not a config key.
NOISE_SEED_OFFSET = 29
ALL_BITS = 2**N_BITS - 1
SELF_TOLERANCE = 1e-6  # relative L2 distance under which a checkpoint is the head itself


# ----------------------------------------------------------------------------------------------------------------
# Flat heads and the training zoo
# ----------------------------------------------------------------------------------------------------------------


def flatten_heads(state_dicts: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Shapes: n head state dicts -> (n, P) float32, parameters in `HEAD_KEYS` order (`rpg.weightspace.flatten`)."""
    return flatten(state_dicts, HEAD_KEYS)


def unflatten_heads(flat: torch.Tensor, shapes: dict[str, torch.Size]) -> list[dict[str, torch.Tensor]]:
    """Inverse of `flatten_heads`. Shapes: (n, P) -> n state dicts with `shapes`."""
    template = {k: torch.empty(shapes[k], dtype=flat.dtype) for k in HEAD_KEYS}
    return [unflatten(row, template) for row in flat]


@dataclass(frozen=True)
class TrainingZoo:
    """The training split's checkpoints, flattened: what every head baseline and the novelty measure see."""

    task_ids: tuple[int, ...]
    checkpoints: torch.Tensor  # (T * K, P), task-major
    n_checkpoints: int
    shapes: dict[str, torch.Size]
    gauge: Callable | None = None  # the hidden-unit order of train.canonicalise (rpg.experiments.task_zoo.canonical)

    def canonical(self, state_dicts: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Heads in this zoo's gauge (the same functions), so that their L2 distances to it mean something."""
        return list(state_dicts) if self.gauge is None else self.gauge(state_dicts)

    def restrict(self, keep: Sequence[int]) -> "TrainingZoo":
        """The zoo of the training tasks at positions `keep` (e.g. one domain's)."""
        rows = torch.as_tensor(list(keep), dtype=torch.long)
        ckpts = self.checkpoints.view(len(self.task_ids), self.n_checkpoints, -1)[rows].reshape(-1, self.checkpoints.shape[1])
        return TrainingZoo(tuple(self.task_ids[i] for i in rows.tolist()), ckpts, self.n_checkpoints, self.shapes,
                           self.gauge)

    @cached_property
    def mean_heads(self) -> torch.Tensor:
        """(T, P): each training task's mean over its checkpoints."""
        return self.checkpoints.view(len(self.task_ids), self.n_checkpoints, -1).mean(1)

    @cached_property
    def collection(self) -> Collection:
        """The checkpoints as the training collection of `rpg.evaluation` (novelty measured in float64, converted
        once for every group; an original skips any checkpoint within SELF_TOLERANCE of itself)."""
        return Collection(self.checkpoints.double(), self_tolerance=SELF_TOLERANCE)


def load_training_zoo(zoo_dir: str | Path, split: TaskSplit, n_checkpoints: int,
                      canonicalise: str = "none") -> TrainingZoo:
    """Read the checkpoints of `split.train` only (never a validation or unseen task's file), in the hidden-unit
    gauge `canonicalise` fitted on them (the one RPG was trained in)."""
    from rpg.experiments.task_zoo.canonical import Gauge

    sds, _ = load_task_checkpoints(zoo_dir, split.train, n_checkpoints)
    gauge = Gauge.fit(canonicalise, sds, n_checkpoints)
    sds = gauge(sds, n_checkpoints)
    return TrainingZoo(tuple(split.train), flatten_heads(sds), n_checkpoints,
                       {k: sds[0][k].shape for k in HEAD_KEYS}, None if canonicalise == "none" else gauge)


# ----------------------------------------------------------------------------------------------------------------
# Head baselines
# ----------------------------------------------------------------------------------------------------------------


def task_design(task_ids: Sequence[int]) -> torch.Tensor:
    """The affine map's inputs. Shapes: (T,) ids -> (T, 11) float64 rows [1, ±1 bits]."""
    bits = 2 * embedding_bits(task_ids).double() - 1
    return torch.cat([torch.ones(len(task_ids), 1, dtype=torch.float64), bits], dim=1)


def hamming(a: Sequence[int], b: Sequence[int]) -> torch.Tensor:
    """Shapes: (A,), (B,) ids -> (A, B) number of differing bits."""
    return (embedding_bits(a)[:, None, :] != embedding_bits(b)[None, :, :]).sum(-1)


@register_baseline(FAMILY, "affine")
def affine_heads(zoo: TrainingZoo, targets: Sequence[int], noise_l2: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Least-squares affine map from [1, ±1 bits] to the training tasks' mean heads. Shapes: -> (n, P)."""
    coef = torch.linalg.lstsq(task_design(zoo.task_ids), zoo.mean_heads.double(), driver="gelsd").solution
    return (task_design(targets) @ coef).float()


@register_baseline(FAMILY, "nearest")
def nearest_heads(zoo: TrainingZoo, targets: Sequence[int], noise_l2: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Mean of the mean heads of the Hamming-nearest training tasks (all ties). Shapes: -> (n, P)."""
    dist = hamming(targets, zoo.task_ids)
    weights = (dist == dist.min(1, keepdim=True).values).float()
    return (weights / weights.sum(1, keepdim=True)) @ zoo.mean_heads


@register_baseline(FAMILY, "complement")
def complement_heads(zoo: TrainingZoo, targets: Sequence[int], noise_l2: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The complement task's mean head with output rows 0 <-> 1 swapped; NaN rows where the complement is not a
    training task. Shapes: -> (n, P)."""
    row = {t: i for i, t in enumerate(zoo.task_ids)}
    heads = torch.full((len(targets), zoo.checkpoints.shape[1]), float("nan"))
    for i, t in enumerate(targets):
        class_set, domain = split_task_id(t)
        complement = domain_task_id(ALL_BITS - class_set, domain)  # the complement class set, same domain
        if complement in row:
            sd = unflatten_heads(zoo.mean_heads[row[complement]][None], zoo.shapes)[0]
            heads[i] = flatten_heads([{**sd, "2.weight": sd["2.weight"].flip(0)}])[0]
    return heads


@register_baseline(FAMILY, "mean")
def mean_heads(zoo: TrainingZoo, targets: Sequence[int], noise_l2: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The mean training head, for every target. Shapes: -> (n, P)."""
    return zoo.mean_heads.mean(0, keepdim=True).expand(len(targets), -1).clone()


@register_baseline(FAMILY, "noise")
def noise_heads(zoo: TrainingZoo, targets: Sequence[int], l2: float, seed: int) -> torch.Tensor:
    """Last checkpoint of the lowest-id Hamming-nearest training task plus Gaussian noise of L2 norm `l2`.

    Shapes: -> (n, P).
    """
    nearest = hamming(targets, zoo.task_ids).argmin(1)  # first minimum = lowest id (task_ids are sorted)
    source = zoo.checkpoints.view(len(zoo.task_ids), zoo.n_checkpoints, -1)[nearest, -1]
    return noise_at_distance(source, l2, torch.Generator().manual_seed(seed))


HEAD_BASELINES = tuple(list_baselines(FAMILY))


def baseline_heads(zoo: TrainingZoo, targets: Sequence[int], noise_l2: float, seed: int,
                   names: Sequence[str] = HEAD_BASELINES) -> dict[str, torch.Tensor]:
    """The head baselines `names` (default: every one) for `targets`: {name: (n, P)}, NaN rows where a baseline
    does not exist. A baseline's heads do not depend on which others are built with it.

    Domain tasks: each target's baselines come from its own domain's training tasks (`_single_domain_baselines`);
    a domain without training tasks gets NaN rows.
    """
    zoo_domains, target_domains = task_domains(zoo.task_ids), task_domains(targets)
    if not bool((zoo_domains > 0).any() or (target_domains > 0).any()):  # one domain: the plain images
        return _single_domain_baselines(zoo, targets, noise_l2, seed, names)
    out = {name: torch.full((len(targets), zoo.checkpoints.shape[1]), float("nan")) for name in names}
    for d, rows in rows_by_domain(targets):
        keep = (zoo_domains == d).nonzero().flatten().tolist()
        if not keep:
            continue
        part = _single_domain_baselines(zoo.restrict(keep), [targets[i] for i in rows.tolist()], noise_l2,
                                        seed + 7919 * d, names)
        for name, heads in part.items():
            out[name][rows] = heads
    return out


def _single_domain_baselines(zoo: TrainingZoo, targets: Sequence[int], noise_l2: float, seed: int,
                             names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {name: create_baseline(name, FAMILY, zoo, targets, noise_l2, seed) for name in names}


# ----------------------------------------------------------------------------------------------------------------
# Function-space baseline: the backbone's 10-class classifier
# ----------------------------------------------------------------------------------------------------------------


def load_backbone_classifier(backbone_path: str | Path) -> dict[str, torch.Tensor] | None:
    """The backbone's 10-class linear classifier on its features (`head.weight` (10, d), `head.bias` (10,)), as
    `CifarCNN.forward_head` applies it; None for a backbone without one (a timm model loaded with num_classes=0)."""
    tensors, _ = load_safetensors(backbone_path)
    weight, bias = tensors.get("head.weight"), tensors.get("head.bias")
    if weight is None or bias is None or weight.shape[0] != N_BITS:
        return None
    return {"weight": weight.float(), "bias": bias.float()}


@register_baseline(FAMILY, "compose")
@torch.no_grad()
def compose_predictions(classifier: dict[str, torch.Tensor], features: torch.Tensor,
                        task_ids: Sequence[int]) -> torch.Tensor:
    """Binary predictions with no per-task weights: positive iff the softmax mass on the positive classes > 1/2.

    The cached features average an image and its mirror; the classifier is linear, so this equals averaging the
    two logit vectors. Domain tasks: features (D, N, d), each task on its own domain's features.
    Shapes: features (N, d) or (D, N, d) -> (T, N) long.
    """
    probs = torch.softmax(features.float() @ classifier["weight"].T + classifier["bias"], dim=-1)  # ([D,] N, 10)
    bits = embedding_bits(task_ids)  # (T, 10)
    if probs.ndim == 2:
        return (bits @ probs.T > 0.5).long()  # (T, N)
    p_pos = torch.einsum("tc,tnc->tn", bits, probs[task_domains(task_ids)])  # (T, N)
    return (p_pos > 0.5).long()


BASELINES = tuple(list_baselines(FAMILY))  # the head baselines, then compose

