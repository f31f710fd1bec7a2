"""The 1022 binary CIFAR-10 tasks: 10-bit embeddings, task ids, class names, binary labels, and the split.

Bit i (from the left) of an embedding is CIFAR-10 class i in the official order; 1 = positive class. The task id is
the embedding read as a binary number, so ``0000000011`` = 3 = "ship or truck". All-0 and all-1 are not tasks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from rpg.data import CIFAR10_CLASSES

N_BITS = 10
ALL_TASK_IDS = tuple(range(1, 2**N_BITS - 1))  # 1 .. 1022


class TaskError(ValueError):
    """An embedding, task id or class list that does not name a valid binary task."""


def parse_embedding(text: str) -> str:
    """Validate a 10-character 0/1 string that is neither all-0 nor all-1; return it unchanged."""
    text = str(text).strip()
    if len(text) != N_BITS:
        raise TaskError(f"embedding '{text}' must have exactly {N_BITS} bits (one per CIFAR-10 class), got {len(text)}")
    if set(text) - {"0", "1"}:
        raise TaskError(f"embedding '{text}' may contain only the characters 0 and 1")
    if text in ("0" * N_BITS, "1" * N_BITS):
        raise TaskError(f"embedding '{text}' is all-{text[0]}: a task needs at least one positive and one negative class")
    return text


def embedding_to_id(embedding: str) -> int:
    return int(parse_embedding(embedding), 2)


def id_to_embedding(task_id: int) -> str:
    if not 1 <= int(task_id) <= 2**N_BITS - 2:
        raise TaskError(f"task id {task_id} is out of range 1..{2**N_BITS - 2}")
    return format(int(task_id), f"0{N_BITS}b")


def classes_to_embedding(names: Iterable[str]) -> str:
    """Positive class names (case-insensitive) -> embedding."""
    bits = ["0"] * N_BITS
    for name in names:
        key = name.strip().lower()
        if key not in CIFAR10_CLASSES:
            raise TaskError(f"unknown class '{name}' (CIFAR-10 classes: {', '.join(CIFAR10_CLASSES)})")
        bits[CIFAR10_CLASSES.index(key)] = "1"
    return parse_embedding("".join(bits))


def positive_classes(embedding: str) -> list[str]:
    return [CIFAR10_CLASSES[i] for i, b in enumerate(parse_embedding(embedding)) if b == "1"]


def embedding_bits(task_ids: Sequence[int]) -> torch.Tensor:
    """Shapes: (T,) ids -> (T, 10) float 0/1 bits."""
    return torch.tensor([[float(b) for b in id_to_embedding(t)] for t in task_ids])


def binary_labels(class_labels: torch.Tensor, task_ids: Sequence[int]) -> torch.Tensor:
    """Shapes: class_labels (N,) in 0..9 -> (T, N) long, 1 where the image's class is positive for the task."""
    bits = embedding_bits(task_ids).long()  # (T, 10)
    return bits[:, class_labels.long()]  # (T, N)


@dataclass(frozen=True)
class TaskSplit:
    """Which task ids RPG trains on, validates on (seen but held out of RPG training), and never reads (unseen).

    `excluded` tasks are configured but in none of the three (a smaller training set, or the neighbours of unseen
    tasks kept out of training): nothing reads them either.
    """

    train: tuple[int, ...]
    val: tuple[int, ...]
    unseen: tuple[int, ...]
    excluded: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val), "unseen": list(self.unseen),
                "excluded": list(self.excluded)}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSplit":
        return cls(tuple(d["train"]), tuple(d["val"]), tuple(d["unseen"]), tuple(d.get("excluded", ())))


def neighbours(task_ids: Iterable[int]) -> set[int]:
    """Every valid task at Hamming distance 1 from a task of `task_ids`, and each task's bitwise complement."""
    out = set()
    for t in task_ids:
        out |= {t ^ (1 << b) for b in range(N_BITS)} | {(2**N_BITS - 1) ^ t}
    return {t for t in out if 1 <= t <= 2**N_BITS - 2}


def make_split(task_ids: Sequence[int], unseen: Sequence[int], n_val: int, seed: int, n_seen: int | None = None,
               holdout_neighbours: bool = False) -> TaskSplit:
    """Unseen ids are held out; `n_val` seen ids (seeded choice) validate RPG; the rest train it.

    Args:
        n_seen: train on a seeded random subset of this many of the remaining seen ids (None = all of them).
        holdout_neighbours: the unseen ids' Hamming-1 neighbours and complements are neither trained on nor
            validated on (they go to `excluded`).
    """
    task_ids = sorted(set(int(t) for t in task_ids))
    for t in task_ids:
        id_to_embedding(t)
    missing = sorted(set(unseen) - set(task_ids))
    if missing:
        raise TaskError(f"unseen task ids {missing} are not among the configured tasks")
    held = set(unseen) | (neighbours(unseen) if holdout_neighbours else set())
    seen = [t for t in task_ids if t not in held]
    if n_val >= len(seen):
        raise TaskError(f"n_val={n_val} leaves no seen task to train on ({len(seen)} seen tasks)")
    val = sorted(random.Random(seed).sample(seen, n_val))
    train = [t for t in seen if t not in set(val)]
    if n_seen is not None:
        if n_seen > len(train):
            raise TaskError(f"n_seen={n_seen} is more than the {len(train)} seen tasks left for training")
        # A different stream from the validation draw, so changing n_seen never changes the validation tasks.
        train = sorted(random.Random(seed + 1).sample(train, n_seen))
    excluded = sorted(set(task_ids) - set(train) - set(val) - set(unseen))
    return TaskSplit(tuple(train), tuple(val), tuple(sorted(set(unseen))), tuple(excluded))
