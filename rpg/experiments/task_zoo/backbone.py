"""Pretrain a small CIFAR-10 backbone once, freeze it, and extract its features.

The paper's binary-task zoo (§5) puts a fresh head on an ImageNet-pretrained ViT-Tiny. No model hub is
reachable on the development machines, so the default (CPU) profile trains an airbench-style CNN
(``rpg.vision.cifar_cnn``) on 10-class CIFAR-10 here, and the zoo heads are trained on its cached
``feature_dim``-wide features. Training uses flips + small translations done on uint8 tensors in torch,
SGD-Nesterov with a linear warm-up / linear decay schedule and label smoothing; on CPUs with AMX/AVX512-BF16
it runs convs in bfloat16 (``amp="auto"``), which is ~2.5× faster than float32 there.

The recipe's settings and their defaults are the schema's ``backbone`` section (``rpg/config.schema.yaml``);
``probes/backbone_probe.py`` measures accuracy and time per epoch for other settings.
"""

from __future__ import annotations

import time
from typing import Any

import timm
import torch
from torch import nn

import rpg.vision.cifar_cnn  # noqa: F401  (registers the rpg_* models with timm)
from rpg.config import BackboneConfig
from rpg.data import Cifar10
from rpg.vision.evaluate import batched_outputs
from rpg.vision.preprocess import Preprocess, resolve_amp
from rpg.vision.training import make_optimizer, train_classifier

__all__ = ["train_backbone", "extract_features", "evaluate_backbone", "accuracy_from_features", "whiten_stem_"]


WHITEN_IMAGES = 5000  # training images whose patch covariance initialises a whitened stem (airbench uses 5,000)


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup·total`` steps, then linear decay to 0 (one-cycle / triangular)."""
    t = (step + 1) / total
    if warmup > 0 and t < warmup:
        return t / warmup
    return max(0.0, (1 - t) / max(1e-8, 1 - warmup))


@torch.no_grad()
def whiten_stem_(conv: nn.Conv2d, x: torch.Tensor, eps: float = 5e-4) -> None:
    """Initialise a patch conv as a whitening filter bank of its input patches (airbench's stem, Jordan 2024).

    The k×k×C patches of ``x`` have a covariance with eigenvectors v_i and eigenvalues λ_i; output channels 2i and
    2i + 1 get v_i / sqrt(λ_i + eps) and its negative (largest λ first), so the stem's outputs start decorrelated
    and of unit variance: the first epochs need not learn the input statistics. Channels beyond 2·k·k·C keep their
    random initialisation; a conv with fewer channels gets the leading eigenvectors only.

    Shapes:
        conv.weight: (C_out, C, k, k); x: (N, C, H, W) float, as the model sees it (standardised)
    """
    c_out, c, kh, kw = conv.weight.shape
    patches = x.float().unfold(2, kh, 1).unfold(3, kw, 1)  # (N, C, H-kh+1, W-kw+1, kh, kw)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)  # (P, C·kh·kw) in the weight's order
    cov = patches.T.double() @ patches.double() / len(patches)  # (D, D)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    filters = (eigvecs.T.flip(0) / (eigvals.flip(0)[:, None] + eps).sqrt()).float()  # (D, D), largest first
    bank = torch.stack([filters, -filters], 1).reshape(-1, c, kh, kw)  # (2D, C, kh, kw): v_1, -v_1, v_2, ...
    n = min(c_out, len(bank))
    conv.weight[:n] = bank[:n].to(conv.weight.dtype)


class Lookahead:
    """airbench's lookahead (Jordan 2024), an `on_step` of `train_classifier`: every `every` steps the weights (and
    BatchNorm statistics) move to an EMA of themselves whose decay grows as (step / total)³ up to `base`^`every`;
    after the last step the model keeps the EMA. Early steps are left almost alone, late ones are averaged."""

    def __init__(self, model: nn.Module, total: int, every: int = 5, base: float = 0.95) -> None:
        self.total, self.every, self.base = total, every, base
        self.ema = [t.detach().clone() for t in self._tensors(model)]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [t for t in model.state_dict().values() if t.dtype.is_floating_point]

    @torch.no_grad()
    def __call__(self, done: int, model: nn.Module) -> None:
        if done % self.every and done != self.total:
            return
        decay = 1.0 if done == self.total else self.base ** self.every * (done / self.total) ** 3
        for ema, t in zip(self.ema, self._tensors(model)):
            ema.lerp_(t, 1 - decay)
            t.copy_(ema)


# --------------------------------------------------------------------------------------------------
# Training, evaluation, features
# --------------------------------------------------------------------------------------------------


def train_backbone(
    data: Cifar10,
    *,
    arch: str,
    feature_dim: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    seed: int,
    optimizer: str = BackboneConfig.optimizer,
    momentum: float = BackboneConfig.momentum,
    warmup: float = BackboneConfig.warmup,
    translate: int = BackboneConfig.translate,
    flip: bool = BackboneConfig.flip,
    amp: str = BackboneConfig.amp,
    stem_init: str = BackboneConfig.stem_init,
    lookahead: bool = BackboneConfig.lookahead,
    device: str = "cpu",
    progress: bool = True,
    train_indices: torch.Tensor | None = None,
    max_train: int | None = None,
    evaluate: bool = True,
    eval_flip: bool = True,
    channels_last: bool = True,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``timm.create_model(arch)`` on 10-class CIFAR-10; deterministic for a given seed and machine.

    Args:
        data: CIFAR-10 (uint8 images).
        arch: a registered model name, e.g. ``"rpg_cifar_cnn"``.
        feature_dim: width of ``model.forward_features``.
        epochs: passes over the training set (the last batch of an epoch is dropped if incomplete).
        batch_size: images per step.
        lr: peak learning rate of the warm-up / linear-decay schedule.
        weight_decay: on weights only (not biases / norms).
        label_smoothing: of the cross-entropy.
        optimizer, momentum, warmup, translate, flip, amp: the recipe (config keys backbone.*, documented in the
            schema, whose defaults they take): "sgd" (Nesterov) or "adamw"; SGD momentum; fraction of the steps with a linear ramp-up (then
            linear decay to 0); largest random shift in pixels (0 = off); random horizontal flips; bfloat16 autocast
            ("auto" | "bf16" | "none").
        stem_init: "random" (the model's own) or "whiten": the first conv starts as a whitening filter bank of the
            first `WHITEN_IMAGES` training images' patches (`whiten_stem_`).
        lookahead: pull the weights to their EMA every 5 steps and keep the EMA at the end (`Lookahead`).
        seed: seeds the initialisation, shuffling and augmentation.
        device: "cpu" or "cuda[:i]".
        progress: show a tqdm bar.
        train_indices: the training images to use (default: all 50,000); the experiment passes the training split
            without the images that validate RPG.
        max_train: use only the first N training images (quick experiments).
        evaluate: score the test set after training (the workflow's features rule gets the same number from the
            cached test features instead: `accuracy_from_features`, ~45 s fewer on a 2-core CPU).
        eval_flip: test accuracy with flip averaging of logits.
        channels_last: the model and inputs in channels-last memory format (oneDNN's faster layout on CPU).
        model_kwargs: extra kwargs for timm.create_model (widths, depth, pool, ...).

    Returns:
        The model in eval mode (on ``device``, channels-last if enabled) and metrics: ``test_accuracy`` (unless
        ``evaluate=False``), ``train_seconds``, ``epoch_losses``, ``n_params``, ``amp``, ``steps``.
    """
    use_bf16 = resolve_amp(amp, device)
    dev = torch.device(device)

    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=len(data.classes), feature_dim=feature_dim, **(model_kwargs or {}))
    images, labels = data.train_images, data.train_labels
    if train_indices is not None:
        images, labels = images[train_indices], labels[train_indices]
    if max_train:
        images, labels = images[:max_train], labels[:max_train]
    images, labels = images.to(dev), labels.to(dev)  # uint8 (N, 3, 32, 32), int64 (N,)

    model = model.to(dev)
    if stem_init == "whiten":
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        whiten_stem_(stem, Preprocess(device=dev)(images[:WHITEN_IMAGES]))
    elif stem_init != "random":
        raise ValueError(f"stem_init must be 'random' or 'whiten', got {stem_init!r}")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, optimizer, lr, weight_decay, momentum=momentum)
    steps_per_epoch = max(1, len(images) // batch_size)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same stream on every device

    t0 = time.perf_counter()
    losses = train_classifier(
        model, images, labels, steps=total, batch_size=batch_size, optimizer=opt,
        lr_at=lambda step: lr * _lr_factor(step, total, warmup), gen=gen,
        prepare=Preprocess(device=dev, channels_last=channels_last), translate=translate,
        flip=flip, label_smoothing=label_smoothing, bf16=use_bf16, progress=progress, desc=f"backbone {arch}",
        on_step=Lookahead(model, total) if lookahead else None)
    epoch_losses = [float(x) for x in losses.view(epochs, steps_per_epoch).mean(1)] if total else []
    train_seconds = time.perf_counter() - t0
    model.eval()
    metrics: dict[str, Any] = {}
    if evaluate:
        metrics["test_accuracy"] = evaluate_backbone(
            model, data.test_images, data.test_labels, device=device, amp=amp,
            flip_average=eval_flip, channels_last=channels_last)
    metrics |= {
        "train_seconds": train_seconds,
        "epoch_losses": epoch_losses,
        "n_params": sum(p.numel() for p in model.parameters()),
        "amp": "bf16" if use_bf16 else "none",
        "steps": total,
    }
    return model, metrics


def _batched(model: nn.Module, fn: str, images: torch.Tensor, batch_size: int, device: str, amp: str,
             flip_average: bool, channels_last: bool, compile: bool = False) -> torch.Tensor:
    """Apply ``model.<fn>`` in batches, optionally averaged with the horizontally flipped images."""
    prepare = Preprocess(device=device, channels_last=channels_last)
    return batched_outputs(model, images, prepare, fn=fn, flip_average=flip_average, bf16=resolve_amp(amp, device),
                           batch_size=batch_size, compile=compile)


@torch.no_grad()
def evaluate_backbone(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: str = "cpu",
                      amp: str = BackboneConfig.amp, flip_average: bool = BackboneConfig.flip_average,
                      channels_last: bool = True,
                      batch_size: int = 1000) -> float:
    """10-class accuracy of ``model`` on uint8 ``images`` (N, 3, 32, 32) with ``labels`` (N,)."""
    logits = _batched(model, "forward", images, batch_size, device, amp, flip_average, channels_last)  # (N, 10)
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


@torch.no_grad()
def accuracy_from_features(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """10-class accuracy of ``model.forward_head`` on features from ``extract_features``.

    The head is linear, so on flip-averaged features it equals ``evaluate_backbone`` with flip-averaged logits (up
    to rounding) without a second pass over the test images. Shapes: features (N, feature_dim), labels (N,).
    """
    logits = model.forward_head(features.to(next(model.parameters()).device))
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 1000,
    device: str = "cpu",
    flip_average: bool = BackboneConfig.flip_average,
    amp: str = BackboneConfig.amp,
    channels_last: bool = True,
    compile: bool = BackboneConfig.compile_features,
) -> torch.Tensor:
    """Frozen features of uint8 images, for training the zoo heads.

    Args:
        model: a backbone with ``forward_features``.
        images: uint8 CIFAR images.
        batch_size: images per forward pass.
        device: where the model runs.
        flip_average: average the features of each image and its mirror (test-time augmentation; the
            heads then see the same kind of feature at train and test time).
        amp: "auto" | "bf16" | "none", as in ``train_backbone``.
        channels_last: memory format of the inputs (match the model).
        compile: torch.compile with inductor's freezing (config backbone.compile_features; outputs equal eager's
            up to rounding, the same in every run).

    Shapes:
        images: (N, 3, 32, 32) uint8 → (N, feature_dim) float32 on CPU
    """
    return _batched(model, "forward_features", images, batch_size, device, amp, flip_average, channels_last, compile)
