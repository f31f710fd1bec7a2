"""The one way to run an image model over a fixed set of images: batched, bf16 where asked, optionally averaged
with the mirrored images; `ImageEvaluator` scores classifiers (or their state dicts) on one image set."""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import nn

from rpg.vision.preprocess import Preprocess


@torch.no_grad()
def batched_outputs(model: nn.Module, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor], *,
                    fn: str = "forward", flip_average: bool = False, bf16: bool = False,
                    batch_size: int = 1000, compile: bool = False) -> torch.Tensor:
    """``model.<fn>`` of uint8 ``images`` (N, 3, H, W) in batches -> (N, D) float32 on the CPU.

    With ``flip_average`` the output of each image is averaged with that of its mirror image (test-time
    augmentation). The model is put in eval mode and given back in the mode it was in. ``compile``: run
    ``torch.compile`` with inductor's freezing (the weights are constants: BatchNorm folds into the convs,
    elementwise ops fuse); worth its compilation (seconds) only for many images (`benchmarks/bench_backbone.py`).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    run = torch.compile(getattr(model, fn)) if compile else getattr(model, fn)
    out = []
    with torch._inductor.config.patch(freezing=True) if compile else contextlib.nullcontext():
        for start in range(0, len(images), batch_size):
            x = prepare(images[start:start + batch_size])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                y = run(x).float()
                if flip_average:
                    y = 0.5 * (y + run(x.flip(3)).float())
            out.append(y.cpu())
    model.train(was_training)
    return torch.cat(out)


def predict(model: nn.Module, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
            **kwargs) -> torch.Tensor:
    """Predicted classes (N,) on the CPU; keyword arguments as in `batched_outputs`."""
    return batched_outputs(model, images, prepare, **kwargs).argmax(1)


class ImageEvaluator:
    """Accuracy of classifiers on fixed uint8 images with their labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, prepare: Callable[[torch.Tensor], torch.Tensor]
                 | None = None, img_size: int = 32, device: torch.device | str = "cpu", batch_size: int = 1000,
                 bf16: bool = False, flip_average: bool = False, channels_last: bool = True):
        self.images, self.labels = images, labels.cpu()
        # channels-last inputs: 1.6-1.7x faster forward passes of the BatchNorm CNNs on the 2-core CPUs (oneDNN)
        self.prepare = prepare or Preprocess(img_size=img_size, device=device, channels_last=channels_last)
        self.batch_size, self.bf16, self.flip_average = batch_size, bf16, flip_average

    def predict(self, model: nn.Module) -> torch.Tensor:
        """Predicted classes (N,) on the CPU."""
        return predict(model, self.images, self.prepare, bf16=self.bf16, flip_average=self.flip_average,
                       batch_size=self.batch_size)

    def accuracy(self, model: nn.Module) -> float:
        return float((self.predict(model) == self.labels).float().mean())

    def state_dict_scorer(self, model: nn.Module) -> Callable[[Mapping[str, torch.Tensor]], float]:
        """state dict -> accuracy, loading each into `model` (the architecture's template)."""

        def score(state_dict: Mapping[str, torch.Tensor]) -> float:
            model.load_state_dict(dict(state_dict), strict=True)
            return self.accuracy(model)

        return score

    def state_dict_predictor(self, model: nn.Module) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
        """state dict -> predicted classes (N,), loading each into `model`; for accuracy *and* mistake overlap."""

        def predict_classes(state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
            model.load_state_dict(dict(state_dict), strict=True)
            return self.predict(model)

        return predict_classes


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_batchnorm_statistics(model: nn.Module, images: torch.Tensor,
                                   prepare: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 500) -> None:
    """Replace every BatchNorm layer's running mean / variance by their plain average over uint8 `images`
    (N, 3, H, W), un-augmented, in training mode without gradients; the weights are not touched.

    The alternative to generating the statistics: they are a function of the weights and the data, so a generated
    network can have them measured instead (the "BN recalibration" of weight-generation papers).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for start in range(0, len(images), batch_size):
        model(prepare(images[start:start + batch_size]))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
