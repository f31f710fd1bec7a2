"""Registered target nets and the CPU backbone: build/forward, training determinism, feature shapes."""

from __future__ import annotations

import pytest
import timm
import torch

import rpg.vision.cifar_cnn  # noqa: F401  (registration)
from rpg.experiments.task_zoo.backbone import (evaluate_backbone, extract_features, accuracy_from_features,
                                               train_backbone, whiten_stem_, Lookahead)
from rpg.vision.preprocess import augment
from rpg.data import Cifar10, load_cifar10, write_synthetic_cifar10

RPG_MODELS = timm.list_models("rpg_*")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Cifar10:
    root = tmp_path_factory.mktemp("cifar")
    write_synthetic_cifar10(root, n_train=256, n_test=64, seed=0)
    return load_cifar10(root)


def test_expected_models_registered() -> None:
    assert {"rpg_cifar_cnn", "rpg_cifar_cnn_s", "rpg_cnn_s", "rpg_cnn_m"} <= set(RPG_MODELS)


@pytest.mark.parametrize("name", RPG_MODELS)
def test_model_builds_and_forwards(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert model.forward_features(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", [n for n in RPG_MODELS if n.startswith("rpg_cifar_cnn")])
def test_backbone_feature_dim(name: str) -> None:
    model = timm.create_model(name, num_classes=10, feature_dim=48).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(3, 3, 32, 32)).shape == (3, 48)


@pytest.mark.parametrize("name, lo, hi", [("rpg_cnn_s", 2_500, 3_500), ("rpg_cnn_m", 10_000, 12_000)])
def test_tiny_cnn_sizes(name: str, lo: int, hi: int) -> None:
    n = sum(p.numel() for p in timm.create_model(name).parameters())
    assert lo <= n <= hi


def test_no_pretrained_weights() -> None:
    with pytest.raises(ValueError, match="no pretrained"):
        timm.create_model("rpg_cifar_cnn", pretrained=True)


def test_augment_shapes_and_identity() -> None:
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = augment(images, translate=2, flip=True, gen=gen)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(augment(images, translate=0, flip=False, gen=gen), images)


def _train(data: Cifar10, seed: int) -> tuple[torch.nn.Module, dict]:
    return train_backbone(
        data, arch="rpg_cifar_cnn_s", feature_dim=32, epochs=1, batch_size=64, lr=0.1, weight_decay=5e-4,
        label_smoothing=0.1, seed=seed, progress=False,
    )


def test_train_backbone_deterministic(tiny_data: Cifar10) -> None:
    model_a, metrics = _train(tiny_data, seed=0)
    model_b, _ = _train(tiny_data, seed=0)
    assert not model_a.training
    assert {"test_accuracy", "train_seconds", "epoch_losses", "n_params", "amp", "steps"} <= set(metrics)
    assert metrics["steps"] == 4 and len(metrics["epoch_losses"]) == 1
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    feats_a = extract_features(model_a, tiny_data.test_images, batch_size=32, compile=False)
    feats_b = extract_features(model_b, tiny_data.test_images, batch_size=32, compile=False)
    assert feats_a.shape == (64, 32) and feats_a.dtype == torch.float32
    assert torch.isfinite(feats_a).all()
    assert torch.equal(feats_a, feats_b)
    plain = extract_features(model_a, tiny_data.test_images, flip_average=False, compile=False)
    assert plain.shape == (64, 32) and not torch.equal(plain, feats_a)


def test_accuracy_from_features_equals_a_second_pass(tiny_data: Cifar10) -> None:
    """The workflow skips the backbone's own test pass: the head on flip-averaged features gives the same accuracy."""
    model, metrics = train_backbone(
        tiny_data, arch="rpg_cifar_cnn_s", feature_dim=32, epochs=1, batch_size=64, lr=0.1, weight_decay=5e-4,
        label_smoothing=0.1, seed=0, progress=False, evaluate=False)
    assert "test_accuracy" not in metrics
    feats = extract_features(model, tiny_data.test_images, batch_size=32, compile=False)
    from_features = accuracy_from_features(model, feats, tiny_data.test_labels)
    assert from_features == pytest.approx(evaluate_backbone(model, tiny_data.test_images, tiny_data.test_labels))
    own = model.forward_head(feats).argmax(1)  # labels the head agrees with: the number follows the labels
    assert accuracy_from_features(model, feats, own) == 1.0 and from_features < 1.0


def test_compiled_features_equal_eager_and_repeat(tiny_data: Cifar10) -> None:
    """backbone.compile_features: inductor with freezing gives eager's features up to rounding, the same every run."""
    model, _ = _train(tiny_data, seed=0)
    eager = extract_features(model, tiny_data.test_images, batch_size=32, amp="none", compile=False)
    compiled = extract_features(model, tiny_data.test_images, batch_size=32, amp="none", compile=True)
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-4) and not model.training
    first = extract_features(model, tiny_data.test_images, batch_size=32, compile=True)  # bf16 where the CPU has it
    assert torch.equal(first, extract_features(model, tiny_data.test_images, batch_size=32, compile=True))


def test_whiten_stem_decorrelates_patches() -> None:
    """The whitened stem's outputs (one of each ± pair) have unit variance and no correlation on its own input,
    up to the eps damping of the smallest eigenvalues; channels beyond the bank keep their initialisation."""
    x = torch.randn(64, 3, 12, 12) @ torch.randn(12, 12) * 0.3 + torch.randn(64, 3, 1, 1)  # correlated patches
    conv = torch.nn.Conv2d(3, 32, 2, bias=False)
    spare = conv.weight[24:].detach().clone()
    whiten_stem_(conv, x, eps=1e-8)
    with torch.no_grad():
        y = conv(x)[:, 0:24:2].permute(0, 2, 3, 1).reshape(-1, 12)  # (P, 12): v_1 ... v_12
    assert torch.allclose(y.T @ y / len(y), torch.eye(12), atol=1e-3)
    assert torch.equal(conv.weight[1:24:2], -conv.weight[0:24:2])
    assert torch.equal(conv.weight[24:], spare)


def test_whitened_stem_trains_deterministically(tiny_data: Cifar10) -> None:
    kw = dict(arch="rpg_cifar_cnn_s", feature_dim=16, epochs=1, batch_size=64, lr=0.1, weight_decay=5e-4,
              label_smoothing=0.1, seed=0, progress=False, evaluate=False)
    a, _ = train_backbone(tiny_data, stem_init="whiten", **kw)
    b, _ = train_backbone(tiny_data, stem_init="whiten", **kw)
    c, _ = train_backbone(tiny_data, **kw)
    assert torch.equal(a.stem[0].weight, b.stem[0].weight) and not torch.equal(a.stem[0].weight, c.stem[0].weight)
    with pytest.raises(ValueError, match="stem_init"):
        train_backbone(tiny_data, stem_init="pca", **kw)


def test_lookahead_pulls_to_the_ema_and_keeps_it_at_the_end() -> None:
    model = torch.nn.Linear(2, 1)
    start = model.weight.detach().clone()
    look = Lookahead(model, total=10, every=5, base=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    look(3, model)  # not a lookahead step: untouched
    assert torch.equal(model.weight, start + 1)
    look(5, model)  # decay 0.5**5 * (5/10)**3
    decay = 0.5**5 / 8
    assert torch.allclose(model.weight, decay * start + (1 - decay) * (start + 1))
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    look(10, model)  # the last step: the model takes the EMA
    assert torch.equal(model.weight, kept)


def test_unknown_option_rejected(tiny_data: Cifar10) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'epochz'"):
        train_backbone(tiny_data, arch="rpg_cifar_cnn_s", feature_dim=8, epochs=1, batch_size=64, lr=0.1,
                       weight_decay=0.0, label_smoothing=0.0, seed=0, progress=False, epochz=3)
