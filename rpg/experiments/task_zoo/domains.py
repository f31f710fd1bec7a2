"""Domain tasks (issue 13, the study's `domains` regime): a task is a (class set, image domain) pair.

Why: in the 1022-task zoo every task is a union of CIFAR-10 classes, so the backbone's own 10-class classifier
composes every task (the `compose` baseline) without generating anything. Here a task also names an *image domain*,
a fixed transform of the images (a quarter turn, a colour negative, a strong blur, ...). The frozen backbone (trained
on plain images) sees the transformed images; each task's head is trained on its own domain's features. The clean
10-class head does not know how a rotated or inverted ship lands in feature space, so `compose` fails on shifted
domains, and a generator must combine what it saw of the class set (in other domains) with what it saw of the
domain (with other class sets).

Task ids: `tasks.domain_task_id(class_set, domain)` = domain * 1024 + class set; domain 0 is `identity`, whose
features are rows of the workflow's own cached features (no second extraction). The unseen tasks are
(`tasks.unseen` class set, shifted domain) pairs: the i-th unseen class set in domain 1 + i mod (D - 1), so every
unseen class set is a training task in its other domains and every domain has training tasks of its own.

Features of all domains are one safetensors file with the usual keys: `train_x`, `val_x`, `test_x` of shape
(D, N, d) (the same images in every domain, hence one label vector per split); `DomainHeadEvaluator` scores each
head on its own domain's features.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from rpg.config import Config
from rpg.experiments.task_zoo.heads import predict, stack_state_dicts
from rpg.experiments.task_zoo.tasks import ALL_TASK_IDS, domain_task_id, embedding_to_id, rows_by_domain
from rpg.utils import save_safetensors_atomic

BLUR_SIGMA = 1.5  # pixels on 32 x 32 images: fine texture gone, coarse shape and colour kept


def _blur(x: torch.Tensor) -> torch.Tensor:
    radius = int(3 * BLUR_SIGMA)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / BLUR_SIGMA) ** 2)
    k = k / k.sum()
    y = x.float()
    n, c, h, w = y.shape
    y = F.pad(y.reshape(n * c, 1, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))  # separable Gaussian
    return y.reshape(n, c, h, w).round().clamp(0, 255).to(torch.uint8)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8).expand_as(x).clone()


# Deterministic transforms of uint8 images (N, 3, H, W) -> the same shape and dtype.
DOMAINS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, dims=(2, 3)).contiguous(),
    "rot180": lambda x: torch.rot90(x, 2, dims=(2, 3)).contiguous(),
    "invert": lambda x: 255 - x,
    "blur": _blur,
    "grayscale": _grayscale,
}


def check_domains(names: Sequence[str]) -> None:
    if not names:
        return
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domains {unknown} (known: {', '.join(DOMAINS)})")
    if names[0] != "identity" or len(names) < 2:
        raise ValueError("domains.names must start with identity (the cached features) and name a shifted domain")


# ----------------------------------------------------------------------------------------------------------------
# Tasks and the unseen pairs
# ----------------------------------------------------------------------------------------------------------------


def class_sets(cfg: Config) -> list[int]:
    """The regime's class sets: tasks.unseen and the flip pair, then a seeded draw of the others, sorted."""
    fixed = set(cfg.tasks.unseen) | {embedding_to_id(e) for e in cfg.tasks.flip_pair}
    n = cfg.domains.class_sets
    if n < len(fixed):
        raise ValueError(f"domains.class_sets={n} is fewer than the {len(fixed)} unseen and flip-pair class sets")
    others = [c for c in ALL_TASK_IDS if c not in fixed]
    return sorted(fixed | set(random.Random(cfg.seed + 7).sample(others, n - len(fixed))))


def domain_task_ids(cfg: Config) -> list[int]:
    """Every (class set, domain) task of the regime, sorted (domain-major)."""
    check_domains(cfg.domains.names)
    return [domain_task_id(c, d) for d in range(len(cfg.domains.names)) for c in class_sets(cfg)]


def unseen_tasks(unseen_class_sets: Sequence[int], n_domains: int) -> list[int]:
    """The held-out pairs: the i-th unseen class set in shifted domain 1 + i mod (n_domains - 1)."""
    return sorted(domain_task_id(c, 1 + i % (n_domains - 1)) for i, c in enumerate(unseen_class_sets))


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------


def cache_domain_features(cfg: Config, backbone_path: str | Path, features_path: str | Path,
                          out_path: str | Path) -> dict:
    """Features of every domain's images through the frozen backbone, saved as (D, N, d) arrays.

    The images are the first `domains.train_images` / `val_images` / `test_images` of the workflow's own train /
    validation / test rows (the same split, so no head or backbone has trained on the validation images). Domain 0
    (identity) is copied from `features_path`, which holds exactly these rows' features.
    """
    from rpg.data import load_cifar10, split_train_val
    from rpg.experiments.task_zoo.features import backbone_feature_fn, load_features
    from rpg.utils import resolve_device

    names = cfg.domains.names
    check_domains(names)
    dc = cfg.domains
    start = time.time()
    data = load_cifar10(cfg.data.root, download=cfg.data.download)
    train_idx, val_idx = split_train_val(data, cfg.data.val_images, cfg.seed)
    images = {"train": data.train_images[train_idx[: dc.train_images]], "val": data.train_images[val_idx[: dc.val_images]],
              "test": data.test_images[: dc.test_images]}
    labels = {"train": data.train_labels[train_idx[: dc.train_images]], "val": data.train_labels[val_idx[: dc.val_images]],
              "test": data.test_labels[: dc.test_images]}
    clean = load_features(features_path)
    feats = backbone_feature_fn(cfg, backbone_path, resolve_device(cfg.device))
    tensors, seconds = {}, {}
    for split in ("train", "val", "test"):
        n = len(labels[split])
        if not torch.equal(clean[f"{split}_y"][:n], labels[split]):
            raise ValueError(f"{features_path} does not hold this config's {split} images in order")
        per_domain = [clean[f"{split}_x"][:n]]
        for name in names[1:]:
            t0 = time.time()
            per_domain.append(feats(DOMAINS[name](images[split])))
            seconds[name] = seconds.get(name, 0.0) + time.time() - t0
        tensors[f"{split}_x"] = torch.stack(per_domain)
        tensors[f"{split}_y"] = labels[split]
    info = {"domains": list(names), "n_train": dc.train_images, "n_val": dc.val_images, "n_test": dc.test_images,
            "feature_dim": int(tensors["train_x"].shape[-1]), "seconds_per_domain": seconds,
            "seconds": time.time() - start, "backbone": str(backbone_path)}
    save_safetensors_atomic(tensors, out_path, info)
    return info


# ----------------------------------------------------------------------------------------------------------------
# The domain's part of RPG's task code
# ----------------------------------------------------------------------------------------------------------------

STD_FLOOR = 1e-6  # a feature dimension the plain images leave constant: its ratios stay finite


def domain_statistics(features: torch.Tensor) -> torch.Tensor:
    """A code for each domain from its images' features alone (no label): per feature dimension, the shift of the
    mean in units of the plain images' std, and the log ratio of the stds, both against domain 0 (the plain images,
    whose code is zero).

    Why: a one-hot domain code names a domain only through its labelled tasks; these statistics describe what the
    transform does to the features, so a domain with no labelled task (`tasks.label_free_domains`) has a code too,
    and domains that move the features alike get close codes.
    Shapes: features (D, N, d) -> (D, 2d).
    """
    mean, std = features.float().mean(1), features.float().std(1).clamp_min(STD_FLOOR)  # (D, d) each
    return torch.cat([(mean - mean[0]) / std[0], torch.log(std / std[0])], dim=1)


def make_domain_codes(kind: str, features: torch.Tensor) -> torch.Tensor:
    """The domain code of each domain (`rpg.condition_domain`): onehot, stats (`domain_statistics`) or
    onehot_stats. Shapes: features (D, N, d) -> (D, c)."""
    parts = kind.split("_")
    if not parts or set(parts) - {"onehot", "stats"}:
        raise ValueError(f"unknown domain code {kind!r} (onehot, stats or onehot_stats)")
    codes = {"onehot": lambda: torch.eye(len(features)), "stats": lambda: domain_statistics(features)}
    return torch.cat([codes[p]() for p in parts], dim=1)


def stored_domain_codes(meta: dict) -> torch.Tensor | None:
    """The domain codes a generator file was trained with (metadata "extra.domain_codes"; None: one-hot, or no
    domains). Shapes: -> (D, c)."""
    codes = meta.get("extra", {}).get("domain_codes")
    return None if codes is None else torch.tensor(codes, dtype=torch.float32)


class DomainHeadEvaluator:
    """Scores head state dicts, each on the cached features of its own task's domain (one split)."""

    def __init__(self, features: torch.Tensor, class_labels: torch.Tensor):
        """Shapes: features (D, N, d), class_labels (N,)."""
        self.features, self.classes = features, class_labels

    def predict(self, state_dicts: Sequence[dict[str, torch.Tensor]], task_ids: Sequence[int] | None = None
                ) -> torch.Tensor:
        """Shapes: M state dicts, task_ids (M,) -> (M, N) binary predictions."""
        if task_ids is None or len(task_ids) != len(state_dicts):
            raise ValueError("domain tasks: pass one task id per state dict (it names the domain's features)")
        out = torch.empty(len(state_dicts), self.features.shape[1], dtype=torch.long)
        for d, rows in rows_by_domain(task_ids):
            out[rows] = predict(stack_state_dicts([state_dicts[i] for i in rows.tolist()]), self.features[d])
        return out
