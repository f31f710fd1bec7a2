"""rpg.experiments.task_zoo.finetune_curves (Table 13): arms, epochs, the generated sample chosen on validation images, and the RPG arm
at epoch 0 being exactly the generated head on the pretrained backbone."""

from __future__ import annotations

import pytest
import timm
import torch

import rpg.vision.cifar_cnn  # noqa: F401
from rpg.experiments.task_zoo.backbone import extract_features
from rpg.config import load_config
from rpg.data import load_cifar10, write_synthetic_cifar10
from rpg.data import split_train_val
from rpg.experiments.task_zoo.features import FEATURE_KEYS
from rpg.experiments.task_zoo.finetune_curves import ARMS, _split_generated, select_generated, table13
from rpg.experiments.task_zoo.tasks import binary_labels, embedding_to_id
from rpg.utils import save_safetensors_atomic
from rpg.experiments.task_zoo.heads import HEAD_KEYS, binary_metrics, head_logits, initial_head

from conftest import REPO_ROOT

D = 8
EMB = "1000000000"  # airplane only: ~10 % positives, so "always negative" is a strong validation score
TASK = embedding_to_id(EMB)


def _constant_head(label: int) -> dict[str, torch.Tensor]:
    """A head that predicts `label` for every input (hidden units constant, second layer picks the class)."""
    head = {k: torch.zeros_like(v) for k, v in initial_head(D, 0).items()}
    head["0.bias"] += 1.0
    head["2.weight"][label] += 1.0
    return head


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t13")
    write_synthetic_cifar10(tmp / "data", n_train=300, n_test=120)
    cfg = load_config([REPO_ROOT / "config" / "config.yaml"], overrides={
        "results_dir": str(tmp / "results"), "threads": 1, "device": "cpu", "data": {"root": str(tmp / "data"),
                                                                                       "val_images": 60},
        "backbone": {"feature_dim": D}, "logging": {"progress": False, "wandb": False},
        "table13": {"tasks": [EMB], "epochs": [0, 1, 2], "train_images": 64, "batch_size": 32, "lr": 1e-3},
    })
    torch.manual_seed(0)
    backbone = timm.create_model("rpg_cifar_cnn", num_classes=10, feature_dim=D).eval()
    save_safetensors_atomic(backbone.state_dict(), tmp / "backbone.safetensors",
                            {"arch": "rpg_cifar_cnn", "feature_dim": D, "source": "train"})
    data = load_cifar10(tmp / "data")
    _, val_idx = split_train_val(data, 60, cfg.seed)
    feats = {k: torch.zeros(1) for k in FEATURE_KEYS}
    feats["val_x"] = extract_features(backbone, data.train_images[val_idx], compile=False)
    feats["val_y"] = data.train_labels[val_idx]
    save_safetensors_atomic(feats, tmp / "features.safetensors", {})
    g = torch.Generator().manual_seed(3)
    random_head = {k: torch.randn(v.shape, generator=g) for k, v in initial_head(D, 0).items()}
    for s, head in enumerate([_constant_head(1), _constant_head(0), random_head]):
        save_safetensors_atomic(head, tmp / "models" / f"{TASK:04d}_s{s}.safetensors", {"task_id": TASK})
    return {"tmp": tmp, "cfg": cfg, "data": data, "backbone": backbone}


def test_generated_sample_chosen_by_validation_accuracy(setup):
    tmp, cfg = setup["tmp"], setup["cfg"]
    chosen = select_generated(cfg, tmp / "models", [TASK], tmp / "features.safetensors")
    assert chosen["sample"].tolist() == [1]  # always-negative wins on a 10 %-positive task
    val_y = binary_labels(setup["data"].train_labels[split_train_val(setup["data"], 60, cfg.seed)[1]], [TASK])[0]
    assert chosen.val_accuracy[0] == pytest.approx(float((val_y == 0).float().mean()))


def test_table13_arms_epochs_and_rpg_epoch0_is_the_generated_head(setup):
    tmp, cfg, data = setup["tmp"], setup["cfg"], setup["data"]
    frame, chosen = table13(cfg, data, tmp / "models", tmp / "features.safetensors", tmp / "backbone.safetensors")
    per_task = frame[frame.embedding == EMB]
    assert per_task.arm.tolist() == [a for a in ARMS for _ in range(3)]
    assert per_task.epoch.tolist() == [0, 1, 2] * 3
    assert ((frame.accuracy >= 0) & (frame.accuracy <= 100)).all()
    mean = frame[frame.embedding == "mean"]
    assert len(mean) == 9 and mean.accuracy.tolist() == pytest.approx(per_task.accuracy.tolist())
    # epoch 0 of the RPG arm: the chosen generated head on flip-averaged features of the pretrained backbone
    test_y = binary_labels(data.test_labels, [TASK])[0]
    feats = extract_features(setup["backbone"], data.test_images, compile=False)
    head = {k: v[None] for k, v in _constant_head(0).items()}
    acc = binary_metrics(head_logits(head, feats).argmax(-1), test_y[None])["accuracy"]
    rpg0 = per_task[(per_task.arm == "rpg") & (per_task.epoch == 0)].accuracy.item()
    assert rpg0 == pytest.approx(100 * float(acc[0]), abs=1e-3)
    # training moved the weights: later epochs carry training time
    assert (per_task[per_task.epoch > 0].train_seconds > 0).all()


def test_split_generated_head_only_and_full_model():
    head = initial_head(D, 0)
    assert _split_generated(head) == (None, head)
    full = {"blocks.0.w": torch.ones(2), **{f"head.{k}": v for k, v in head.items()}}
    backbone, h = _split_generated(full)
    assert set(backbone) == {"blocks.0.w"} and set(h) == set(HEAD_KEYS)
