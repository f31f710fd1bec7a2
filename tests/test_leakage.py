"""No leakage: training the task-conditioned RPG (rpg.experiments.task_zoo.pipeline.train_conditional_rpg) never opens an unseen task's
checkpoint. Shown twice: (a) by recording every file the safetensors readers open, (b) by deleting the unseen
tasks' files before training: training still succeeds and gives bit-identical generator weights.
The baselines (rpg.experiments.task_zoo.baselines) read the training split only, shown the same two ways (the
end-to-end check, unseen files rewritten, is in tests/test_baselines.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import rpg.checkpoint
import rpg.experiments.task_zoo.baselines
import rpg.experiments.task_zoo.features
import rpg.experiments.task_zoo.pipeline
import rpg.utils
import rpg.experiments.task_zoo.heads
from rpg.config import load_config
from rpg.experiments.task_zoo.baselines import baseline_heads, load_training_zoo
from rpg.experiments.task_zoo.pipeline import read_split, train_conditional_rpg, write_split
from rpg.utils import load_safetensors, save_safetensors_atomic
from rpg.experiments.task_zoo.heads import HEAD_KEYS, checkpoint_path, save_zoo

D = 8
SEEN = [3, 5, 12, 33, 100, 255, 256, 300, 400]
UNSEEN = [314, 482, 589]
K = 3


@pytest.fixture
def synthetic_zoo(tmp_path, repo_root):
    """A zoo of random heads for 12 tasks (3 unseen), cached features, config and split, all under tmp_path."""
    gen = torch.Generator().manual_seed(0)
    task_ids = SEEN + UNSEEN
    base = {"0.weight": 0.3 * torch.randn(D, D, generator=gen), "0.bias": 0.1 * torch.randn(D, generator=gen),
            "2.weight": 0.3 * torch.randn(2, D, generator=gen)}
    stacked = {k: v[None, None] + 0.05 * torch.randn(len(task_ids), K, *v.shape, generator=gen)
               for k, v in base.items()}
    metrics = {"accuracy": torch.full((len(task_ids), K), 0.9), "balanced_accuracy": torch.full((len(task_ids), K), 0.8)}
    zoo_dir = tmp_path / "zoo"
    save_zoo(zoo_dir, stacked, task_ids, metrics, steps=[8, 9, 10], feature_dim=D, backbone="toy")

    labels = {s: torch.arange(n) % 10 for s, n in (("train", 200), ("val", 50), ("test", 100))}
    feats = {}
    for split, y in labels.items():
        feats[f"{split}_x"] = torch.randn(len(y), D, generator=gen) + y[:, None].float() / 5
        feats[f"{split}_y"] = y
    features_path = tmp_path / "features.safetensors"
    save_safetensors_atomic(feats, features_path, {"feature_dim": D})

    cfg = load_config([repo_root / "config" / "config.yaml", repo_root / "config" / "test.yaml"], overrides={
        "results_dir": str(tmp_path / "results"),
        "tasks": {"ids": task_ids, "unseen": UNSEEN, "table11": [], "n_val": 2},
        "train": {"steps": 12, "eval_every": 6, "save_every": 6, "batch_size": 4, "diffusion_batch": 16},
        "logging": {"wandb": False, "progress": False},
    })
    split_path = tmp_path / "split.json"
    split = write_split(cfg, split_path)
    assert set(split.unseen) == set(UNSEEN) and len(split.val) == 2
    return {"cfg": cfg, "zoo": zoo_dir, "features": features_path, "split": split_path, "tmp": tmp_path}


def _task_of(path: str) -> int | None:
    m = re.match(r"^(\d{4})_\d+\.safetensors$", Path(path).name)
    return int(m.group(1)) if m else None


def record_reads(monkeypatch) -> list[str]:
    """Record every path handed to the safetensors readers (at every level and in every module)."""
    opened: list[str] = []

    def recording(fn):
        def wrapper(path, *args, **kwargs):
            opened.append(str(path))
            return fn(path, *args, **kwargs)

        return wrapper

    # low level: the readers rpg.utils uses for every safetensors file
    monkeypatch.setattr(rpg.utils, "load_file", recording(rpg.utils.load_file))
    monkeypatch.setattr(rpg.utils, "safe_open", recording(rpg.utils.safe_open))
    monkeypatch.setattr(torch, "load", recording(torch.load))
    # high level: load_safetensors wherever it was imported by name
    for module in (rpg.utils, rpg.experiments.task_zoo.heads, rpg.experiments.task_zoo.features, rpg.checkpoint,
                   rpg.experiments.task_zoo.pipeline, rpg.experiments.task_zoo.baselines):
        if hasattr(module, "load_safetensors"):
            monkeypatch.setattr(module, "load_safetensors", recording(getattr(module, "load_safetensors")))
    return opened


def test_training_never_opens_unseen_checkpoints(synthetic_zoo, monkeypatch):
    """Every path handed to the safetensors readers is recorded; none is an unseen task's checkpoint, while all
    training- and validation-task checkpoints were read."""
    opened = record_reads(monkeypatch)
    z = synthetic_zoo
    summary = train_conditional_rpg(z["cfg"], z["zoo"], z["split"], z["features"], z["tmp"] / "rpg")
    assert summary["steps"] == 12 and (z["tmp"] / "rpg" / "best.safetensors").is_file()

    tasks_read = {_task_of(p) for p in opened} - {None}
    leaked = tasks_read & set(UNSEEN)
    assert not leaked, f"unseen tasks read during RPG training: {sorted(leaked)}"
    split = read_split(z["split"])
    assert tasks_read == set(split.train) | set(split.val)  # the recorder did see the reads it should
    assert any(Path(p) == z["features"] for p in opened)


def test_training_succeeds_without_unseen_files(synthetic_zoo):
    """With the unseen tasks' checkpoints deleted, training succeeds and gives bit-identical generator weights."""
    z = synthetic_zoo
    train_conditional_rpg(z["cfg"], z["zoo"], z["split"], z["features"], z["tmp"] / "rpg_with")
    for t in UNSEEN:
        for k in range(K):
            checkpoint_path(z["zoo"], t, k).unlink()
    assert not any(_task_of(p.name) in UNSEEN for p in (z["zoo"] / "checkpoints").iterdir())
    summary = train_conditional_rpg(z["cfg"], z["zoo"], z["split"], z["features"], z["tmp"] / "rpg_without")
    assert summary["steps"] == 12
    for name in ("best.safetensors", "last.safetensors"):
        a, meta_a = load_safetensors(z["tmp"] / "rpg_with" / name)
        b, meta_b = load_safetensors(z["tmp"] / "rpg_without" / name)
        assert meta_a["layout"] == meta_b["layout"]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_unseen_checkpoints_are_excluded_from_the_tokenizer_statistics(synthetic_zoo):
    """Making the unseen checkpoints wildly different changes nothing in the stored layout (statistics)."""
    z = synthetic_zoo
    train_conditional_rpg(z["cfg"], z["zoo"], z["split"], z["features"], z["tmp"] / "a")
    for t in UNSEEN:
        for k in range(K):
            path = checkpoint_path(z["zoo"], t, k)
            tensors, meta = load_safetensors(path)
            save_safetensors_atomic({key: 1000 * tensors[key] for key in HEAD_KEYS}, path, meta)
    train_conditional_rpg(z["cfg"], z["zoo"], z["split"], z["features"], z["tmp"] / "b")
    assert (z["tmp"] / "a" / "layout.json").read_text() == (z["tmp"] / "b" / "layout.json").read_text()


def test_baselines_read_only_the_training_split(synthetic_zoo, monkeypatch):
    """Building every head baseline for the unseen tasks opens exactly the training tasks' checkpoints (no
    validation or unseen file), and gives the same heads with the unseen files deleted."""
    opened = record_reads(monkeypatch)
    z = synthetic_zoo
    split = read_split(z["split"])
    heads = baseline_heads(load_training_zoo(z["zoo"], split, K), split.unseen, noise_l2=1.0, seed=0)
    assert {_task_of(p) for p in opened} - {None} == set(split.train)
    for t in UNSEEN:
        for k in range(K):
            checkpoint_path(z["zoo"], t, k).unlink()
    again = baseline_heads(load_training_zoo(z["zoo"], split, K), split.unseen, noise_l2=1.0, seed=0)
    assert set(heads) == set(again)
    assert all(torch.allclose(heads[name], again[name], rtol=0, atol=0, equal_nan=True) for name in heads)
