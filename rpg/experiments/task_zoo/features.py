"""Stage 1 of the task-zoo experiment: the frozen backbone and its cached features.

Default (CPU) profile: a small CNN trained on 10-class CIFAR-10 here, once. Paper profile: timm's ImageNet-pretrained
`vit_tiny_patch16_224` (from the hub where reachable, or a local weights file). Features of train / validation / test
images are cached in one safetensors file; the validation images are a seeded hold-out of the training set, used only
to choose RPG checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from rpg.config import Config
from rpg.data import load_cifar10, split_train_val
from rpg.utils import load_safetensors, resolve_device, save_safetensors_atomic, write_json_atomic

FEATURE_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def _timm():
    """timm with the project's models registered, imported only where a model is built: it takes ~5 s to import,
    and the rules that only read cached features (split, train_rpg, generate, tables) never pay for it."""
    import timm

    import rpg.vision.cifar_cnn  # noqa: F401  (registers the rpg_* models with timm)

    return timm


def build_backbone(cfg: Config, out_path: str | Path) -> dict:
    """Train (or fetch) the backbone and save it as safetensors with its metrics; returns the metrics."""
    bb = cfg.backbone
    device = resolve_device(cfg.device)
    if bb.source == "timm_pretrained":
        model = _pretrained_timm(bb.arch, bb.pretrained_file)
        metrics = {"source": "timm_pretrained", "arch": bb.arch}
    else:
        data = load_cifar10(cfg.data.root, download=cfg.data.download)
        train_idx, _ = split_train_val(data, cfg.data.val_images, cfg.seed)  # the RPG validation images stay unseen
        start = time.time()
        from rpg.experiments.task_zoo.backbone import train_backbone

        model, metrics = train_backbone(
            data, arch=bb.arch, feature_dim=bb.feature_dim, epochs=bb.epochs, batch_size=bb.batch_size, lr=bb.lr,
            weight_decay=bb.weight_decay, label_smoothing=bb.label_smoothing, optimizer=bb.optimizer,
            momentum=bb.momentum, warmup=bb.warmup, translate=bb.translate, flip=bb.flip, amp=bb.amp,
            stem_init=bb.stem_init, lookahead=bb.lookahead, seed=cfg.seed,
            device=str(device),
            progress=cfg.logging.progress, train_indices=train_idx, evaluate=False,
        )  # its test accuracy comes from the cached test features (`cache_features`): no second pass here
        metrics = {**metrics, "source": "train", "arch": bb.arch, "wall_seconds": time.time() - start}
    meta = {"arch": bb.arch, "feature_dim": bb.feature_dim, "source": bb.source, "metrics": metrics}
    save_safetensors_atomic(model.state_dict(), out_path, meta)
    write_json_atomic(Path(out_path).with_suffix(".json"), meta)
    return metrics


def _pretrained_timm(arch: str, pretrained_file: str | None) -> torch.nn.Module:
    if pretrained_file:
        model = _timm().create_model(arch, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(pretrained_file)})
    else:
        model = _timm().create_model(arch, pretrained=True, num_classes=0)
    return model.eval()


def load_backbone(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The frozen backbone (eval mode) and its metadata (arch, source, feature_dim, metrics)."""
    tensors, meta = load_safetensors(path)
    if meta["source"] == "timm_pretrained":
        model = _timm().create_model(meta["arch"], pretrained=False, num_classes=0)
    else:
        model = _timm().create_model(meta["arch"], num_classes=10, feature_dim=meta["feature_dim"])
    model.load_state_dict(tensors)
    return model.eval(), meta


@torch.no_grad()
def _timm_features(model: torch.nn.Module, images: torch.Tensor, img_size: int, device: torch.device,
                   batch_size: int = 256) -> torch.Tensor:
    """Pooled pre-logit features of a timm model at its own resolution and normalisation."""
    dcfg = _timm().data.resolve_data_config({}, model=model)
    mean = torch.tensor(dcfg["mean"], device=device)[None, :, None, None]
    std = torch.tensor(dcfg["std"], device=device)[None, :, None, None]
    model = model.to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float() / 255.0
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        out.append(model((x - mean) / std).float().cpu())  # num_classes=0: pooled features
    return torch.cat(out)


def backbone_feature_fn(cfg: Config, backbone_path: str | Path, device: torch.device
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images (N, 3, 32, 32) -> (N, d) features of the frozen backbone, as the cached features are made."""
    model, meta = load_backbone(backbone_path)

    def feats(images: torch.Tensor) -> torch.Tensor:
        if meta["source"] == "timm_pretrained":
            return _timm_features(model, images, cfg.backbone.img_size, device)
        from rpg.experiments.task_zoo.backbone import extract_features

        return extract_features(model, images, device=str(device), flip_average=cfg.backbone.flip_average,
                                compile=cfg.backbone.compile_features)

    return feats


def cache_features(cfg: Config, backbone_path: str | Path, out_path: str | Path) -> dict:
    """Extract features of the train / val / test images with the frozen backbone and save them."""
    device = resolve_device(cfg.device)
    data = load_cifar10(cfg.data.root, download=cfg.data.download)
    feats = backbone_feature_fn(cfg, backbone_path, device)
    start = time.time()
    train_idx, val_idx = split_train_val(data, cfg.data.val_images, cfg.seed)
    tensors = {
        "train_x": feats(data.train_images[train_idx]), "train_y": data.train_labels[train_idx],
        "val_x": feats(data.train_images[val_idx]), "val_y": data.train_labels[val_idx],
        "test_x": feats(data.test_images), "test_y": data.test_labels,
    }
    info = {"feature_dim": int(tensors["train_x"].shape[1]), "n_train": len(train_idx), "n_val": len(val_idx),
            "n_test": len(data.test_labels), "seconds": time.time() - start, "backbone": str(backbone_path)}
    if cfg.backbone.source == "train":  # a classifier head of its own: its 10-class accuracy, from the features
        from rpg.experiments.task_zoo.backbone import accuracy_from_features

        model, _ = load_backbone(backbone_path)
        info["backbone_test_accuracy"] = accuracy_from_features(model, tensors["test_x"], tensors["test_y"])
    save_safetensors_atomic(tensors, out_path, info)
    write_json_atomic(Path(out_path).with_suffix(".json"), info)
    return info


def load_features(path: str | Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_safetensors(path)
    missing = [k for k in FEATURE_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks feature arrays {missing}")
    return tensors
