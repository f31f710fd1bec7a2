"""Table 13: fine-tuning curves on unseen tasks, from three initialisations, with one recipe.

Arms (all fine-tuned as full models - backbone and head - on the binary task):
- `scratch`: a randomly initialised backbone with the zoo's shared initial head;
- `finetune`: the pretrained backbone with the zoo's shared initial head (a fresh head);
- `rpg`: the pretrained backbone with the RPG-generated head for the task (default profile), or the generated full
  model (paper profile). Of the generated samples, the one with the best accuracy on the held-out *training* images
  (the val split) is used, never one chosen by test accuracy.

Test accuracy is measured at each configured epoch (epoch 0 = before any training). On CPU an "epoch" is
`table13.train_images` training images (a fresh seeded draw each epoch), not the whole training split. AdamW with a
constant learning rate, so every reported epoch is a point on one training run. The data order and augmentation
are the same for the three arms of a task (same seed), so they differ only in their initialisation.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import timm
import torch
from torch import nn

import rpg.vision.cifar_cnn  # noqa: F401  (registers rpg_* models with timm)
from rpg.vision.evaluate import predict
from rpg.vision.preprocess import Preprocess, resolve_amp
from rpg.vision.training import make_optimizer, train_classifier
from rpg.experiments.task_zoo.analysis import generated_files
from rpg.config import Config, config_to_yaml
from rpg.data import Cifar10, load_cifar10, split_train_val
from rpg.experiments.task_zoo.features import load_backbone
from rpg.experiments.task_zoo.pipeline import evaluate, make_evaluator
from rpg.experiments.task_zoo.tasks import binary_labels, embedding_to_id
from rpg.utils import load_safetensors, resolve_device, write_csv_atomic, write_text_atomic
from rpg.experiments.task_zoo.heads import HEAD_KEYS, binary_metrics, initial_head, make_head

ARMS = ("scratch", "finetune", "rpg")


class HeadOnBackbone(nn.Module):
    """`head(backbone.forward_features(x))`; optionally the features of x and its mirror image averaged, which is
    how the zoo's heads saw their (cached, flip-averaged) features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor, flip_average: bool = False) -> torch.Tensor:
        f = self.backbone.forward_features(x)  # (B, d)
        if flip_average:
            f = 0.5 * (f + self.backbone.forward_features(x.flip(3)))
        return self.head(f)  # (B, 2)


def select_generated(cfg: Config, generated_dir: str | Path, task_ids: Sequence[int],
                     features_path: str | Path | None) -> pd.DataFrame:
    """The generated sample of each task with the best accuracy on the held-out training images (val split).

    Returns one row per task: task_id, sample, path, val_accuracy.
    """
    files = generated_files(generated_dir)
    evaluator = make_evaluator(cfg, features_path, "val")
    rows = []
    for t in task_ids:
        part = files[files.task_id == t].reset_index(drop=True)
        if part.empty:
            raise FileNotFoundError(f"no generated models for task {t} in {generated_dir}")
        acc = evaluate(evaluator, [load_safetensors(p)[0] for p in part.path], [t] * len(part))["accuracy"]
        best = int(acc.argmax())
        rows.append({"task_id": t, "sample": int(part["sample"][best]), "path": part.path[best],
                     "val_accuracy": float(acc[best])})
    return pd.DataFrame(rows)


def _split_generated(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """(backbone part or None, head part) of a generated state dict: a head alone or a full model."""
    if all(k in sd for k in HEAD_KEYS):
        return None, {k: sd[k] for k in HEAD_KEYS}
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    return {k: v for k, v in sd.items() if not k.startswith("head.")}, head


class ArmFactory:
    """Builds the three arms' initial models. Default profile: the trained CNN backbone file; paper profile
    (no backbone file): the timm model of `rpg.experiments.task_zoo.finetune.build_task_model`, pretrained or not."""

    def __init__(self, cfg: Config, backbone_path: str | Path | None):
        self.cfg = cfg
        if backbone_path is not None:
            self.pretrained, meta = load_backbone(backbone_path)
            self.source = meta["source"]
        else:
            from rpg.experiments.task_zoo.finetune import build_task_model

            self.pretrained = None
            self.source = "timm_pretrained"
            self._build = build_task_model

    def __call__(self, arm: str, generated: dict[str, torch.Tensor] | None = None) -> nn.Module:
        cfg, d = self.cfg, self.cfg.backbone.feature_dim
        torch.manual_seed(cfg.seed + cfg.table13.seed_offset)
        gen_backbone, gen_head = _split_generated(generated) if generated is not None else (None, None)
        if self.pretrained is None:  # paper profile: timm backbone, head attached by build_task_model
            model = self._build(cfg, pretrained=arm != "scratch")
            if arm == "rpg":
                model.load_state_dict(generated)
            return model
        if arm == "scratch":
            backbone = timm.create_model(cfg.backbone.arch, num_classes=10, feature_dim=d) \
                if self.source == "train" else timm.create_model(cfg.backbone.arch, pretrained=False, num_classes=0)
        else:
            backbone = copy.deepcopy(self.pretrained)
            if gen_backbone is not None:
                backbone.load_state_dict(gen_backbone, strict=False)
        head = make_head(d)
        head.load_state_dict(gen_head if arm == "rpg" else initial_head(d, cfg.seed))
        return HeadOnBackbone(backbone, head)


def _pipeline(cfg: Config, model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images -> model input: CIFAR statistics for our CNNs, the timm model's own otherwise."""
    if cfg.backbone.arch.startswith("rpg_"):
        return Preprocess(device=device, channels_last=True)
    from rpg.experiments.task_zoo.finetune import task_preprocess

    return task_preprocess(cfg, model, device)


def predict_images(model: nn.Module, prep: Callable, images: torch.Tensor, flip_average: bool, device: torch.device,
                   batch_size: int = 500) -> torch.Tensor:
    """Predicted labels of uint8 images (N, 3, H, W) -> (N,); `flip_average` applies to `HeadOnBackbone` models."""
    model = model.to(device)
    wrapped = _FlipAveraged(model) if flip_average and isinstance(model, HeadOnBackbone) else model
    return predict(wrapped, images, prep, bf16=resolve_amp("auto", device), batch_size=batch_size)


class _FlipAveraged(nn.Module):
    """A `HeadOnBackbone` evaluated with flip-averaged features (how the zoo's heads saw their features)."""

    def __init__(self, model: HeadOnBackbone):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, flip_average=True)


def finetune_curve(model: nn.Module, prep: Callable, train_images: torch.Tensor, train_labels: torch.Tensor,
                   test_images: torch.Tensor, test_labels: torch.Tensor, *, epochs: Sequence[int], images_per_epoch: int,
                   batch_size: int, lr: float, weight_decay: float, seed: int, device: torch.device,
                   flip_average: bool = True, initial_pred: torch.Tensor | None = None, progress: bool = False,
                   desc: str = "") -> list[dict]:
    """Fine-tune `model` (all parameters) on binary labels; test metrics at each epoch in `epochs` (0 = untrained).

    An epoch is `images_per_epoch` images (a fresh seeded draw), in batches of `batch_size` (an incomplete last
    batch is dropped: BatchNorm on tiny batches). `initial_pred` (test predictions of the untrained model, when
    already known) saves the epoch-0 evaluation.
    Shapes: train_images (N, 3, 32, 32) uint8, train_labels (N,) in {0, 1}; test likewise.
    """
    model = model.to(device)
    opt = make_optimizer(model, "adamw", lr, weight_decay, decay_1d=True)
    steps_per_epoch = max(1, min(images_per_epoch, len(train_images)) // batch_size)
    rows = []
    clock = {"start": time.time(), "evaluating": 0.0}

    def record(epoch: int, pred: torch.Tensor | None = None) -> None:
        seconds = time.time() - clock["start"] - clock["evaluating"]
        t0 = time.time()
        if pred is None:
            pred = predict_images(model, prep, test_images, flip_average, device)
        m = binary_metrics(pred[None], test_labels[None])
        rows.append({"epoch": epoch, "accuracy": 100 * float(m["accuracy"][0]),
                     "balanced_accuracy": 100 * float(m["balanced_accuracy"][0]), "train_seconds": seconds})
        clock["evaluating"] += time.time() - t0

    def at_epoch_end(step: int, _model: nn.Module) -> None:
        if step % steps_per_epoch == 0 and step // steps_per_epoch in epochs:
            record(step // steps_per_epoch)

    if 0 in epochs:
        record(0, initial_pred)
    train_classifier(model, train_images, train_labels, steps=max(epochs) * steps_per_epoch, batch_size=batch_size,
                     optimizer=opt, lr_at=lambda step: lr, gen=torch.Generator().manual_seed(seed), prepare=prep,
                     translate=2, flip=True, images_per_epoch=images_per_epoch, bf16=resolve_amp("auto", device),
                     on_step=at_epoch_end, progress=progress, desc=desc)
    return rows


def table13(cfg: Config, data: Cifar10, generated_dir: str | Path, features_path: str | Path | None,
            backbone_path: str | Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows per task, arm and epoch plus a `mean` over tasks per arm and epoch; and the chosen generated samples."""
    t13 = cfg.table13
    device = resolve_device(cfg.device)
    task_ids = [embedding_to_id(e) for e in t13.tasks]
    chosen = select_generated(cfg, generated_dir, task_ids, features_path)
    train_idx, _ = split_train_val(data, cfg.data.val_images, cfg.seed)  # never the val (selection) images
    train_images, train_classes = data.train_images[train_idx], data.train_labels[train_idx]
    test_images, test_classes = data.test_images, data.test_labels
    if t13.test_images is not None and t13.test_images < len(test_images):
        keep = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(cfg.seed + 3))
        keep = keep[: t13.test_images].sort().values
        test_images, test_classes = test_images[keep], test_classes[keep]
    factory = ArmFactory(cfg, backbone_path)
    flip = cfg.backbone.flip_average and factory.pretrained is not None
    per_epoch = t13.train_images or len(train_images)
    # The scratch and fresh-head models before training are the same for every task: predict once.
    initial = {}
    if 0 in t13.epochs:
        for arm in ("scratch", "finetune"):
            model = factory(arm)
            initial[arm] = predict_images(model, _pipeline(cfg, model, device), test_images, flip, device)
    rows = []
    for t, emb, choice in zip(task_ids, t13.tasks, chosen.itertuples()):
        train_y = binary_labels(train_classes, [t])[0]
        test_y = binary_labels(test_classes, [t])[0]
        for arm in ARMS:
            generated = load_safetensors(choice.path)[0] if arm == "rpg" else None
            model = factory(arm, generated)
            prep = _pipeline(cfg, model, device)
            curve = finetune_curve(model, prep, train_images, train_y, test_images, test_y, epochs=t13.epochs,
                                   images_per_epoch=per_epoch, batch_size=t13.batch_size, lr=t13.lr,
                                   weight_decay=t13.weight_decay, seed=cfg.seed + t13.seed_offset + t, device=device,
                                   flip_average=flip, initial_pred=initial.get(arm), progress=cfg.logging.progress,
                                   desc=f"table13 {emb} {arm}")
            rows += [{"embedding": emb, "task_id": t, "arm": arm, **r} for r in curve]
            print(f"task {emb} arm {arm}: " + ", ".join(f"ep{r['epoch']} {r['accuracy']:.2f}" for r in curve),
                  flush=True)
    frame = pd.DataFrame(rows)
    mean = frame.groupby(["arm", "epoch"], sort=False, as_index=False)[
        ["accuracy", "balanced_accuracy", "train_seconds"]].mean()
    mean.insert(0, "embedding", "mean")
    mean.insert(1, "task_id", "")
    frame = pd.concat([frame, mean], ignore_index=True)
    frame["images_per_epoch"] = per_epoch
    frame["n_test_images"] = len(test_images)
    return frame.round(3), chosen


def write_table13(cfg: Config, generated_dir: str | Path, features_path: str | Path | None,
                  backbone_path: str | Path | None, out_csv: str | Path) -> pd.DataFrame:
    """Rule table13: `table13.csv`, the chosen generated samples (`table13.chosen.csv`) and the resolved config."""
    data = load_cifar10(cfg.data.root, download=cfg.data.download)
    start = time.time()
    frame, chosen = table13(cfg, data, generated_dir, features_path, backbone_path)
    out_csv = Path(out_csv)
    write_csv_atomic(out_csv, frame)
    write_csv_atomic(out_csv.with_suffix(".chosen.csv"), chosen)
    write_text_atomic(out_csv.with_suffix(".config.yaml"), config_to_yaml(cfg))
    print(f"table13: {time.time() - start:.1f} s", flush=True)
    return frame
