"""Paper-profile zoo: full fine-tuning of a pretrained timm model per task (one Snakemake job per task).

As in the reference code, the classifier is ViT-Tiny (ImageNet-pretrained, 224 px) whose head is replaced by
`Linear(192,192) -> SiLU -> Linear(192,2,bias=False)`; every task starts from the same seed, hence the same initial
head, trains with the same recipe, and saves its last few steps. RPG then generates the full model.

`ModelEvaluator` scores such full-model state dicts on CIFAR-10 images; `HeadEvaluator` (in rpg.experiments.task_zoo.pipeline) scores
heads on cached features. Both return the same metrics, so the rest of the experiment does not care which.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import timm
import torch
from torch import nn

import rpg.vision.cifar_cnn  # noqa: F401  (registers rpg_* models)
from rpg.config import Config, ZooConfig
from rpg.data import load_cifar10, split_train_val
from rpg.experiments.task_zoo.tasks import binary_labels, id_to_embedding, positive_classes
from rpg.utils import resolve_device, save_safetensors_atomic
from rpg.vision.evaluate import predict
from rpg.vision.preprocess import Preprocess, image_statistics
from rpg.vision.training import make_optimizer, train_classifier
from rpg.experiments.task_zoo.heads import binary_metrics, initial_head


def build_task_model(cfg: Config, pretrained: bool = True) -> nn.Module:
    """timm backbone (pretrained where available) with the paper's binary head, identically initialised."""
    bb = cfg.backbone
    kwargs = {"num_classes": 0}
    if pretrained and bb.pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(bb.pretrained_file)}
    if bb.arch.startswith("rpg_"):
        kwargs = {"num_classes": 10, "feature_dim": bb.feature_dim}  # our CIFAR nets: pretrained = trained here
        pretrained = False
    model = timm.create_model(bb.arch, pretrained=pretrained, **kwargs)
    d = bb.feature_dim
    head = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2, bias=False))
    head.load_state_dict(initial_head(d, cfg.seed))
    if hasattr(model, "head"):
        model.head = head
    else:
        model.reset_classifier(0)
        model = nn.Sequential(model, head)
    return model


def task_preprocess(cfg: Config, model: nn.Module, device: torch.device) -> Preprocess:
    """The model's own input statistics and resolution (`rpg.vision.preprocess`, the one preprocessing path)."""
    mean, std = image_statistics(model, cfg.backbone.arch)
    return Preprocess(img_size=cfg.backbone.img_size, mean=mean, std=std, device=device)


def finetune_lr(z: ZooConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning rate of the full fine-tuning at each step: constant `lr`, or (with `min_lr`) cosine from `lr` to
    `min_lr` over `epochs`, then `min_lr` for the `final_steps`."""
    main = z.epochs * steps_per_epoch
    if z.min_lr is None:
        return lambda step: z.lr
    return lambda step: z.min_lr + (z.lr - z.min_lr) * 0.5 * (1 + math.cos(math.pi * min(step, main) / main))


def finetune_task(cfg: Config, task_id: int, out_paths: Sequence[str | Path]) -> dict:
    """Fine-tune the whole model on one binary task; save its last `n_checkpoints` steps with test metrics.

    The recipe (zoo section): optionally `head_epochs` of the head alone (backbone frozen, AdamW at `head_lr`), then
    `epochs` of all parameters (AdamW at `lr`, constant or cosine to `min_lr`), then `final_steps` single steps;
    cross-entropy or focal loss; shifts + flips or flips + AutoAugment. Test metrics are on clean test images.
    """
    device = resolve_device(cfg.device)
    z = cfg.zoo
    data = load_cifar10(cfg.data.root, download=cfg.data.download)
    train_idx, _ = split_train_val(data, cfg.data.val_images, cfg.seed)
    images = data.train_images[train_idx]
    labels = binary_labels(data.train_labels[train_idx], [task_id])[0]
    model = build_task_model(cfg).to(device)
    pipe = task_preprocess(cfg, model, device)
    steps_per_epoch = len(images) // z.batch_size
    steps = z.epochs * steps_per_epoch + z.final_steps
    save_at = [steps - (z.n_checkpoints - 1 - j) * z.save_every for j in range(z.n_checkpoints)]
    test_labels = binary_labels(data.test_labels, [task_id])
    emb = id_to_embedding(task_id)
    bf16 = device.type == "cuda"
    results = []

    def save_checkpoint(step: int, model: nn.Module) -> None:
        if step not in save_at:
            return
        k = save_at.index(step)
        m = binary_metrics(predict(model, data.test_images, pipe, bf16=bf16, batch_size=256)[None], test_labels)
        meta = {"arch": cfg.backbone.arch, "task_id": int(task_id), "embedding": emb,
                "positive_classes": positive_classes(emb), "checkpoint": k, "step": step,
                "test_accuracy": float(m["accuracy"][0]), "test_balanced_accuracy": float(m["balanced_accuracy"][0])}
        save_safetensors_atomic(model.state_dict(), out_paths[k], meta)
        results.append(meta)

    start = time.time()
    # Same seed for every task: the same data order and augmentation, so tasks differ only in their labels.
    gen = torch.Generator().manual_seed(cfg.seed)
    recipe = {"batch_size": z.batch_size, "gen": gen, "prepare": pipe, "bf16": bf16, "progress": cfg.logging.progress,
              "focal_gamma": z.focal_gamma if z.loss == "focal" else None,
              **({"translate": 0, "flip": True, "autoaugment": True} if z.augment == "flip_autoaugment"
                 else {"translate": 4, "flip": True})}
    if z.head_epochs:
        head = [p for name, p in model.named_parameters() if _is_head(name, model)]
        frozen = [p for name, p in model.named_parameters() if not _is_head(name, model)]
        for p in frozen:
            p.requires_grad_(False)
        head_opt = torch.optim.AdamW(head, lr=z.head_lr, weight_decay=z.weight_decay)
        train_classifier(model, images, labels, steps=z.head_epochs * steps_per_epoch, optimizer=head_opt,
                         lr_at=lambda step: z.head_lr, desc=f"head of task {task_id}", **recipe)
        for p in frozen:
            p.requires_grad_(True)
    opt = make_optimizer(model, "adamw", z.lr, z.weight_decay, decay_1d=True)
    train_classifier(model, images, labels, steps=steps, optimizer=opt, lr_at=finetune_lr(z, steps_per_epoch),
                     on_step=save_checkpoint, desc=f"finetune task {task_id}", **recipe)
    return {"task_id": task_id, "seconds": time.time() - start, "checkpoints": results}


def _is_head(name: str, model: nn.Module) -> bool:
    """Whether parameter `name` belongs to the binary head (timm's `head`, or the last module of our Sequential)."""
    return name.startswith("head.") if hasattr(model, "head") else name.startswith("1.")


class ModelEvaluator:
    """Scores full-model state dicts (from the finetune zoo or generated) on CIFAR-10 images of one split."""

    def __init__(self, cfg: Config, split: str = "test"):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        data = load_cifar10(cfg.data.root, download=cfg.data.download)
        if split == "test":
            self.images, self.classes = data.test_images, data.test_labels
        else:
            _, val_idx = split_train_val(data, cfg.data.val_images, cfg.seed)
            self.images, self.classes = data.train_images[val_idx], data.train_labels[val_idx]
        self.model = build_task_model(cfg, pretrained=False).to(self.device)
        self.pipe = task_preprocess(cfg, self.model, self.device)

    def predict(self, state_dicts: Sequence[dict[str, torch.Tensor]], task_ids: Sequence[int] | None = None
                ) -> torch.Tensor:
        """task_ids: unused (every task sees the same images; `DomainHeadEvaluator` needs them)."""
        preds = []
        for sd in state_dicts:
            self.model.load_state_dict(sd)
            preds.append(predict(self.model, self.images, self.pipe, bf16=self.device.type == "cuda", batch_size=256))
        return torch.stack(preds)  # (T, N)
