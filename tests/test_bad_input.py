"""Bad input gets a clear, specific error that names the culprit (file, key, value), and nothing half-written."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from torch import nn

from rpg.config import ConfigError, load_config
from rpg.data import CorruptDataError, load_cifar10, write_synthetic_cifar10
from rpg.experiments.task_zoo.tasks import (TaskError, classes_to_embedding, embedding_to_id, id_to_embedding, make_split,
                       parse_embedding)
from rpg.tokenize import Tokenizer, check_collection
from rpg.utils import (CheckpointError, load_safetensors, load_state_dict_file, read_safetensors_metadata,
                       save_safetensors_atomic)

# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------------------------


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict().items()}


@pytest.fixture
def saved(tmp_path):
    sd = _state_dict()
    st = tmp_path / "model.safetensors"
    save_safetensors_atomic(sd, st, {"arch": "mlp"})
    pt = tmp_path / "model.pt"
    torch.save(sd, pt)
    return sd, st, pt


def _raises_naming(path, fn, exc=CheckpointError):
    with pytest.raises(exc) as info:
        fn(path)
    assert str(path) in str(info.value), str(info.value)
    return info.value


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.99])
def test_truncated_safetensors_file(saved, tmp_path, fraction):
    """A truncated .safetensors raises CheckpointError naming the file, from every reader."""
    _, st, _ = saved
    data = st.read_bytes()
    bad = tmp_path / f"truncated_{int(fraction * 100)}.safetensors"
    bad.write_bytes(data[: int(len(data) * fraction)] if fraction else b"")
    _raises_naming(bad, load_safetensors)
    _raises_naming(bad, load_state_dict_file)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9])
def test_truncated_torch_file(saved, tmp_path, fraction):
    _, _, pt = saved
    data = pt.read_bytes()
    bad = tmp_path / f"truncated_{int(fraction * 100)}.pt"
    bad.write_bytes(data[: int(len(data) * fraction)])
    _raises_naming(bad, load_state_dict_file)


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64 + b"not a checkpoint" * 10)
    _raises_naming(garbage, load_safetensors)
    _raises_naming(garbage, read_safetensors_metadata)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    _raises_naming(text, load_state_dict_file)
    _raises_naming(tmp_path / "missing.safetensors", load_safetensors)
    _raises_naming(tmp_path / "missing.pt", load_state_dict_file)


def test_torch_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    _raises_naming(path, load_state_dict_file)
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": _state_dict(), "epoch": 3}, nested)
    assert set(load_state_dict_file(nested)) == set(_state_dict())


def test_torch_load_is_weights_only(tmp_path):
    """A pickle that would run code is refused (weights_only=True), as a CheckpointError naming the file."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": Evil()}, path)
    _raises_naming(path, load_state_dict_file)


def test_good_files_load(saved):
    sd, st, pt = saved
    for path in (st, pt):
        loaded = load_state_dict_file(path)
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert load_safetensors(st)[1] == {"arch": "mlp"}


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    """A failing save leaves neither the target nor a temp file behind."""
    target = tmp_path / "out.safetensors"
    with pytest.raises(Exception):
        save_safetensors_atomic({"a": torch.zeros(2), "b": "not a tensor"}, target, {})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Collections
# ---------------------------------------------------------------------------------------------------------------


def test_collection_missing_or_extra_key():
    a, b = _state_dict(0), _state_dict(1)
    del b["2.bias"]
    with pytest.raises(CheckpointError, match=re.escape("2.bias")):
        check_collection([a, b])
    with pytest.raises(CheckpointError, match=re.escape("2.bias")):
        Tokenizer.fit([a, b], 8)
    c = {**_state_dict(2), "extra.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=re.escape("extra.weight")):
        check_collection([a, c], names=["a.safetensors", "c.safetensors"])


def test_collection_shape_mismatch_names_key_and_file():
    a, b = _state_dict(0), _state_dict(1)
    b["0.weight"] = torch.zeros(8, 5)
    with pytest.raises(CheckpointError) as info:
        check_collection([a, b], names=["first.safetensors", "second.safetensors"])
    msg = str(info.value)
    assert "0.weight" in msg and "second.safetensors" in msg and "(8, 5)" in msg and "(8, 4)" in msg
    with pytest.raises(CheckpointError, match=re.escape("0.weight")):
        Tokenizer.fit([a, b], 8)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_collection_non_finite_weights(bad):
    a, b = _state_dict(0), _state_dict(1)
    b["2.weight"][1, 3] = bad
    with pytest.raises(CheckpointError, match=re.escape("2.weight")) as info:
        check_collection([a, b], names=["a.pt", "b.pt"])
    assert "b.pt" in str(info.value) and ("NaN" in str(info.value) or "Inf" in str(info.value))
    with pytest.raises(CheckpointError, match=re.escape("2.weight")):
        Tokenizer.fit([a, b], 8)


def test_empty_collection_and_nothing_to_generate():
    with pytest.raises(CheckpointError, match="empty"):
        Tokenizer.fit([], 8)
    with pytest.raises(CheckpointError, match="floating-point"):
        Tokenizer.fit([{"step": torch.tensor(3)}], 8)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def _write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_defaults_load(repo_root):
    cfg = load_config([repo_root / "config" / "config.yaml", repo_root / "config" / "test.yaml"])
    assert cfg.experiment == "test" and cfg.model.token_size == 64 and cfg.model.d_model == 32


@pytest.mark.parametrize("section,key", [("rpg", "tokn_size"), ("train", "stepz"), ("zoo", "lrr"),
                                         ("diffusion", "samplr"), ("<top>", "resultsdir")])
def test_unknown_config_key_is_named(tmp_path, section, key):
    data = {key: 1} if section == "<top>" else {section: {key: 1}}
    path = _write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value)
    if section != "<top>":
        assert section in str(info.value)


@pytest.mark.parametrize("data,where", [
    ({"train": {"steps": "many"}}, "train.steps"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"seed": 1.5}, "seed"),
    ({"rpg": {"recurrent": "gru"}}, "rpg.recurrent"),
    ({"tasks": {"table11": ["01"]}}, "tasks.table11"),
    ({"tasks": {"unseen": [0]}}, "tasks.unseen"),
    ({"diffusion": {"sampler": "euler"}}, "diffusion.sampler"),
    ({"zoo": "fast"}, "zoo"),
])
def test_wrong_config_type_or_value(tmp_path, data, where):
    path = _write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert where in str(info.value)


def test_config_overrides_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="bogus"):
        load_config(_write_yaml(tmp_path / "ok.yaml", {}), overrides={"train": {"bogus": 1}})


def test_unknown_architecture_names():
    """Unknown recurrent / position / size / sampler / mode names raise ValueError naming them."""
    from conftest import tiny_model_config
    from rpg.config import resolve_model_config
    from rpg.model import RPG

    li, ti = torch.zeros(2, dtype=torch.long), torch.arange(2)
    with pytest.raises(ValueError, match="gru"):
        RPG(tiny_model_config(recurrent="gru"), li, ti)
    with pytest.raises(ValueError, match="3d"):
        RPG(tiny_model_config(position="3d"), li, ti)
    with pytest.raises(ValueError, match="gigantic"):
        resolve_model_config({"size": "gigantic"})


# ---------------------------------------------------------------------------------------------------------------
# Task embeddings
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,fragment", [
    ("010001011", "10 bits"), ("01000101110", "10 bits"), ("", "10 bits"),
    ("01000101x1", "0 and 1"), ("0100 10111", "0 and 1"), ("2100010111", "0 and 1"),
    ("0000000000", "all-0"), ("1111111111", "all-1"),
])
def test_bad_embeddings(text, fragment):
    with pytest.raises(TaskError, match=re.escape(fragment)):
        parse_embedding(text)
    with pytest.raises(TaskError):
        embedding_to_id(text)


def test_good_embeddings():
    assert embedding_to_id("0000000011") == 3
    assert embedding_to_id(" 0000000011 ") == 3
    assert id_to_embedding(512) == "1000000000"
    for bad in (0, 1023, -1):
        with pytest.raises(TaskError, match=str(bad)):
            id_to_embedding(bad)


def test_class_names():
    assert classes_to_embedding(["ship", "Truck "]) == "0000000011"
    with pytest.raises(TaskError, match="spaceship"):
        classes_to_embedding(["ship", "spaceship"])
    with pytest.raises(TaskError, match="all-0"):
        classes_to_embedding([])
    with pytest.raises(TaskError, match="all-1"):
        classes_to_embedding(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck"])


def test_split_rejects_unknown_unseen_and_too_many_val():
    with pytest.raises(TaskError, match="999"):
        make_split([1, 2, 3, 4], unseen=[999], n_val=1, seed=0)
    with pytest.raises(TaskError, match="n_val"):
        make_split([1, 2, 3, 4], unseen=[1], n_val=3, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_missing_cifar_says_where_to_put_it(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(empty)
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and str(empty.resolve()) in msg
    assert "download" in msg  # and how to fetch it instead
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path / "does_not_exist")


def test_truncated_cifar_archive(tmp_path):
    archive = write_synthetic_cifar10(tmp_path / "good", n_train=50, n_test=20)
    data = archive.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / archive.name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDataError, match="truncated"):
        load_cifar10(bad)
    ok = load_cifar10(tmp_path / "good")
    assert ok.train_images.shape == (50, 3, 32, 32) and ok.test_labels.shape == (20,)
