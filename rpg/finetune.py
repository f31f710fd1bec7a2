"""Paper-profile zoo: full fine-tuning of a pretrained timm model per task (one Snakemake job per task).

As in the reference code, the classifier is ViT-Tiny (ImageNet-pretrained, 224 px) whose head is replaced by
`Linear(192,192) -> SiLU -> Linear(192,2,bias=False)`; every task starts from the same seed, hence the same initial
head, trains with the same recipe, and saves its last few steps. RPG then generates the full model.

`ModelEvaluator` scores such full-model state dicts on CIFAR-10 images; `HeadEvaluator` (in rpg.task_zoo) scores
heads on cached features. Both return the same metrics, so the rest of the experiment does not care which.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import rpg.targets  # noqa: F401  (registers rpg_* models)
from rpg.backbone import augment
from rpg.config import Config
from rpg.data import load_cifar10
from rpg.features import split_train_val
from rpg.tasks import binary_labels, id_to_embedding, positive_classes
from rpg.utils import resolve_device, save_safetensors_atomic
from rpg.zoo import binary_metrics, initial_head


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


class ImagePipeline:
    """uint8 CIFAR images -> the model's resolution and normalisation."""

    def __init__(self, model: nn.Module, img_size: int, device: torch.device):
        try:
            dcfg = timm.data.resolve_data_config({}, model=model)
            mean, std = dcfg["mean"], dcfg["std"]
        except (AttributeError, KeyError):
            mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.img_size, self.device = img_size, device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device).float() / 255.0
        if x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


@torch.no_grad()
def _predict(model: nn.Module, pipe: ImagePipeline, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    use_bf16 = pipe.device.type == "cuda"
    out = []
    for i in range(0, len(images), batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            out.append(model(pipe(images[i : i + batch_size])).argmax(-1).cpu())
    return torch.cat(out)


def finetune_task(cfg: Config, task_id: int, out_paths: Sequence[str | Path]) -> dict:
    """Fine-tune the whole model on one binary task; save its last `n_checkpoints` steps with test metrics."""
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    z = cfg.zoo
    data = load_cifar10(cfg.data.root, download=cfg.data.download)
    train_idx, _ = split_train_val(data, cfg.data.val_images, cfg.seed)
    images = data.train_images[train_idx]
    labels = binary_labels(data.train_labels[train_idx], [task_id])[0]
    model = build_task_model(cfg).to(device)
    pipe = ImagePipeline(model, cfg.backbone.img_size, device)
    opt = torch.optim.AdamW(model.parameters(), lr=z.lr, weight_decay=z.weight_decay)
    steps = z.epochs * (len(images) // z.batch_size)
    save_at = [steps - (z.n_checkpoints - 1 - j) * z.save_every for j in range(z.n_checkpoints)]
    gen = torch.Generator().manual_seed(cfg.seed)  # same data order for every task
    start, step = time.time(), 0
    bar = tqdm(total=steps, desc=f"finetune task {task_id}", disable=not cfg.logging.progress)
    test_labels = binary_labels(data.test_labels, [task_id])
    results = []
    while step < steps:
        for idx in torch.randperm(len(images), generator=gen).split(z.batch_size):
            if len(idx) < z.batch_size or step >= steps:
                continue
            model.train()
            x = pipe(augment(images[idx], translate=4, flip=True, gen=gen))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x).float(), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step in save_at:
                k = save_at.index(step)
                m = binary_metrics(_predict(model, pipe, data.test_images)[None], test_labels)
                emb = id_to_embedding(task_id)
                meta = {"arch": cfg.backbone.arch, "task_id": int(task_id), "embedding": emb,
                        "positive_classes": positive_classes(emb), "checkpoint": k, "step": step,
                        "test_accuracy": float(m["accuracy"][0]),
                        "test_balanced_accuracy": float(m["balanced_accuracy"][0])}
                save_safetensors_atomic(model.state_dict(), out_paths[k], meta)
                results.append(meta)
    bar.close()
    return {"task_id": task_id, "seconds": time.time() - start, "checkpoints": results}


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
        self.pipe = ImagePipeline(self.model, cfg.backbone.img_size, self.device)

    def predict(self, state_dicts: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        preds = []
        for sd in state_dicts:
            self.model.load_state_dict(sd)
            preds.append(_predict(self.model, self.pipe, self.images))
        return torch.stack(preds)  # (T, N)
