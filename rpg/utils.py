"""Small shared helpers: seeding, devices, atomic file writes, safetensors I/O with metadata."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, truncated, wrong keys/shapes, non-finite values)."""


class CorruptFileError(CheckpointError):
    """A file that is there but cannot be read (truncated, or not the format it should be); `path` names it, so that
    a workflow job can say which rule to rerun (rpg.experiments.rules.run_rule)."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


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


# Temporary files of atomic_path: ".<name>.<8 random characters>.tmp" (tempfile.mkstemp's pattern).
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# A temporary file not modified for this long belongs to a killed write (a live one is being written, or is renamed
# within a moment of its last write), so the next write to its folder removes it.
STALE_TMP_SECONDS = 600.0


def current_umask() -> int:
    """The process umask: from /proc on Linux (no race with other threads), else by setting it and back at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temp_files(folder: str | Path, older_than: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete atomic_path temporary files in `folder` left by killed writes; return what was removed."""
    removed = []
    now = time.time()
    for entry in Path(folder).iterdir():
        if not _TMP_NAME.match(entry.name):
            continue
        try:
            if entry.is_file() and now - entry.stat().st_mtime > older_than:
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # another process cleaned it up (or renamed it) first
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto `path` only if the block succeeds.

    A crash (or an exception) leaves no half-written file at `path`. The file gets the permissions of a plain
    `open()` (0666 less the umask), not mkstemp's private 0600, so collaborators on a shared file system can read
    results. Temporary files of earlier killed writes in the folder (see STALE_TMP_SECONDS) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())  # after the block: some writers (safetensors) recreate the file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_writable_folder(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be created in it, so that a command refuses an unwritable
    output folder (permission denied, read-only file system, a name too long) before its work, not after it.

    Raises the OSError of the failed creation, naming `folder`. The probe is an atomic_path-style temporary file,
    removed at once (or, after a kill, by the next write to the folder).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(prefix=".rpg-write-check.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(folder)) from err
    os.close(fd)
    os.unlink(probe)
    return folder


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path: str | Path, frame) -> None:
    """Write a pandas DataFrame to CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_csv_rows(path: str | Path, header: list[str], rows: list[Mapping[str, Any]]) -> None:
    """Write dict rows under `header` (missing values empty) to a CSV file atomically."""
    import csv

    with atomic_path(path) as tmp, Path(tmp).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, Any]) -> None:
    """Save tensors with JSON-encoded metadata (safetensors metadata values must be strings).

    Strings are JSON-encoded too, so that a string that looks like JSON (an embedding such as "1000000000", "true")
    reads back as the same string, not as a number or a bool.
    """
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=meta)


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or an Inf (None if all are finite)."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError naming `what` and the first tensor with NaN/Inf values."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{what} holds non-finite values (NaN or Inf) in '{bad}'; it is not a usable model")


def _mismatch_line(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    """The one line of a state-dict mismatch: the first keys of each kind, and how many more there are."""
    def first(keys: list[str]) -> str:
        shown = ", ".join(f"'{k}'" for k in keys[:3])
        return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = ([f"missing {first(missing)}"] if missing else []) + \
            ([f"unexpected {first(unexpected)}"] if unexpected else []) + shapes[:3] + \
            ([f"{len(shapes) - 3} more keys of another shape"] if len(shapes) > 3 else [])
    return "; ".join(parts)


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """One line naming the keys and shapes by which `given` does not fit `expected` ('' if it fits)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"'{k}' has shape {tuple(given[k].shape)}, expected {tuple(v.shape)}"
              for k, v in expected.items() if k in given and tuple(given[k].shape) != tuple(v.shape)]
    return _mismatch_line(missing, unexpected, shapes)


_SIZE_MISMATCH = re.compile(r"size mismatch for (.+?): copying a param with shape torch\.Size\(\[(.*?)\]\) from "
                            r"checkpoint, the shape in current model is torch\.Size\(\[(.*?)\]\)")


def load_error_mismatch(message: str) -> str | None:
    """torch's `load_state_dict` error (a line per kind of problem, listing every key) as `state_dict_mismatch`'s
    one line; None for any other message. A user's score function that loads a state dict raises it."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if not lines or not lines[0].startswith("Error(s) in loading state_dict"):
        return None
    missing: list[str] = []
    unexpected: list[str] = []
    shapes: list[str] = []
    for line in lines[1:]:
        keys = re.findall(r'"([^"]*)"', line)
        if line.startswith("Missing key(s)"):
            missing += keys
        elif line.startswith("Unexpected key(s)"):
            unexpected += keys
        elif (m := _SIZE_MISMATCH.match(line)) is not None:
            given, expected = (tuple(int(n) for n in dims.split(",") if n.strip()) for dims in (m[2], m[3]))
            shapes.append(f"'{m[1]}' has shape {given}, expected {expected}")
    return _mismatch_line(missing, unexpected, shapes) or None


def _decode_meta(meta: Mapping[str, str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (meta or {}).items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """The error for a safetensors file that cannot be read: CorruptFileError where the file is there."""
    if not path.is_file():
        return CheckpointError(f"checkpoint not found: {path}")
    return CorruptFileError(path, f"cannot read checkpoint {path} (truncated or not a safetensors file): {err}")


def read_safetensors_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return _decode_meta(f.metadata())
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from err


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and decoded metadata, turning any read failure into a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from err
    return tensors, read_safetensors_metadata(path)


def load_safetensors_keys(path: str | Path, select: Callable[[list[str]], list[str]]) -> dict[str, torch.Tensor]:
    """Only the tensors `select(all keys)` names (the others are not read), with load_safetensors' errors."""
    path = Path(path)
    try:
        f = safe_open(str(path), framework="pt")
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from err
    with f:
        chosen = select(list(f.keys()))  # outside the try: its own errors are not the file's
        try:
            return {k: f.get_tensor(k) for k in chosen}
        except _READ_ERRORS as err:
            raise _unreadable(path, err) from err


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
        raise CorruptFileError(path, f"cannot read checkpoint {path} (truncated or not a torch file): {err}") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)
