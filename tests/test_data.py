"""CIFAR-10 loading: synthetic round trips (archive and extracted folder) and clear errors."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from rpg.data import (
    ARCHIVE_NAME,
    CIFAR10_CLASSES,
    FOLDER_NAME,
    Cifar10,
    CorruptDataError,
    load_cifar10,
    write_synthetic_cifar10,
)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_synthetic_cifar10(root, n_train=230, n_test=50, seed=3)
    return root


def test_classes_official_order() -> None:
    assert CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer",
                               "dog", "frog", "horse", "ship", "truck")


def test_archive_round_trip(synthetic_root: Path) -> None:
    data = load_cifar10(synthetic_root)
    assert isinstance(data, Cifar10)
    assert data.train_images.shape == (230, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (50, 3, 32, 32) and data.test_images.dtype == torch.uint8
    assert data.train_labels.shape == (230,) and data.train_labels.dtype == torch.int64
    assert data.test_labels.shape == (50,) and data.test_labels.dtype == torch.int64
    assert set(data.train_labels.tolist()) == set(range(10))
    assert data.classes == CIFAR10_CLASSES
    with pytest.raises(Exception):  # frozen
        data.train_images = data.test_images  # type: ignore[misc]


def test_synthetic_is_deterministic_and_class_dependent(synthetic_root: Path, tmp_path: Path) -> None:
    again = write_synthetic_cifar10(tmp_path, n_train=230, n_test=50, seed=3)
    assert again.read_bytes() == (synthetic_root / ARCHIVE_NAME).read_bytes()
    data = load_cifar10(synthetic_root)
    # Class means differ much more than the noise of a class mean: a nearest-mean classifier works.
    x = data.train_images.float().flatten(1)  # (N, 3072)
    means = torch.stack([x[data.train_labels == c].mean(0) for c in range(10)])  # (10, 3072)
    test = data.test_images.float().flatten(1)
    pred = torch.cdist(test, means).argmin(1)
    assert (pred == data.test_labels).float().mean() > 0.9


def test_extracted_folder_matches_archive(synthetic_root: Path, tmp_path: Path) -> None:
    with tarfile.open(synthetic_root / ARCHIVE_NAME, "r:gz") as tf:
        tf.extractall(tmp_path, filter="data")
    assert (tmp_path / FOLDER_NAME / "data_batch_5").is_file()
    from_folder, from_archive = load_cifar10(tmp_path), load_cifar10(synthetic_root)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(from_folder, field), getattr(from_archive, field))


def test_missing_data_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(tmp_path / "nowhere")
    msg = str(err.value)
    assert ARCHIVE_NAME in msg and "nowhere" in msg and "data.download" in msg


def test_truncated_archive_names_the_file(synthetic_root: Path, tmp_path: Path) -> None:
    raw = (synthetic_root / ARCHIVE_NAME).read_bytes()
    (tmp_path / ARCHIVE_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptDataError) as err:
        load_cifar10(tmp_path)
    assert str(tmp_path / ARCHIVE_NAME) in str(err.value)


def test_garbage_batch_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / FOLDER_NAME
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(CorruptDataError, match="data_batch_1"):
        load_cifar10(tmp_path)
