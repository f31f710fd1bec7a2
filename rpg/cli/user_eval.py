"""A user's evaluation entry point, named ``module:function`` or ``path/to/file.py:function``.

The function takes a state dict (``dict[str, torch.Tensor]``) and returns a higher-is-better number (e.g. validation
accuracy). Every way this can go wrong — a malformed spec, a module that does not import, a missing or non-callable
attribute, a function that raises or returns something other than a finite number — becomes a
`ScoreFunctionError` with a one-line message, so the CLI can report it without a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from rpg.utils import load_error_mismatch

ScoreFn = Callable[[dict[str, torch.Tensor]], float]


class ScoreFunctionError(ValueError):
    """An evaluation entry point that cannot be loaded or that misbehaved."""


def _one_line(err: BaseException) -> str:
    """The error as one line: a state-dict mismatch by its keys (torch lists each kind on a line of its own), any
    other message with its lines joined, never just its first line."""
    message = load_error_mismatch(str(err)) or " ".join(line.strip() for line in str(err).strip().splitlines())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ScoreFunctionError(f"evaluation file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"rpg_user_eval_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ScoreFunctionError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Like `python path/to/file.py`: the file's folder goes on sys.path, so its sibling modules import.
    _prepend_path(str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ScoreFunctionError(f"importing {path} failed: {_one_line(err)}") from err
    return module


def _prepend_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _import_module(name: str) -> ModuleType:
    # Like `python -m`, resolve modules from the current directory first (console scripts do not).
    _prepend_path(os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ScoreFunctionError(f"cannot import module '{name}' ({_one_line(err)}); run from the folder that holds "
                                 "it, or give a file: path/to/file.py:function") from err
    except Exception as err:
        raise ScoreFunctionError(f"importing module '{name}' failed: {_one_line(err)}") from err


def _as_score(value: Any, spec: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ScoreFunctionError(f"score function '{spec}' returned a {type(value).__name__}, not a number")
    if not math.isfinite(float(value)):
        raise ScoreFunctionError(f"score function '{spec}' returned {value}, not a finite number")
    return float(value)


def load_score_function(spec: str) -> ScoreFn:
    """The user's function behind `spec`, wrapped so that misbehaviour raises `ScoreFunctionError`."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ScoreFunctionError(f"evaluation entry point '{spec}' must look like module:function or "
                                 "path/to/file.py:function")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    module = _import_file(Path(target)) if is_file else _import_module(target)
    fn = getattr(module, attr, None)
    if fn is None:
        raise ScoreFunctionError(f"{target} has no function '{attr}'")
    if not callable(fn):
        raise ScoreFunctionError(f"'{spec}' is a {type(fn).__name__}, not a function")

    def score(state_dict: dict[str, torch.Tensor]) -> float:
        try:
            value = fn(state_dict)
        except Exception as err:
            raise ScoreFunctionError(f"score function '{spec}' raised {_one_line(err)}") from err
        return _as_score(value, spec)

    return score
