"""Train a CIFAR-10 classifier and save a checkpoint collection from the last part of training (paper §2a).

Recipe: `epochs` of SGD-Nesterov (or AdamW) with a linear warm-up and a linear decay to ``collect_lr_ratio·lr``,
then a collection phase at that constant rate in which a checkpoint is saved every `save_every` steps,
`n_checkpoints` in all — the paper's "save 50 checkpoints during the last epoch". Every checkpoint is scored on the
held-out validation images and on the test set. Augmentation is the backbone's (flips + 2 px shifts on uint8).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rpg.architectures import architecture_metadata, build_model, count_parameters
from rpg.backbone import augment, normalize, param_groups, resolve_amp
from rpg.utils import save_safetensors_atomic, write_csv_atomic


@dataclass(frozen=True)
class CollectRecipe:
    """How one architecture is trained and its checkpoints collected (config section `architectures.collect`)."""

    epochs: int = 4
    batch_size: int = 256
    optimizer: str = "sgd"  # sgd (Nesterov) | adamw
    lr: float = 0.05
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup: float = 0.1  # fraction of the main phase with a linear ramp-up
    collect_lr_ratio: float = 0.1  # constant LR of the collection phase, relative to lr
    n_checkpoints: int = 50
    save_every: int = 2  # optimisation steps between saved checkpoints
    translate: int = 2
    flip: bool = True
    amp: str = "none"  # none | bf16 | auto


def model_inputs(images: torch.Tensor, img_size: int, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, 32, 32) -> standardised float (B, 3, img_size, img_size) on `device` (bilinear resize if needed)."""
    x = normalize(images.to(device), channels_last=False)
    if img_size != x.shape[-1]:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x


class ImageEvaluator:
    """10-class accuracy of full models on fixed uint8 images, resized to the model's input size if needed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, img_size: int = 32,
                 device: torch.device | str = "cpu", batch_size: int = 1000, amp: str = "none"):
        self.images, self.labels = images, labels.cpu()
        self.img_size, self.device, self.batch_size = img_size, torch.device(device), batch_size
        self.use_bf16 = resolve_amp(amp, self.device)

    @torch.no_grad()
    def predict(self, model: nn.Module) -> torch.Tensor:
        """Predicted classes (N,) on CPU."""
        was_training = model.training
        model.eval()
        preds = []
        for start in range(0, len(self.images), self.batch_size):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                logits = model(model_inputs(self.images[start:start + self.batch_size], self.img_size, self.device))
            preds.append(logits.float().argmax(1).cpu())
        model.train(was_training)
        return torch.cat(preds)

    def accuracy(self, model: nn.Module) -> float:
        return float((self.predict(model) == self.labels).float().mean())

    def state_dict_scorer(self, model: nn.Module) -> Callable[[Mapping[str, torch.Tensor]], float]:
        """state dict -> accuracy, loading each into `model` (the architecture's template)."""

        def score(state_dict: Mapping[str, torch.Tensor]) -> float:
            model.load_state_dict(dict(state_dict), strict=True)
            return self.accuracy(model)

        return score


def _lr_at(step: int, main_steps: int, recipe: CollectRecipe) -> float:
    """Warm-up, linear decay to the collection rate, then constant during the collection phase."""
    floor = recipe.collect_lr_ratio
    if step >= main_steps:
        return recipe.lr * floor
    t = (step + 1) / main_steps
    if recipe.warmup > 0 and t < recipe.warmup:
        return recipe.lr * t / recipe.warmup
    decay = (1 - t) / max(1e-8, 1 - recipe.warmup)
    return recipe.lr * (floor + (1 - floor) * decay)


def _optimizer(model: nn.Module, recipe: CollectRecipe) -> torch.optim.Optimizer:
    groups = param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {recipe.optimizer!r}")


def train_collection(train_images: torch.Tensor, train_labels: torch.Tensor, *, arch: str,
                     model_kwargs: Mapping[str, Any], recipe: CollectRecipe, seed: int, out_dir: str | Path,
                     evaluators: Mapping[str, ImageEvaluator], img_size: int = 32, pretrained: bool = False,
                     pretrained_file: str | None = None, device: torch.device | str = "cpu", run: int = 0,
                     progress: bool = True) -> pd.DataFrame:
    """Train one run of `arch` and save `recipe.n_checkpoints` checkpoints from its last part.

    Files: ``out_dir/{k:02d}.safetensors`` (weights + `architecture_metadata` + run, step, accuracies) and
    ``out_dir/collection.csv`` (one row per checkpoint). Deterministic for a given seed and machine.

    Args:
        train_images, train_labels: uint8 (N, 3, 32, 32) and int64 (N,) images to train on.
        evaluators: name -> ImageEvaluator; each checkpoint gets a ``<name>_accuracy`` column (e.g. val, test).
        seed: seeds initialisation, data order and augmentation.
    Returns:
        the collection table.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(arch, model_kwargs, pretrained=pretrained, pretrained_file=pretrained_file).to(dev)
    opt = _optimizer(model, recipe)
    use_bf16 = resolve_amp(recipe.amp, dev)
    n = len(train_images)
    steps_per_epoch = max(1, n // recipe.batch_size)
    main_steps = recipe.epochs * steps_per_epoch
    collect_steps = recipe.n_checkpoints * recipe.save_every
    total = main_steps + collect_steps
    gen = torch.Generator().manual_seed(seed)
    meta_arch = architecture_metadata(arch, model_kwargs, img_size)

    rows: list[dict[str, Any]] = []
    order = torch.empty(0, dtype=torch.long)
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(total), desc=f"collect {arch} run {run}", disable=not progress, unit="step"):
        pos = (step % steps_per_epoch) * recipe.batch_size
        if pos == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[pos:pos + recipe.batch_size]
        x = model_inputs(augment(train_images[idx], recipe.translate, recipe.flip, gen), img_size, dev)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, main_steps, recipe)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), train_labels[idx].to(dev), label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done > main_steps and (done - main_steps) % recipe.save_every == 0:
            k = (done - main_steps) // recipe.save_every - 1
            scores = {f"{name}_accuracy": ev.accuracy(model) for name, ev in evaluators.items()}
            path = out_dir / f"{k:02d}.safetensors"
            state = {key: v.detach().cpu().contiguous() for key, v in model.state_dict().items()}
            save_safetensors_atomic(state, path, {**meta_arch, "run": run, "step": done, "seed": seed, **scores})
            rows.append({"file": path.name, "run": run, "index": k, "step": done, **scores})
    table = pd.DataFrame(rows)
    table["train_seconds"] = time.perf_counter() - t0
    table["n_params"] = count_parameters(model)
    write_csv_atomic(out_dir / "collection.csv", table)
    return table


def pick_checkpoints(n_per_run: int, n_checkpoints: int) -> list[int]:
    """Evenly spaced indices (ending with the last) of `n_per_run` of a run's `n_checkpoints` checkpoints."""
    if not 1 <= n_per_run <= n_checkpoints:
        raise ValueError(f"cannot take {n_per_run} of {n_checkpoints} checkpoints per run")
    step = n_checkpoints / n_per_run
    return sorted({n_checkpoints - 1 - int(i * step) for i in range(n_per_run)})


def collection_files(run_dirs: Sequence[str | Path], n_total: int, n_checkpoints: int) -> list[Path]:
    """The checkpoint files of a multi-run collection of about `n_total` checkpoints, an equal share per run."""
    picks = pick_checkpoints(max(1, n_total // len(run_dirs)), n_checkpoints)
    return [Path(d) / f"{k:02d}.safetensors" for d in run_dirs for k in picks]
