"""The paper profile (config/paper.yaml) against the reference code's facts (issue 16), and the options it needs:
the task condition on the last k tokens only, the 1024-wide condition MLP, focal loss, AutoAugment, the fine-tuning
learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, tiny_model_config

from rpg.config import ZooConfig, load_config
from rpg.experiments.task_zoo.finetune import finetune_lr
from rpg.model import RPG
from rpg.vision.preprocess import autoaugment_cifar10
from rpg.vision.training import focal_loss


@pytest.fixture(scope="module")
def paper():
    return load_config([REPO_ROOT / "config" / "config.yaml", REPO_ROOT / "config" / "paper.yaml"])


def test_paper_profile_matches_the_reference(paper):
    m = paper.model
    assert (m.token_size, m.recurrent, m.n_layers, m.d_model, m.d_state, m.expand) == (8192, "mamba", 2, 8192, 128, 2)
    assert m.denoiser_channels == (1, 32, 64, 128, 64, 32, 1) and m.kernel_size == 7
    assert (m.condition, m.condition_hidden, m.condition_tokens, m.condition_k) == ("task", 1024, "last_k", 8)
    assert not m.permutation_state
    d = paper.diffusion
    assert (d.timesteps, d.beta_start, d.beta_end, d.sampler) == (1000, 1e-4, 0.02, "ddpm")
    t = paper.train
    assert (t.lr, t.weight_decay, t.steps, t.batch_size, t.diffusion_batch) == (3e-5, 0.0, 120_000, 64, 512)
    assert (t.warmup_steps, t.min_lr_ratio, t.amp) == (0, 0.0, "cuda")  # cosine from 3e-5 to 0 over 120k steps
    z = paper.zoo
    assert (z.mode, z.batch_size, z.loss, z.focal_gamma, z.augment, z.weight_decay) == (
        "finetune", 500, "focal", 2.0, "flip_autoaugment", 0.1)
    assert (z.head_epochs, z.head_lr, z.epochs, z.lr, z.min_lr, z.final_steps, z.n_checkpoints) == (
        2, 1e-2, 13, 1e-4, 2e-5, 5, 3)
    b = paper.backbone
    assert (b.source, b.arch, b.img_size, b.feature_dim, paper.seed) == (
        "timm_pretrained", "vit_tiny_patch16_224", 224, 192, 20)


def _prototypes(condition_tokens: str, k: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    cfg = tiny_model_config(condition="task", condition_tokens=condition_tokens, condition_k=k, condition_hidden=24)
    n = 10
    model = RPG(cfg, torch.zeros(n, dtype=torch.long), torch.arange(n)).eval()
    assert model.task_encoder.mlp[0].weight.shape == (24, 10) and model.task_encoder.mlp[2].weight.shape == (32, 24)
    assert "condition_gate" not in model.state_dict()  # a fixed gate, not a weight
    cond = torch.tensor([[0, 1] * 5, [1, 0] * 5], dtype=torch.float32)
    with torch.no_grad():
        return model.prototypes(2, cond=cond)  # (2, N, D)


def test_condition_on_the_last_k_tokens_only():
    """last_k: with a causal recurrence the two tasks' prototypes agree on the first N - k tokens, differ on the
    last k; all: they differ from the first token on."""
    gated = _prototypes("last_k", k=3)
    diff = (gated[0] - gated[1]).abs().amax(1)  # (N,)
    assert diff[:7].max() == 0 and diff[7:].min() > 1e-4
    every = _prototypes("all")
    assert (every[0] - every[1]).abs().amax(1).min() > 1e-4


def test_focal_loss():
    logits, labels = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 2
    torch.testing.assert_close(focal_loss(logits, labels, 0.0), F.cross_entropy(logits, labels))
    assert focal_loss(logits, labels, 2.0) < F.cross_entropy(logits, labels)


def test_autoaugment_is_reproducible_from_the_generator():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a = autoaugment_cifar10(images, torch.Generator().manual_seed(5))
    b = autoaugment_cifar10(images, torch.Generator().manual_seed(5))
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    assert not torch.equal(a, images)


def test_finetune_lr_schedule():
    z = ZooConfig(epochs=13, lr=1e-4, min_lr=2e-5, final_steps=5)
    lr = finetune_lr(z, steps_per_epoch=10)
    assert math.isclose(lr(0), 1e-4) and math.isclose(lr(65), 6e-5) and math.isclose(lr(130), 2e-5)
    assert all(math.isclose(lr(s), 2e-5) for s in range(130, 135))
    assert finetune_lr(ZooConfig(lr=3e-4), 10)(50) == 3e-4  # min_lr null: constant, as before


def test_finetune_task_with_the_reference_recipe(tmp_path):
    """finetune_task runs the paper recipe end to end on a tiny synthetic CIFAR-10 and a small CNN: head-only epochs
    (backbone frozen), then all parameters with focal loss, flips + AutoAugment, cosine lr and final single steps;
    the 3 checkpoints are the last 3 steps, scored on clean test images."""
    from rpg.data import write_synthetic_cifar10
    from rpg.experiments.task_zoo import finetune
    from rpg.utils import load_safetensors

    write_synthetic_cifar10(tmp_path / "data", n_train=120, n_test=40)
    cfg = load_config([REPO_ROOT / "config" / "test.yaml"], overrides={
        "device": "cpu", "data": {"root": str(tmp_path / "data"), "val_images": 20},
        "backbone": {"arch": "rpg_cifar_cnn", "feature_dim": 16, "img_size": 32},
        "zoo": {"mode": "finetune", "batch_size": 25, "loss": "focal", "augment": "flip_autoaugment",
                "head_epochs": 1, "head_lr": 0.01, "epochs": 1, "lr": 1e-3, "min_lr": 1e-4, "final_steps": 2,
                "n_checkpoints": 3, "save_every": 1, "weight_decay": 0.1},
        "logging": {"progress": False, "wandb": False}})
    seen = []
    real = finetune.train_classifier

    def spy(model, *args, **kwargs):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        seen.append((kwargs["steps"], trainable, kwargs["focal_gamma"], kwargs["autoaugment"]))
        return real(model, *args, **kwargs)

    finetune.train_classifier = spy
    try:
        out = [tmp_path / f"ckpt{k}.safetensors" for k in range(3)]
        result = finetune.finetune_task(cfg, 3, out)
    finally:
        finetune.train_classifier = real
    (head_steps, head_params, gamma, autoaug), (steps, all_params, *_) = seen
    assert head_steps == 4 and steps == 4 + 2  # 100 images / 25 per step; then 1 epoch + 2 final steps
    assert head_params == {"head.0.weight", "head.0.bias", "head.2.weight"} and len(all_params) > len(head_params)
    assert gamma == 2.0 and autoaug
    assert [c["step"] for c in result["checkpoints"]] == [4, 5, 6]
    assert all(load_safetensors(p)[1]["task_id"] == 3 for p in out)
