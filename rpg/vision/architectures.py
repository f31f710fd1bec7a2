"""One registry for the architectures whose weights RPG generates (paper Tables 1 and 9).

Any timm model name works, plus the project's small CNNs registered with timm in `rpg.vision` (``rpg_cnn_s``,
~3K parameters, and ``rpg_cnn_m``, ~11K: the "CNN (s)" / "CNN (m)" of the model-zoo literature). CIFAR-size
adaptations are plain timm keyword arguments in the config (``img_size: 32, patch_size: 4`` for a ViT,
``num_classes`` is always 10). Pretrained weights come from the timm hub or, offline, from a local file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

import rpg.vision.cifar_cnn  # noqa: F401  (registers the rpg_* models with timm)
from rpg.utils import load_state_dict_file, read_safetensors_metadata


def build_model(arch: str, model_kwargs: Mapping[str, Any] | None = None, *, num_classes: int = 10,
                pretrained: bool = False, pretrained_file: str | None = None) -> nn.Module:
    """``timm.create_model(arch, num_classes=..., **model_kwargs)``, optionally with pretrained weights.

    Raises:
        ValueError: for an unknown architecture name (with close matches).
    """
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ValueError(f"unknown architecture '{arch}' (timm has no such model; similar: {', '.join(close) or '-'})")
    kwargs = dict(model_kwargs or {})
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = dict(file=pretrained_file)
    return timm.create_model(arch, pretrained=pretrained or bool(pretrained_file), num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def architecture_metadata(arch: str, model_kwargs: Mapping[str, Any] | None, img_size: int) -> dict[str, str]:
    """What a saved checkpoint needs to be rebuilt: ``build_model(arch, json.loads(model_kwargs))``."""
    return {"arch": arch, "model_kwargs": json.dumps(dict(model_kwargs or {}), sort_keys=True),
            "img_size": str(img_size), "num_classes": "10"}


def model_from_metadata(meta: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a model saved with `architecture_metadata` (and load `state_dict` into it, strictly)."""
    if "arch" not in meta:
        raise ValueError("the checkpoint's metadata does not name its architecture ('arch')")
    kwargs = meta.get("model_kwargs") or {}
    kwargs = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)
    model = build_model(str(meta["arch"]), kwargs, num_classes=int(meta.get("num_classes", 10)))
    if state_dict is not None:
        model.load_state_dict(dict(state_dict), strict=True)
    return model


def load_model_file(path: str | Path) -> nn.Module:
    """A full-model checkpoint written by this project (weights + architecture metadata) as a ready model."""
    return model_from_metadata(read_safetensors_metadata(path), load_state_dict_file(path))
