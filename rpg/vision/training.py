"""The one classifier-training loop, shared by the backbone, the checkpoint collections of the architecture study,
the paper profile's per-task fine-tuning and the fine-tuning curves (Table 13).

Data order and augmentation come from one CPU generator: at the start of every epoch a fresh permutation of the
training images (its first `images_per_epoch`), then fixed-size batches (an incomplete last batch is dropped),
each augmented with the same generator. The learning rate is set from `lr_at(step)` before every step, so warm-up,
decay or a constant collection phase are the caller's schedule. `on_step(done, model)` runs after every step
(checkpoints, evaluation); the model is put back in training mode before the next one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rpg.vision.preprocess import augment, autoaugment_cifar10


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017), mean over the batch: -(1 - p_t)^gamma log p_t. gamma = 0 is cross-entropy.

    Shapes: logits (B, C), labels (B,) -> scalar.
    """
    logp = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0]  # (B,) log p_t
    return -((1.0 - logp.exp()) ** gamma * logp).mean()


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, *, decay_1d: bool = False,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD-Nesterov or AdamW; biases and norms are not decayed unless `decay_1d`."""
    groups = model.parameters() if decay_1d else param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay
                               if decay_1d else 0.0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int,
                     optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], gen: torch.Generator,
                     prepare: Callable[[torch.Tensor], torch.Tensor], translate: int = 2, flip: bool = True,
                     images_per_epoch: int | None = None, label_smoothing: float = 0.0, bf16: bool = False,
                     on_step: Callable[[int, nn.Module], None] | None = None, progress: bool = True,
                     desc: str = "train", focal_gamma: float | None = None,
                     autoaugment: bool = False) -> torch.Tensor:
    """Train `model` for `steps` steps of cross-entropy on uint8 `images` (N, 3, H, W) and `labels` (N,).

    focal_gamma: train with the focal loss of this gamma instead of cross-entropy (label smoothing then unused).
    autoaugment: after the shifts and flips, AutoAugment with the CIFAR-10 policy (`autoaugment_cifar10`).

    Returns:
        the loss of every step, (steps,) float32 on the CPU.
    """
    device = next(model.parameters()).device
    n = len(images)
    per_epoch = min(images_per_epoch or n, n)
    steps_per_epoch = max(1, per_epoch // batch_size)
    losses = torch.zeros(steps, device=device)
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    for step in bar:
        pos = (step % steps_per_epoch) * batch_size
        if pos == 0:
            order = torch.randperm(n, generator=gen)[:per_epoch].to(images.device)
        idx = order[pos:pos + batch_size]
        model.train()
        batch = augment(images[idx], translate, flip, gen)
        x = prepare(autoaugment_cifar10(batch, gen) if autoaugment else batch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        if focal_gamma is None:
            loss = F.cross_entropy(logits.float(), labels[idx].to(device), label_smoothing=label_smoothing)
        else:
            loss = focal_loss(logits, labels[idx].to(device), focal_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step + 1, model)
    return losses.cpu()
