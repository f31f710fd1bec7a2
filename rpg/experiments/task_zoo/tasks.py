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
DOMAIN_STRIDE = 2**N_BITS  # task id = domain * DOMAIN_STRIDE + class-set id
MAX_DOMAINS = 16


class TaskError(ValueError):
    """An embedding, task id or class list that does not name a valid binary task."""


def split_task_id(task_id: int) -> tuple[int, int]:
    """Task id -> (class-set id 1..1022, domain index); domain 0 for every task of the 1022-task zoo."""
    domain, class_set = divmod(int(task_id), DOMAIN_STRIDE)
    return class_set, domain


def domain_task_id(class_set: int, domain: int) -> int:
    """(class-set id, domain index) -> task id (the class-set id itself in domain 0)."""
    if not 0 <= int(domain) < MAX_DOMAINS:
        raise TaskError(f"domain {domain} is out of range 0..{MAX_DOMAINS - 1}")
    id_to_embedding(class_set)
    return int(domain) * DOMAIN_STRIDE + int(class_set)


def task_domains(task_ids: Sequence[int]) -> torch.Tensor:
    """Shapes: (T,) ids -> (T,) long domain indices."""
    return torch.tensor([split_task_id(t)[1] for t in task_ids], dtype=torch.long)


def rows_by_domain(task_ids: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
    """[(domain, (n_d,) long positions in `task_ids` of that domain's tasks)], domains ascending."""
    domains = task_domains(task_ids)
    return [(d, (domains == d).nonzero().flatten()) for d in domains.unique().tolist()]


def parse_embedding(text: str) -> str:
    """Validate a 10-character 0/1 string that is neither all-0 nor all-1, optionally followed by `@<domain>`
    (a domain task, domain >= 1); return it unchanged."""
    text = str(text).strip()
    if "@" in text:
        bits, _, domain = text.partition("@")
        if not domain.isdigit() or not 1 <= int(domain) < MAX_DOMAINS:
            raise TaskError(f"embedding '{text}': the domain after '@' must be an integer 1..{MAX_DOMAINS - 1}")
        parse_embedding(bits)
        return text
    if len(text) != N_BITS:
        raise TaskError(f"embedding '{text}' must have exactly {N_BITS} bits (one per CIFAR-10 class), got {len(text)}")
    if set(text) - {"0", "1"}:
        raise TaskError(f"embedding '{text}' may contain only the characters 0 and 1")
    if text in ("0" * N_BITS, "1" * N_BITS):
        raise TaskError(f"embedding '{text}' is all-{text[0]}: a task needs at least one positive and one negative class")
    return text


def embedding_to_id(embedding: str) -> int:
    bits, _, domain = parse_embedding(embedding).partition("@")
    return int(bits, 2) + int(domain or 0) * DOMAIN_STRIDE


def id_to_embedding(task_id: int) -> str:
    class_set, domain = split_task_id(task_id)
    if not 1 <= class_set <= 2**N_BITS - 2 or domain >= MAX_DOMAINS or int(task_id) < 0:
        raise TaskError(f"task id {task_id} is out of range 1..{2**N_BITS - 2} (plus a multiple of {DOMAIN_STRIDE} "
                        f"below {MAX_DOMAINS * DOMAIN_STRIDE} for a domain task)")
    bits = format(class_set, f"0{N_BITS}b")
    return f"{bits}@{domain}" if domain else bits


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
    return [CIFAR10_CLASSES[i] for i, b in enumerate(parse_embedding(embedding).partition("@")[0]) if b == "1"]


def embedding_bits(task_ids: Sequence[int]) -> torch.Tensor:
    """The class-set bits (a domain task's domain left out). Shapes: (T,) ids -> (T, 10) float 0/1 bits."""
    return torch.tensor([[float(b) for b in id_to_embedding(t)[:N_BITS]] for t in task_ids])


def task_condition(task_ids: Sequence[int], n_domains: int = 0,
                   domain_codes: torch.Tensor | None = None) -> torch.Tensor:
    """RPG's condition vector: the class-set bits, then (n_domains > 0) the task's domain code: row d of
    `domain_codes` (n_domains, c) for a task of domain d, the one-hot code (c = n_domains) when None.

    Shapes: (T,) ids -> (T, 10 + c) float.
    """
    bits = embedding_bits(task_ids)
    if not n_domains:
        return bits
    domains = task_domains(task_ids)
    if len(domains) and int(domains.max()) >= n_domains:
        raise TaskError(f"task domain {int(domains.max())} is out of range for {n_domains} domains")
    codes = torch.eye(n_domains) if domain_codes is None else domain_codes.float()
    if len(codes) != n_domains:
        raise TaskError(f"{len(codes)} domain codes for {n_domains} domains")
    return torch.cat([bits, codes[domains]], dim=1)


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
    return {t for t in out if 1 <= t % DOMAIN_STRIDE <= 2**N_BITS - 2}  # a domain task keeps its domain


def make_split(task_ids: Sequence[int], unseen: Sequence[int], n_val: int, seed: int, n_seen: int | None = None,
               holdout_neighbours: bool = False, shifted_domain_tasks: int | None = None,
               label_free_domains: Sequence[int] = ()) -> TaskSplit:
    """Unseen ids are held out; `n_val` seen ids (seeded choice) validate RPG; the rest train it.

    Args:
        n_seen: train on a seeded random subset of this many of the remaining seen ids (None = all of them).
        holdout_neighbours: the unseen ids' Hamming-1 neighbours and complements are neither trained on nor
            validated on (they go to `excluded`).
        shifted_domain_tasks: train on a seeded random subset of at most this many tasks of each shifted domain
            (domain >= 1; domain 0, the plain images, keeps all its tasks): a domain seen with few labelled tasks.
        label_free_domains: shifted domains with no labelled task at all (k = 0): their training and validation
            tasks go to `excluded` (the other validation tasks are those of the split without it); their unseen
            pairs stay unseen.
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
    if shifted_domain_tasks is not None:
        kept = []
        for domain, rows in rows_by_domain(train):
            ids = [train[i] for i in rows.tolist()]
            if domain > 0 and len(ids) > shifted_domain_tasks:  # its own stream per domain: k never moves another
                ids = random.Random(seed + 2 + domain).sample(ids, shifted_domain_tasks)
            kept += ids
        train = sorted(kept)
    if label_free_domains:
        if 0 in set(label_free_domains):
            raise TaskError("label_free_domains names domain 0 (the plain images): only a shifted domain can be label-free")
        free = set(int(d) for d in label_free_domains)
        train = [t for t in train if split_task_id(t)[1] not in free]
        val = [t for t in val if split_task_id(t)[1] not in free]
        if not val:
            raise TaskError("label_free_domains leaves no validation task")
    excluded = sorted(set(task_ids) - set(train) - set(val) - set(unseen))
    return TaskSplit(tuple(train), tuple(val), tuple(sorted(set(unseen))), tuple(excluded))
