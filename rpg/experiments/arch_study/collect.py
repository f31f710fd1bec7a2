"""Train a CIFAR-10 classifier and save a checkpoint collection from the last part of training (paper §2a).

Recipe: `epochs` of SGD-Nesterov (or AdamW) with a linear warm-up and a linear decay to ``collect_lr_ratio·lr``,
then a collection phase at that constant rate in which a checkpoint is saved every `save_every` steps,
`n_checkpoints` in all — the paper's "save 50 checkpoints during the last epoch". With `init_state` (e.g. the
default profile's trained backbone, `recipe.init_from: backbone`) and `epochs: 0` there is no main phase: training
continues from those weights at the constant rate `collect_lr_ratio·lr`, the paper's own recipe. Every
`score_every`-th checkpoint (counted back from the last, which is always scored) is scored by the evaluators, and
its predicted classes are saved beside it (``{k:02d}.predictions.safetensors``).
Augmentation is the backbone's (flips + 2 px shifts on uint8).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from rpg.config import CollectConfig
from rpg.vision.architectures import architecture_metadata, build_model, count_parameters
from rpg.vision.evaluate import ImageEvaluator
from rpg.vision.preprocess import Preprocess, resolve_amp
from rpg.vision.training import make_optimizer, train_classifier
from rpg.utils import save_safetensors_atomic, write_csv_atomic


def _lr_at(step: int, main_steps: int, recipe: CollectConfig) -> float:
    """Warm-up, linear decay to the collection rate, then constant during the collection phase."""
    floor = recipe.collect_lr_ratio
    if step >= main_steps:
        return recipe.lr * floor
    t = (step + 1) / main_steps
    if recipe.warmup > 0 and t < recipe.warmup:
        return recipe.lr * t / recipe.warmup
    decay = (1 - t) / max(1e-8, 1 - recipe.warmup)
    return recipe.lr * (floor + (1 - floor) * decay)


def train_collection(train_images: torch.Tensor, train_labels: torch.Tensor, *, arch: str,
                     model_kwargs: Mapping[str, Any], recipe: CollectConfig, seed: int, out_dir: str | Path,
                     evaluators: Mapping[str, ImageEvaluator], img_size: int = 32, pretrained: bool = False,
                     pretrained_file: str | None = None, device: torch.device | str = "cpu", run: int = 0,
                     progress: bool = True, init_state: Mapping[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """Train one run of `arch` and save `recipe.n_checkpoints` checkpoints from its last part.

    Files: ``out_dir/{k:02d}.safetensors`` (weights + `architecture_metadata` + run, step, accuracies) and
    ``out_dir/collection.csv`` (one row per checkpoint). Deterministic for a given seed and machine.

    Args:
        train_images, train_labels: uint8 (N, 3, 32, 32) and int64 (N,) images to train on.
        evaluators: name -> ImageEvaluator; each checkpoint gets a ``<name>_accuracy`` column (e.g. val, test).
        seed: seeds initialisation, data order and augmentation.
        init_state: weights to start from (loaded strictly, over any pretrained weights).
    Returns:
        the collection table.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(arch, model_kwargs, pretrained=pretrained, pretrained_file=pretrained_file)
    if init_state is not None:
        model.load_state_dict(dict(init_state), strict=True)
    model = model.to(dev)
    opt = make_optimizer(model, recipe.optimizer, recipe.lr, recipe.weight_decay)
    steps_per_epoch = max(1, len(train_images) // recipe.batch_size)
    main_steps = recipe.epochs * steps_per_epoch
    total = main_steps + recipe.n_checkpoints * recipe.save_every
    meta_arch = architecture_metadata(arch, model_kwargs, img_size)
    rows: list[dict[str, Any]] = []

    def save_checkpoint(done: int, model: nn.Module) -> None:
        """In the collection phase, every `save_every` steps: score the model and save it."""
        if done <= main_steps or (done - main_steps) % recipe.save_every:
            return
        k = (done - main_steps) // recipe.save_every - 1
        scored = is_scored(k, recipe.n_checkpoints, recipe.score_every)
        scores, preds = {}, {}
        for name, ev in evaluators.items() if scored else ():
            preds[name] = ev.predict(model)  # kept beside the checkpoint: generation reuses them (mistake overlap)
            scores[f"{name}_accuracy"] = float((preds[name] == ev.labels).float().mean())
        path = out_dir / checkpoint_name(k)
        if preds:
            save_safetensors_atomic({n: p.to(torch.int16) for n, p in preds.items()}, out_dir / predictions_name(k), {"step": str(done)})
        state = {key: v.detach().cpu().contiguous() for key, v in model.state_dict().items()}
        save_safetensors_atomic(state, path, {**meta_arch, "run": run, "step": done, "seed": seed, **scores})
        rows.append({"file": path.name, "run": run, "index": k, "step": done, "scored": scored, **scores})

    t0 = time.perf_counter()
    prepare = Preprocess(img_size=img_size, device=dev, channels_last=True)  # oneDNN's faster layout on CPU
    train_classifier(model, train_images, train_labels, steps=total, batch_size=recipe.batch_size, optimizer=opt,
                     lr_at=lambda step: _lr_at(step, main_steps, recipe), gen=torch.Generator().manual_seed(seed),
                     prepare=prepare, translate=recipe.translate, flip=recipe.flip,
                     label_smoothing=recipe.label_smoothing, bf16=resolve_amp(recipe.amp, dev),
                     on_step=save_checkpoint, progress=progress, desc=f"collect {arch} run {run}")
    table = pd.DataFrame(rows)
    table["train_seconds"] = time.perf_counter() - t0
    table["n_params"] = count_parameters(model)
    write_csv_atomic(out_dir / "collection.csv", table)
    return table


def is_scored(index: int, n_checkpoints: int, score_every: int) -> bool:
    """Whether checkpoint `index` of `n_checkpoints` is scored: every `score_every`-th, counted back from the last."""
    return (n_checkpoints - 1 - index) % score_every == 0


def predictions_name(index: int) -> str:
    """File of a scored checkpoint's predicted classes, one int16 tensor per evaluator (e.g. "test")."""
    return f"{index:02d}.predictions.safetensors"


def checkpoint_name(index: int) -> str:
    """File name of a run's `index`-th collected checkpoint."""
    return f"{index:02d}.safetensors"


def pick_checkpoints(n_per_run: int, n_checkpoints: int) -> list[int]:
    """Evenly spaced indices (ending with the last) of `n_per_run` of a run's `n_checkpoints` checkpoints."""
    if not 1 <= n_per_run <= n_checkpoints:
        raise ValueError(f"cannot take {n_per_run} of {n_checkpoints} checkpoints per run")
    step = n_checkpoints / n_per_run
    return sorted({n_checkpoints - 1 - int(i * step) for i in range(n_per_run)})


def collection_files(run_dirs: Sequence[str | Path], n_total: int, n_checkpoints: int) -> list[Path]:
    """The checkpoint files of a multi-run collection of about `n_total` checkpoints, an equal share per run."""
    picks = pick_checkpoints(max(1, n_total // len(run_dirs)), n_checkpoints)
    return [Path(d) / checkpoint_name(k) for d in run_dirs for k in picks]
