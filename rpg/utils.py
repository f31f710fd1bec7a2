"""Small shared helpers: seeding, devices, atomic file writes, safetensors I/O with metadata."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, truncated, wrong keys/shapes, non-finite values)."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded with `seed` for explicit use."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available; use device: cpu or auto")
    return torch.device(device)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto `path` only if the block succeeds.

    A crash (or an exception) leaves no half-written file at `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path: str | Path, frame) -> None:
    """Write a pandas DataFrame to CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, Any]) -> None:
    """Save tensors with JSON-encoded metadata (safetensors metadata values must be strings).

    Strings are JSON-encoded too, so that a string that looks like JSON (an embedding such as "1000000000", "true")
    reads back as the same string, not as a number or a bool.
    """
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=meta)


def _decode_meta(meta: Mapping[str, str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (meta or {}).items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def read_safetensors_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return _decode_meta(f.metadata())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and decoded metadata, turning any read failure into a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a safetensors file): {err}") from err
    return tensors, read_safetensors_metadata(path)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file (weights_only=True), with clear errors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt pickles/zips
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file): {err}") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)
