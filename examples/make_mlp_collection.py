"""Make a small checkpoint collection to try `rpg train --checkpoints` on: a 2-layer MLP on scikit-learn digits.

    python examples/make_mlp_collection.py --out results/byo/mlp_digits/checkpoints

Trains `mlp_eval.build_mlp()` (64-32-10, 2,410 parameters) with Adam for `--epochs` epochs, then saves one
checkpoint after each of `--checkpoints` further epochs (as the paper collects its checkpoints: many, from the last
part of one training run). Each file is a safetensors state dict whose metadata names the architecture (`arch`,
`model_kwargs`, `build`) and its validation and test accuracy. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlp_eval import MODEL_KWARGS, build_mlp, digits_split, score, test_accuracy  # noqa: E402

from rpg.utils import save_safetensors_atomic  # noqa: E402


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, gen: torch.Generator, batch_size: int) -> None:
    x, y = digits_split()["train"]
    for idx in torch.randperm(len(y), generator=gen).split(batch_size):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/byo/mlp_digits/checkpoints", help="output folder")
    parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints to save (default 20)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs before the first checkpoint (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build_mlp(**MODEL_KWARGS)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        train_epoch(model, optimizer, gen, batch_size=64)
    out = Path(args.out)
    for k in range(args.checkpoints):
        train_epoch(model, optimizer, gen, batch_size=64)
        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        path = out / f"mlp_{k:03d}.safetensors"
        save_safetensors_atomic(state, path, {
            "arch": "mlp_digits", "model_kwargs": MODEL_KWARGS,
            "build": "examples/mlp_eval.py: build_mlp(**model_kwargs).load_state_dict(state_dict)",
            "epoch": args.epochs + k + 1, "val_accuracy": score(state), "test_accuracy": test_accuracy(state),
        })
        print(f"{path}: validation accuracy {100 * score(state):.2f} %, test {100 * test_accuracy(state):.2f} %")


if __name__ == "__main__":
    main()
