"""Evaluation entry points for the MLP collection of `make_mlp_collection.py` (for `rpg train/evaluate --eval`).

`score` is the validation accuracy (what `rpg train` maximises when it keeps its best generator); `test_accuracy`
is for reporting. The scikit-learn digits (8x8 images, 10 classes, 1797 samples) are split once, with a fixed seed,
into 1197 training, 300 validation and 300 test images.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from sklearn.datasets import load_digits
from torch import nn

N_VAL, N_TEST = 300, 300
MODEL_KWARGS = {"in_features": 64, "hidden": 32, "num_classes": 10}


def build_mlp(in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> nn.Sequential:
    """The network whose weights the collection holds: Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@lru_cache(maxsize=1)
def digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train" | "val" | "test": (x (n, 64) float32 in [0, 1], y (n,) int64)}, the same every call."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    parts = {"test": order[:N_TEST], "val": order[N_TEST:N_TEST + N_VAL], "train": order[N_TEST + N_VAL:]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


@torch.no_grad()
def accuracy(state_dict: dict[str, torch.Tensor], split: str) -> float:
    model = build_mlp(**MODEL_KWARGS)
    model.load_state_dict(state_dict)
    x, y = digits_split()[split]
    return (model(x).argmax(1) == y).float().mean().item()


def score(state_dict: dict[str, torch.Tensor]) -> float:
    """Validation accuracy in [0, 1]."""
    return accuracy(state_dict, "val")


def test_accuracy(state_dict: dict[str, torch.Tensor]) -> float:
    """Test accuracy in [0, 1]."""
    return accuracy(state_dict, "test")
