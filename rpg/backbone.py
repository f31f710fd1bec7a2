"""Pretrain a small CIFAR-10 backbone once, freeze it, and extract its features.

The paper's binary-task zoo (§5) puts a fresh head on an ImageNet-pretrained ViT-Tiny. No model hub is
reachable on the development machines, so the default (CPU) profile trains an airbench-style CNN
(``rpg.targets.cifar_cnn``) on 10-class CIFAR-10 here, and the zoo heads are trained on its cached
``feature_dim``-wide features. Training uses flips + small translations done on uint8 tensors in torch,
SGD-Nesterov with a linear warm-up / linear decay schedule and label smoothing; on CPUs with AMX/AVX512-BF16
it runs convs in bfloat16 (``amp="auto"``), which is ~2.5× faster than float32 there.

Recommended default profile (measured with ``benchmarks/backbone_probe.py``, 2 CPU threads):
``arch="rpg_cifar_cnn", feature_dim=128, epochs=8, batch_size=512, lr=0.4, weight_decay=5e-4,
label_smoothing=0.2`` and flip-averaged features → 87.9 % 10-class accuracy, 94.4 % mean binary accuracy
on the paper's Table 11 tasks; ~36 s per epoch on a quiet 2-core AMX Xeon (bf16, channels-last).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import rpg.targets  # noqa: F401  (registers the rpg_* models with timm)
from rpg.data import CIFAR10_MEAN, CIFAR10_STD, Cifar10

__all__ = ["BACKBONE_DEFAULTS", "train_backbone", "extract_features", "evaluate_backbone", "resolve_amp", "normalize"]

# Options of ``train_backbone`` beyond its named arguments (``**extra``), with their defaults.
BACKBONE_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd",  # "sgd" (Nesterov) or "adamw"
    "momentum": 0.9,
    "warmup": 0.2,  # fraction of the steps with a linear LR ramp-up; linear decay to 0 afterwards
    "translate": 2,  # max random shift in pixels (reflect padding); 0 disables
    "flip": True,  # random horizontal flips
    "amp": "auto",  # "auto" | "bf16" | "none": bfloat16 autocast (auto: CUDA, or CPUs with AMX/AVX512-BF16)
    "channels_last": True,
    "num_threads": None,  # torch.set_num_threads for the run (None: leave as is)
    "max_train": None,  # use only the first N training images (quick experiments)
    "eval_flip": True,  # test accuracy with flip averaging of logits
    "model_kwargs": {},  # extra kwargs for timm.create_model (widths, depth, pool, ...)
}


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16 (x86 Linux); elsewhere bf16 convs are emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_amp(amp: str, device: str | torch.device) -> bool:
    """Whether to run under bfloat16 autocast. ``amp`` is ``"auto"``, ``"bf16"`` or ``"none"``."""
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {amp!r}")
    if amp != "auto":
        return amp == "bf16"
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and _cpu_has_bf16())


def normalize(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 images → float32, standardised with the CIFAR-10 channel statistics.

    Shapes:
        images: (N, 3, H, W) uint8 → (N, 3, H, W) float32
    """
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1) * 255
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment(images: torch.Tensor, translate: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random shifts (reflect-padded) and horizontal flips on a uint8 batch, randomness from ``gen``.

    Shapes:
        images: (B, C, H, W) → (B, C, H, W)
    """
    b, _, h, w = images.shape
    if translate > 0:
        r = translate
        padded = F.pad(images.float(), (r, r, r, r), mode="reflect").to(images.dtype)  # (B, C, H+2r, W+2r)
        dy, dx = torch.randint(0, 2 * r + 1, (2, b), generator=gen).to(images.device)  # (B,), (B,)
        rows = dy[:, None] + torch.arange(h, device=images.device)  # (B, H)
        cols = dx[:, None] + torch.arange(w, device=images.device)  # (B, W)
        bi = torch.arange(b, device=images.device)[:, None, None]
        # Advanced indexing moves the indexed dims first: (B, H, W, C) → (B, C, H, W)
        images = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(b, generator=gen) < 0.5).to(images.device)  # (B,)
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup·total`` steps, then linear decay to 0 (one-cycle / triangular)."""
    t = (step + 1) / total
    if warmup > 0 and t < warmup:
        return t / warmup
    return max(0.0, (1 - t) / max(1e-8, 1 - warmup))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    device: str = "cpu",
    progress: bool = True,
    **extra: Any,
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
        seed: seeds the initialisation, shuffling and augmentation.
        device: "cpu" or "cuda[:i]".
        progress: show a tqdm bar.
        **extra: options in ``BACKBONE_DEFAULTS`` (unknown keys raise ``TypeError``).

    Returns:
        The model in eval mode (on ``device``, channels-last if enabled) and metrics: ``test_accuracy``,
        ``train_seconds``, ``epoch_losses``, ``n_params``, ``amp``, ``steps``.
    """
    unknown = set(extra) - set(BACKBONE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown train_backbone options {sorted(unknown)}; known: {sorted(BACKBONE_DEFAULTS)}")
    opts = {**BACKBONE_DEFAULTS, **extra}
    if opts["num_threads"]:
        torch.set_num_threads(int(opts["num_threads"]))
    use_bf16 = resolve_amp(opts["amp"], device)
    dev = torch.device(device)

    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=len(data.classes), feature_dim=feature_dim, **opts["model_kwargs"])
    model = model.to(dev)
    if opts["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if opts["optimizer"] == "sgd":
        opt = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=opts["momentum"], nesterov=True)
    elif opts["optimizer"] == "adamw":
        opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {opts['optimizer']!r}")

    images, labels = data.train_images, data.train_labels
    if opts["max_train"]:
        images, labels = images[: opts["max_train"]], labels[: opts["max_train"]]
    images, labels = images.to(dev), labels.to(dev)  # uint8 (N, 3, 32, 32), int64 (N,)
    n = len(images)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same stream on every device

    epoch_losses: list[float] = []
    step = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"backbone {arch}", disable=not progress, unit="step")
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        running = torch.zeros((), device=dev)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size] if n >= batch_size else perm
            x = normalize(augment(images[idx], opts["translate"], opts["flip"], gen), opts["channels_last"])
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(step, total, opts["warmup"])
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(x)  # (B, 10)
            loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach()
            step += 1
            bar.update()
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        epoch_losses.append(running.item() / steps_per_epoch)
    bar.close()
    train_seconds = time.perf_counter() - t0
    model.eval()
    acc = evaluate_backbone(model, data.test_images, data.test_labels, device=device, amp=opts["amp"],
                            flip_average=opts["eval_flip"], channels_last=opts["channels_last"])
    metrics = {
        "test_accuracy": acc,
        "train_seconds": train_seconds,
        "epoch_losses": epoch_losses,
        "n_params": sum(p.numel() for p in model.parameters()),
        "amp": "bf16" if use_bf16 else "none",
        "steps": total,
    }
    return model, metrics


@torch.no_grad()
def _batched(model: nn.Module, fn: str, images: torch.Tensor, batch_size: int, device: str, amp: str,
             flip_average: bool, channels_last: bool) -> torch.Tensor:
    """Apply ``model.<fn>`` in batches, optionally averaged with the horizontally flipped images."""
    dev = torch.device(device)
    use_bf16 = resolve_amp(amp, device)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(dev), channels_last)  # (b, 3, 32, 32)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            y = getattr(model, fn)(x).float()  # (b, D)
            if flip_average:
                y = 0.5 * (y + getattr(model, fn)(x.flip(3)).float())
        out.append(y.cpu())
    model.train(was_training)
    return torch.cat(out)  # (N, D)


@torch.no_grad()
def evaluate_backbone(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: str = "cpu",
                      amp: str = "auto", flip_average: bool = True, channels_last: bool = True,
                      batch_size: int = 1000) -> float:
    """10-class accuracy of ``model`` on uint8 ``images`` (N, 3, 32, 32) with ``labels`` (N,)."""
    logits = _batched(model, "forward", images, batch_size, device, amp, flip_average, channels_last)  # (N, 10)
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 1000,
    device: str = "cpu",
    flip_average: bool = True,
    amp: str = "auto",
    channels_last: bool = True,
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

    Shapes:
        images: (N, 3, 32, 32) uint8 → (N, feature_dim) float32 on CPU
    """
    return _batched(model, "forward_features", images, batch_size, device, amp, flip_average, channels_last)
