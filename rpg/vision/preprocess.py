"""The one path from uint8 CIFAR images to a model's input, and the training augmentation.

Every experiment goes through `Preprocess`: standardise with per-channel statistics (CIFAR-10's for the project's
CNNs, the timm model's own pretrained statistics otherwise), optionally channels-last, and a bilinear resize when the
model expects another resolution. Augmentation (`augment`) works on the uint8 images, before preprocessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rpg.data import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["Preprocess", "augment", "autoaugment_cifar10", "normalize", "image_statistics", "resolve_amp", "AMP_MODES"]


def _cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16 (x86 Linux); elsewhere bf16 convs are emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


AMP_MODES = ("none", "cuda", "auto", "bf16")


def resolve_amp(amp: str, device: str | torch.device) -> bool:
    """Whether to run under bfloat16 autocast on `device`.

    ``amp``: ``"none"`` (float32), ``"cuda"`` (bf16 on CUDA only), ``"auto"`` (CUDA, or a CPU with AMX /
    AVX512-BF16), ``"bf16"`` (always).
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(map(repr, AMP_MODES))}, got {amp!r}")
    if amp in ("none", "bf16"):
        return amp == "bf16"
    dev = torch.device(device)
    return dev.type == "cuda" or (amp == "auto" and dev.type == "cpu" and _cpu_has_bf16())


def image_statistics(model: nn.Module | None, arch: str) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) a model expects: CIFAR-10's for the project's `rpg_*` CNNs and models without a timm data config,
    the timm model's own (its pretraining statistics) otherwise."""
    if model is None or arch.startswith("rpg_"):
        return CIFAR10_MEAN, CIFAR10_STD
    import timm.data

    try:
        dcfg = timm.data.resolve_data_config({}, model=model)
        return dcfg["mean"], dcfg["std"]
    except (AttributeError, KeyError):
        return CIFAR10_MEAN, CIFAR10_STD


class Preprocess:
    """uint8 images (B, 3, H, W) -> standardised float (B, 3, img_size, img_size) on `device`."""

    def __init__(self, *, img_size: int | None = None, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, device: torch.device | str = "cpu", channels_last: bool = False):
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.img_size, self.channels_last = img_size, channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.device).float() - self.mean) / self.std
        if self.img_size is not None and x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def normalize(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 images → float32 standardised with the CIFAR-10 statistics, on the images' device (no resize)."""
    return Preprocess(device=images.device, channels_last=channels_last)(images)


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


def autoaugment_cifar10(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """torchvision's AutoAugment with its CIFAR-10 policy, one policy draw per image, on a uint8 batch.

    The randomness comes from ``gen`` (one seed drawn from it seeds torch's global RNG inside a forked RNG state), so
    the data stream stays reproducible. The reference code applies it to PIL images before resizing to 224 px; here
    it acts on the 32 px CIFAR images before the resize (its geometric magnitudes are relative to the image size).

    Shapes:
        images: (B, 3, H, W) uint8 -> (B, 3, H, W) uint8
    """
    # imported only where the paper recipe asks for it
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    policy = AutoAugment(AutoAugmentPolicy.CIFAR10)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([policy(img) for img in images.cpu()]).to(images.device)
