"""Small CIFAR-10 CNNs registered with timm (``timm.create_model("rpg_...")``).

- ``rpg_cifar_cnn*``: the CPU stand-in for the paper's ImageNet-pretrained ViT-Tiny (§3, default profile).
  An airbench-style net (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds", 2024): a 2×2 stride-1 stem,
  then conv groups ``conv3×3 → maxpool2 → BN → GELU → conv3×3 → BN → GELU``, global pooling, and a
  ``Linear`` projection to ``feature_dim`` — the frozen feature on which the binary zoo heads are trained.
- ``rpg_cnn_s`` / ``rpg_cnn_m``: ~3K / ~11K-parameter 3-layer CNNs of the model-zoo literature (p-diff,
  RPG Table 1 style small nets) to collect and generate whole models.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models import register_model
from torch import nn

__all__ = ["CifarCNN", "TinyCNN"]


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class ConvBN(nn.Sequential):
    """``conv3×3 (no bias) → BN``; the activation is applied by the caller."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))


class ConvGroup(nn.Module):
    """``conv → maxpool2 → BN → GELU`` (+ ``depth - 1`` × ``conv → BN → GELU``): halves the resolution.

    Pooling right after the first conv (before BN) is airbench's ordering: the later ops run on 4× fewer
    pixels, which is where most of the CPU time would otherwise go.
    """

    def __init__(self, c_in: int, c_out: int, depth: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.act = nn.GELU()
        self.rest = nn.ModuleList(ConvBN(c_out, c_out) for _ in range(depth - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))  # (N, C_out, H/2, W/2)
        for layer in self.rest:
            x = self.act(layer(x))
        return x


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class CifarCNN(nn.Module):
    """Feature backbone for 32×32 RGB images.

    Args:
        num_classes: classifier outputs (10 for CIFAR-10 pretraining).
        feature_dim: width ``d`` of the frozen feature returned by ``forward_features``.
        widths: output channels of the conv groups (each halves the resolution).
        depth: convs per group.
        stem_width: channels of the 2×2 stride-1 stem conv (32×32 → 31×31).
        pool: global pooling of the last group, ``"max"`` or ``"avg"``.
        feature_act: apply GELU to the projection (the feature is then ≥ -0.17, like a ViT's MLP output).
        in_chans: input channels.

    Shapes:
        forward_features: (N, 3, 32, 32) → (N, feature_dim)
        forward: (N, 3, 32, 32) → (N, num_classes)
    """

    def __init__(
        self,
        num_classes: int = 10,
        feature_dim: int = 128,
        widths: Sequence[int] = (64, 128, 256),
        depth: int = 2,
        stem_width: int = 32,
        pool: str = "max",
        feature_act: bool = True,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes, self.num_features, self.feature_dim = num_classes, feature_dim, feature_dim
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 2, bias=False), nn.BatchNorm2d(stem_width), nn.GELU())
        chans = (stem_width, *widths)
        self.stages = nn.Sequential(*(ConvGroup(chans[i], chans[i + 1], depth) for i in range(len(widths))))
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        self.pool = nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(widths[-1], feature_dim)
        self.act = nn.GELU() if feature_act else nn.Identity()
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (N, C, h, w)
        x = self.pool(x).flatten(1)  # (N, C)
        return self.act(self.proj(x))  # (N, feature_dim)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)  # (N, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class TinyCNN(nn.Module):
    """Three ``conv3×3 → ReLU → maxpool2`` layers, global average pooling and a linear classifier.

    Shapes:
        forward_features: (N, 3, 32, 32) → (N, widths[-1])
        forward: (N, 3, 32, 32) → (N, num_classes)
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (8, 12, 16), in_chans: int = 3) -> None:
        super().__init__()
        chans = (in_chans, *widths)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.num_classes, self.num_features = num_classes, widths[-1]
        self.head = nn.Linear(widths[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))  # (N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (N, num_classes)


# --------------------------------------------------------------------------------------------------
# Factory and registered variants
# --------------------------------------------------------------------------------------------------

_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _create(cls: type[nn.Module], name: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]):
    for key in _TIMM_KWARGS:  # timm's factory passes these to every entrypoint
        kwargs.pop(key, None)
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; train it with rpg.experiments.task_zoo.backbone.train_backbone")
    return cls(**{**defaults, **kwargs})


@register_model
def rpg_cifar_cnn(pretrained: bool = False, **kwargs: Any) -> CifarCNN:
    """Default CPU backbone: widths 64-128-256, depth 2 (1.2M params).

    8 epochs (batch 512, SGD-Nesterov lr 0.4, wd 5e-4, label smoothing 0.2): 87.7-87.9 % CIFAR-10 test
    accuracy, 94.4 % mean binary accuracy on the Table 11 tasks (``probes/backbone_probe.py``).
    """
    return _create(CifarCNN, "rpg_cifar_cnn", pretrained, dict(widths=(64, 128, 256), depth=2), kwargs)


@register_model
def rpg_cifar_cnn_s(pretrained: bool = False, **kwargs: Any) -> CifarCNN:
    """Small backbone: widths 32-64-128, depth 2 (0.3M params, ~2× cheaper per epoch than ``rpg_cifar_cnn``).

    10 epochs, same recipe: 86.2 % CIFAR-10, 93.6 % Table 11 binary mean.
    """
    return _create(CifarCNN, "rpg_cifar_cnn_s", pretrained, dict(widths=(32, 64, 128), depth=2, stem_width=24), kwargs)


@register_model
def rpg_cnn_s(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """~3K-parameter CNN (widths 8-12-16) for whole-model generation."""
    return _create(TinyCNN, "rpg_cnn_s", pretrained, dict(widths=(8, 12, 16)), kwargs)


@register_model
def rpg_cnn_m(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """~11K-parameter CNN (widths 16-24-32) for whole-model generation."""
    return _create(TinyCNN, "rpg_cnn_m", pretrained, dict(widths=(16, 24, 32)), kwargs)
