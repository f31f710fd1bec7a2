"""A folder of checkpoints of one architecture, loaded and checked before RPG trains on it ("bring your own").

`load_collection` reads every ``*.safetensors``, ``*.pt``, ``*.pth`` and ``*.bin`` file of a folder (sorted by name;
torch files with ``weights_only=True``, as a raw state dict or under a ``"state_dict"`` / ``"model"`` key) and
refuses, naming the file and the problem, anything RPG cannot learn from: unreadable or truncated files, files that
hold no state dict, non-tensor values, NaN/Inf weights, floating dtypes RPG cannot generate, and keys / shapes /
dtypes that disagree with the majority of the collection. With ``skip_bad=True`` such files are skipped with a
warning instead. `inspect_collection` reports the same problems plus what RPG would make of the collection
(parameters generated vs. copied, tokens per layer for a token size) without raising for bad files.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from rpg.config import paper_size
from rpg.tokenize import Tokenizer
from rpg.utils import CheckpointError, load_safetensors

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
GENERATABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Metadata that tells how to rebuild the network; `rpg generate` copies it into every generated model.
ARCHITECTURE_KEYS = ("arch", "model_kwargs", "img_size", "num_classes", "build")
# Table 15 of the paper: the generator version by the number of parameters to generate.


class CollectionError(CheckpointError):
    """A checkpoint collection RPG cannot train on (the message names the file and the problem)."""


@dataclass
class Collection:
    """The good checkpoints of a folder, in name order, and the files skipped (with why)."""

    paths: list[Path]
    state_dicts: list[dict[str, torch.Tensor]]
    metadata: list[dict]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.state_dicts)

    def architecture(self) -> dict[str, Any]:
        """The architecture keys (`ARCHITECTURE_KEYS`) on which all checkpoints that carry them agree."""
        out: dict[str, Any] = {}
        for key in ARCHITECTURE_KEYS:
            values = [meta[key] for meta in self.metadata if key in meta]
            if values and all(v == values[0] for v in values):
                out[key] = values[0]
        return out


# ----------------------------------------------------------------------------------------------------------------
# Reading one file
# ----------------------------------------------------------------------------------------------------------------


def _read_torch(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt pickles/zips and refused globals
        raise CheckpointError(f"cannot read it (truncated or not a torch checkpoint): {type(err).__name__}: "
                              f"{_first_line(err)}") from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return dict(obj[key])
        return dict(obj)
    raise CheckpointError(f"holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """One checkpoint and its metadata; raises CheckpointError with a problem description (without the path)."""
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path)
        except CheckpointError as err:
            raise CheckpointError("cannot read it (truncated or not a safetensors file)") from err
    return _read_torch(path), {}


def _file_problem(state: Mapping[str, Any]) -> str | None:
    """What makes a single state dict unusable, or None."""
    if not state:
        return "holds no tensors"
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            return f"'{key}' is a {type(value).__name__}, not a tensor"
        if (value.is_floating_point() or value.is_complex()) and value.dtype not in GENERATABLE_DTYPES:
            return (f"'{key}' has dtype {str(value.dtype).removeprefix('torch.')}, which RPG cannot generate "
                    "(float16, bfloat16, float32, float64)")
        if value.is_floating_point() and not torch.isfinite(value).all():
            n_nan, n_inf = int(value.isnan().sum()), int(value.isinf().sum())
            return f"'{key}' holds NaN or Inf values ({n_nan} NaN, {n_inf} Inf)"
    return None


def _signature(state: Mapping[str, torch.Tensor]) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in state.items()))


def _disagreement(state: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], ref_label: str) -> str:
    missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    if missing or extra:
        return (f"keys disagree with the rest of the collection (e.g. {ref_label}): "
                f"missing {missing[:5]}, unexpected {extra[:5]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(ref[key].shape):
            return f"'{key}' has shape {tuple(tensor.shape)} but the rest of the collection has {tuple(ref[key].shape)}"
    for key, tensor in state.items():
        if tensor.dtype != ref[key].dtype:
            return f"'{key}' has dtype {tensor.dtype} but the rest of the collection has {ref[key].dtype}"
    return "differs from the rest of the collection"


# ----------------------------------------------------------------------------------------------------------------
# Scanning a folder
# ----------------------------------------------------------------------------------------------------------------


def _candidates(directory: Path, pattern: str | None) -> list[Path]:
    if directory.is_file():
        raise CollectionError(f"{directory} is a file; give the folder that holds the checkpoints (e.g. "
                              f"{directory.parent})")
    if not directory.is_dir():
        raise CollectionError(f"checkpoint folder not found: {directory}")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")
                   and (pattern is None or fnmatch.fnmatch(p.name, pattern)))
    if not files:
        what = f"matching '{pattern}' " if pattern else ""
        raise CollectionError(f"no checkpoint files {what}({', '.join('*' + s for s in SUFFIXES)}) in {directory}")
    return files


def _scan(directory: Path, pattern: str | None) -> tuple[Collection, list[tuple[Path, str]]]:
    """All files read and checked: (the good ones, [(path, problem)] for the others), never raising for a file."""
    good: list[tuple[Path, dict[str, torch.Tensor], dict]] = []
    problems: list[tuple[Path, str]] = []
    for path in _candidates(directory, pattern):
        try:
            state, meta = _read(path)
        except CheckpointError as err:
            problems.append((path, str(err)))
            continue
        problem = _file_problem(state)
        if problem:
            problems.append((path, problem))
        else:
            good.append((path, state, meta))
    if good:
        # Majority vote on keys/shapes/dtypes; ties go to the earliest file by name.
        majority = Counter(_signature(s) for _, s, _ in good).most_common(1)[0][0]
        ref_path, ref, _ = next(g for g in good if _signature(g[1]) == majority)
        for path, state, _ in good:
            if _signature(state) != majority:
                problems.append((path, _disagreement(state, ref, ref_path.name)))
        good = [g for g in good if _signature(g[1]) == majority]
    problems.sort(key=lambda p: p[0].name)
    collection = Collection([p for p, _, _ in good], [s for _, s, _ in good], [m for _, _, m in good])
    return collection, problems


def load_collection(directory: str | Path, *, skip_bad: bool = False, pattern: str | None = None) -> Collection:
    """Load and check every checkpoint of `directory` (optionally only names matching the glob `pattern`).

    Raises:
        CollectionError: for the first bad file (naming it and the problem), unless `skip_bad`; and when fewer
            than two good checkpoints remain (RPG learns a distribution of weights).
    """
    directory = Path(directory)
    collection, problems = _scan(directory, pattern)
    if problems and not skip_bad:
        path, problem = problems[0]
        more = f" (and {len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        raise CollectionError(f"{path}: {problem}{more}; fix or remove it, or skip bad files (--skip-bad)")
    for path, problem in problems:
        warnings.warn(f"skipping {path}: {problem}", stacklevel=2)
    collection.skipped = problems
    if len(collection) < 2:
        raise CollectionError(f"{directory} has {len(collection)} usable checkpoint(s); RPG needs at least 2 "
                              f"checkpoints of one architecture" + (f" ({len(problems)} skipped)" if problems else ""))
    return collection


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _metadata_summary(metadata: list[dict]) -> dict[str, Any]:
    """Per metadata key: the single value all files share, or min/mean/max of numbers, or the number of values."""
    out: dict[str, Any] = {}
    for key in sorted({k for meta in metadata for k in meta}):
        values = [meta[key] for meta in metadata if key in meta]
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(values) and len(set(numbers)) > 1:
            out[key] = {"min": min(numbers), "mean": sum(numbers) / len(numbers), "max": max(numbers),
                        "files": len(values)}
        elif all(v == values[0] for v in values):
            out[key] = values[0] if len(values) == len(metadata) else {"value": values[0], "files": len(values)}
        else:
            out[key] = {"distinct_values": len({repr(v) for v in values}), "files": len(values)}
    return out


def inspect_collection(directory: str | Path, token_size: int = 256, skip_bad: bool = False,
                       pattern: str | None = None) -> dict[str, Any]:
    """What RPG would train on: counts, layers with their tokens, problems, metadata summary (JSON-serialisable).

    Bad files are reported under ``problems``, not raised; ``usable`` says whether `load_collection` (with the same
    `skip_bad`) would accept the folder. Layer statistics come from the first good checkpoint.
    """
    if token_size < 1:
        raise CollectionError(f"token size must be a positive integer, got {token_size}")
    directory = Path(directory)
    collection, problems = _scan(directory, pattern)
    report: dict[str, Any] = {
        "directory": str(directory), "files": len(collection) + len(problems), "count": len(collection),
        "token_size": token_size,
        "problems": [{"file": str(p), "problem": msg} for p, msg in problems],
        "usable": len(collection) >= 2 and (skip_bad or not problems),
        "metadata": _metadata_summary(collection.metadata), "architecture": collection.architecture(),
    }
    if not collection.state_dicts:
        return report
    ref = collection.state_dicts[0]
    tokenizer = Tokenizer.fit([ref], token_size)
    tokens = {layer.name: layer.n_tokens for layer in tokenizer.layers}
    report["layers"] = [{"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                         "numel": t.numel(), "tokens": tokens.get(name, 0), "generated": name in tokens}
                        for name, t in ref.items()]
    report["parameters"] = {"generated": tokenizer.n_params,
                            "copied": sum(t.numel() for t in tokenizer.copied.values()),
                            "total": sum(t.numel() for t in ref.values())}
    report["tokens"] = tokenizer.n_tokens
    report["padding"] = tokenizer.n_tokens * token_size - tokenizer.n_params
    report["suggested_preset"] = paper_size(tokenizer.n_params)
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The `inspect_collection` report as text for a terminal."""
    lines = [f"{report['directory']}: {report['count']} usable checkpoint(s) of {report['files']} file(s)"]
    if "parameters" in report:
        p = report["parameters"]
        lines.append(f"parameters per checkpoint: {p['total']:,} ({p['generated']:,} generated, {p['copied']:,} "
                     f"copied from the first checkpoint)")
        lines.append(f"tokens of size {report['token_size']}: {report['tokens']:,} per checkpoint "
                     f"({report['padding']:,} padded positions); paper preset for this size: "
                     f"{report['suggested_preset']}")
        width = max(len(layer["name"]) for layer in report["layers"])
        lines.append(f"  {'layer':<{width}}  {'shape':<18} {'dtype':<9} {'numel':>11} {'tokens':>7}")
        for layer in report["layers"]:
            tokens = layer["tokens"] if layer["generated"] else "copied"
            lines.append(f"  {layer['name']:<{width}}  {str(tuple(layer['shape'])):<18} {layer['dtype']:<9} "
                         f"{layer['numel']:>11,} {tokens:>7}")
    for key, value in report["metadata"].items():
        if isinstance(value, dict) and "mean" in value:
            value = f"min {value['min']:.4g}, mean {value['mean']:.4g}, max {value['max']:.4g}"
        lines.append(f"metadata {key}: {value}")
    for problem in report["problems"]:
        lines.append(f"problem: {problem['file']}: {problem['problem']}")
    lines.append("usable for rpg train: " + ("yes" if report["usable"] else "no"))
    return "\n".join(lines)
