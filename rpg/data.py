"""CIFAR-10 access for the binary-task zoo (paper §5) and the CPU backbone.

Reads the "python version" layout of CIFAR-10 (``cifar-10-batches-py/{data_batch_1..5, test_batch,
batches.meta}``), either from an extracted folder or straight out of ``cifar-10-python.tar.gz``. No MD5
checks: the copy shipped to the development machines was re-encoded and has its own checksum, so
torchvision's dataset class (which verifies MD5s) would reject it. torchvision's downloader is used only
when the data is missing and ``download=True``.

``write_synthetic_cifar10`` writes a tiny archive in the same layout with learnable, class-dependent
images, for the tests and the test configuration of the workflow.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "ARCHIVE_NAME",
    "FOLDER_NAME",
    "Cifar10",
    "CorruptDataError",
    "load_cifar10",
    "split_train_val",
    "write_synthetic_cifar10",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# Per-channel statistics of the official training set (RGB, on the [0, 1] scale).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"


class CorruptDataError(RuntimeError):
    """A CIFAR-10 file exists but cannot be read (truncated download, wrong format, ...)."""


@dataclass(frozen=True)
class Cifar10:
    """CIFAR-10 in memory.

    Shapes:
        train_images: (50000, 3, 32, 32) uint8, RGB planes.
        train_labels: (50000,) int64 in 0..9 (index into ``CIFAR10_CLASSES``).
        test_images: (10000, 3, 32, 32) uint8.
        test_labels: (10000,) int64.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...] = CIFAR10_CLASSES

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
                raise ValueError(
                    f"{split}_images must be uint8 (N, 3, 32, 32), got {images.dtype} {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(f"{split}_labels must be int64 (N,), got {labels.dtype} {tuple(labels.shape)}")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a CIFAR batch is a dict of bytes, lists and one array,
    so nothing else is needed and an arbitrary pickle cannot run code."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # protocol-2 pickles store array bytes through it
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a CIFAR-10 batch")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any failure here means a damaged or foreign file
        raise CorruptDataError(f"cannot unpickle CIFAR-10 batch {where}: {e}") from e
    if not isinstance(obj, dict):
        raise CorruptDataError(f"CIFAR-10 batch {where} is not a dict")
    return obj


def _decode_batch(batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Batch dict → images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)  # (N, 3072): R, G, B planes, row-major
        labels = np.asarray(batch[b"labels"], dtype=np.int64)  # (N,)
    except KeyError as e:
        raise CorruptDataError(f"CIFAR-10 batch {where} lacks key {e}") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise CorruptDataError(f"CIFAR-10 batch {where} has data {data.shape} and labels {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CorruptDataError(f"CIFAR-10 batch {where} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _read_members(root: Path) -> dict[str, bytes]:
    """Raw bytes of the 6 batches (+ meta if present), from the extracted folder or the archive."""
    names = (*_TRAIN_BATCHES, _TEST_BATCH)
    folder = root / FOLDER_NAME
    if folder.is_dir() and all((folder / n).is_file() for n in names):
        return {n: (folder / n).read_bytes() for n in names}
    archive = root / ARCHIVE_NAME
    if not archive.is_file():
        missing = [n for n in names if not (folder / n).is_file()]
        raise CorruptDataError(f"{folder} is incomplete (missing {missing}) and there is no {archive} to fall back on")
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:  # streaming: one pass over the gzip stream
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names:
                    fh = tf.extractfile(member)
                    assert fh is not None
                    found[base] = fh.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile) as e:
        raise CorruptDataError(
            f"{archive} is truncated or corrupt ({type(e).__name__}: {e}); "
            f"replace it with a complete copy of {ARCHIVE_NAME}"
        ) from e
    missing = [n for n in names if n not in found]
    if missing:
        raise CorruptDataError(f"{archive} lacks CIFAR-10 batches {missing} (truncated or not CIFAR-10 python format?)")
    return found


def _has_data(root: Path) -> bool:
    folder = root / FOLDER_NAME
    return (root / ARCHIVE_NAME).is_file() or (folder / _TEST_BATCH).is_file()


def _download(root: Path) -> None:
    """Fetch the official archive with torchvision's downloader (MD5-checked, extracted under root)."""
    try:
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise FileNotFoundError(f"CIFAR-10 not found under {root} and torchvision is not installed") from e
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    try:
        download_and_extract_archive(url, download_root=str(root), filename=ARCHIVE_NAME,
                                     md5="c58f30108f718f92721af3b95e74349a")
    except Exception as e:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root} and downloading {url} failed ({e}); "
            f"copy {ARCHIVE_NAME} into {root} by hand"
        ) from e


def load_cifar10(root: str | Path, download: bool = False) -> Cifar10:
    """Load CIFAR-10 (python version) from ``root``.

    Looks for ``root/cifar-10-batches-py/`` (extracted) first, then ``root/cifar-10-python.tar.gz`` (read
    directly, no extraction). No MD5 check.

    Args:
        root: folder holding the archive or the extracted folder.
        download: fetch the official archive with torchvision when nothing is found (needs internet).

    Returns:
        ``Cifar10`` with uint8 images (N, 3, 32, 32) and int64 labels, in the file's own order.

    Raises:
        FileNotFoundError: no data under ``root`` (and ``download`` is off or failed).
        CorruptDataError: the archive or a batch is truncated or malformed.
    """
    root = Path(root)
    if not _has_data(root):
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 not found: neither {root / ARCHIVE_NAME} nor {root / FOLDER_NAME}/ exists. "
                f"Copy {ARCHIVE_NAME} (the 'python version' of CIFAR-10) into {root.resolve()}, "
                f"or set `data.download: true` in the config to fetch it (needs internet)."
            )
        root.mkdir(parents=True, exist_ok=True)
        _download(root)
    raw = _read_members(root)
    splits = {}
    for split, names in (("train", _TRAIN_BATCHES), ("test", (_TEST_BATCH,))):
        parts = [_decode_batch(_unpickle(raw[n], f"{root}/{n}"), f"{root}/{n}") for n in names]
        images = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32)
        labels = np.concatenate([p[1] for p in parts])  # (N,)
        splits[split] = (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    return Cifar10(*splits["train"], *splits["test"])


# --------------------------------------------------------------------------------------------------
# Synthetic data (tests, workflow test config)
# --------------------------------------------------------------------------------------------------


def split_train_val(data: Cifar10, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, disjoint indices of the training images that train models and that validate them (sorted).

    Every experiment draws its held-out validation images here, from the same seed, so that no model that is
    scored on them (the backbone, the zoo heads, the checkpoint collections) has trained on them.
    """
    perm = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _synthetic_images(labels: np.ndarray, prototypes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class prototype (colour + low-frequency pattern) + per-image brightness jitter + pixel noise."""
    n = len(labels)
    images = prototypes[labels]  # (n, 3, 32, 32) float in [0, 255]
    images = images * rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)) + rng.normal(0.0, 25.0, size=images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def write_synthetic_cifar10(root: str | Path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    """Write a tiny, learnable CIFAR-10 look-alike as ``root/cifar-10-python.tar.gz``.

    Same archive layout and pickle format as the official release. Each class has a mean colour and a
    smooth spatial pattern; images add brightness jitter and noise, so small nets learn it in an epoch.

    Args:
        root: output folder (created).
        n_train: training images, spread over the 5 ``data_batch_*`` files.
        n_test: test images.
        seed: numpy seed; the same seed gives the same bytes.

    Returns:
        Path of the written archive.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Prototypes: upsampled 4x4 random patterns around a class colour, so classes differ in colour and layout.
    colours = rng.uniform(40, 215, size=(10, 3, 1, 1))
    coarse = rng.normal(0, 40, size=(10, 3, 4, 4))
    prototypes = colours + np.kron(coarse, np.ones((1, 1, 8, 8)))  # (10, 3, 32, 32)

    def batch(labels: np.ndarray, label: str) -> bytes:
        images = _synthetic_images(labels, prototypes, rng)
        return pickle.dumps({
            b"batch_label": label.encode(),
            b"labels": labels.tolist(),
            b"data": images.reshape(len(labels), -1),  # (N, 3072)
            b"filenames": [f"synthetic_{label}_{i}.png".encode() for i in range(len(labels))],
        }, protocol=2)

    members = {}
    train_labels = np.arange(n_train) % 10
    rng.shuffle(train_labels)
    for i, chunk in enumerate(np.array_split(train_labels, 5), start=1):
        members[f"data_batch_{i}"] = batch(chunk, f"training batch {i} of 5")
    test_labels = np.arange(n_test) % 10
    rng.shuffle(test_labels)
    members[_TEST_BATCH] = batch(test_labels, "testing batch 1 of 1")
    members[_META] = pickle.dumps({
        b"num_cases_per_batch": int(np.ceil(n_train / 5)),
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }, protocol=2)

    archive = root / ARCHIVE_NAME
    tmp = archive.with_name(archive.name + ".tmp")
    # mtime=0 and a fixed gzip header keep the bytes reproducible for a given seed.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            info = tarfile.TarInfo(FOLDER_NAME)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
            for name, payload in members.items():
                info = tarfile.TarInfo(f"{FOLDER_NAME}/{name}")
                info.size, info.mode = len(payload), 0o644
                tf.addfile(info, io.BytesIO(payload))
    tmp.replace(archive)
    return archive
